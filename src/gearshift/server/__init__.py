"""The OpenAI-compatible server: `create_app` builds the FastAPI app, `serve` runs it with uvicorn."""

from __future__ import annotations

from .app import ServerConfig, create_app, default_model_name
from .protocol import APIError, Strategy, parse_speculative_config, parse_speculative_configs

__all__ = [
    "APIError",
    "ServerConfig",
    "Strategy",
    "create_app",
    "default_model_name",
    "parse_speculative_config",
    "parse_speculative_configs",
    "serve",
]


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app until interrupted (Ctrl-C stops it cleanly); if the model fails to load, stop and
    raise GearshiftError (the CLI's one line and non-zero exit) instead of answering 503 forever."""
    import uvicorn

    from ..errors import GearshiftError
    from .http import config

    server = uvicorn.Server(config(app, host, port, log_level))
    state = app.state.gearshift
    state.on_failure = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        pass
    if state.error is not None:
        raise GearshiftError(f"the model could not be loaded: {state.error}")
    if not server.started:  # (uvicorn has logged why: the port is taken, say)
        raise GearshiftError(f"the server could not start on {host}:{port}")
