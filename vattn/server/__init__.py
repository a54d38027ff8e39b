"""The OpenAI-compatible HTTP server: `build_app(engine)` gives a FastAPI app; `vattn serve` runs it.

Imports are lazy, so that `vattn.server.config` (read by the CLI and by the chat template sandbox's child
process) does not pull in torch.
"""

__all__ = ["build_app", "served_name"]


def __getattr__(name: str):
    if name in __all__:
        from vattn.server import app

        return getattr(app, name)
    raise AttributeError(f"module 'vattn.server' has no attribute {name!r}")
