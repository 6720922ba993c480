"""The HTTP API (OpenAI-compatible routes and the email endpoint), split by role as vLLM's OpenAI
server is: `errors` (OpenAI's error shape), `protocol` (request and response schemas), `serving`
(requests into `ChatService` calls, replies into responses and streams) and `routes` (the routes,
registered on Chainlit's FastAPI app; its docstring lists them)."""
