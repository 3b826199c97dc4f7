"""The OpenAI-compatible server: `create_app` builds the FastAPI app, `serve` runs it with uvicorn."""

from __future__ import annotations

from .app import ServerConfig, create_app, default_model_name
from .protocol import APIError, Strategy, parse_speculative_config

__all__ = ["APIError", "ServerConfig", "Strategy", "create_app", "default_model_name", "parse_speculative_config",
           "serve"]


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app until interrupted (Ctrl-C stops it cleanly)."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
