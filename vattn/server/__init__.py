"""The OpenAI-compatible HTTP server: `build_app(engine)` gives a FastAPI app; `vattn serve` runs it."""

from vattn.server.app import build_app, served_name

__all__ = ["build_app", "served_name"]
