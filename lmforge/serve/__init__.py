"""`lmforge serve`: an OpenAI-compatible HTTP server with continuous batching, and the chat page at ``/``.

Optional extra ``serve`` (fastapi, uvicorn). ``create_app(model_dir, ...)`` builds the ASGI app."""

from __future__ import annotations


def create_app(*args, **kwargs):
    from lmforge.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
