"""The web side: the chat presenter (`ui`) that app.py's Chainlit hooks call, answer rendering, logins,
the tunnel, exports, the process-wide service (`runtime`) and the HTTP API (`api/`).

It may import `engine` and `storage`; nothing there imports it back (tests/test_layout.py).
"""
