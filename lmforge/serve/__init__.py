"""`lmforge serve`: an OpenAI-compatible HTTP server with continuous batching, and the chat page at ``/``.

Optional extra ``serve`` (fastapi, uvicorn). ``lmforge.serve.app.create_app(model_dir, ...)`` builds the ASGI app."""
