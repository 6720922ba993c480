"""Babl: chat with local code and text models, and fine-tune the adapters they use."""

__version__ = "0.1.0"
