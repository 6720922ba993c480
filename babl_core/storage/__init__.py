"""Where conversations are kept: the schema (SQLAlchemy metadata), Chainlit's data layer on it, the
files stored with chats and the stored form of a conversation.

It imports `babl_core.settings` only: no engine and no UI state (tests/test_layout.py).
"""
