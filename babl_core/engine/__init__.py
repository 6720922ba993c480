"""The engine: the catalog and what makes a model answer (availability, loading with quantization and
adapters, the model cache, prompt styles, devices, generation and batching, the remote and llama.cpp
engines) and the chat service (`service.ChatSession` / `ChatService` / `ChatReply`).

It knows no UI: it imports `babl_core.settings` and nothing of `web` or `storage`, nor chainlit,
fastapi or sqlalchemy (tests/test_layout.py checks this).
"""
