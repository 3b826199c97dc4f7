"""Settings in one place: the engine's (`EngineConfig`) and the server's limits (`ServerLimits`).

Each is a small dataclass that checks its values when built, so a bad setting fails with one line
before anything loads. The CLI and the server take their defaults from these classes rather than
restating them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import GearshiftError


@dataclass
class EngineConfig:
    max_num_seqs: int = 8  # sequences decoded side by side (KV cache slots)
    max_batched_tokens: int = 256  # rows per step: decode rows and drafts first, then prompt chunks
    max_model_len: int | None = None  # a slot's positions (default: the model's context window)
    prefix_cache: bool = True
    prefix_cache_bytes: int = 1 << 30  # host memory for evicted prefixes
    exact: bool = True  # False: batched attention per sequence (attention.Batch), not batch-invariant

    def __post_init__(self):
        for name in ("max_num_seqs", "max_batched_tokens", "prefix_cache_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "prefix_cache_bytes" else 1):
                raise GearshiftError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.exact, bool):
            raise GearshiftError(f"exact must be True or False, got {self.exact!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
            raise GearshiftError(f"max_model_len must be an integer >= 2, got {self.max_model_len!r}")
        if self.max_batched_tokens < self.max_num_seqs:  # else decode rows alone could starve every prompt
            raise GearshiftError(
                f"max_batched_tokens ({self.max_batched_tokens}) must be at least max_num_seqs ({self.max_num_seqs})"
            )


@dataclass
class ServerLimits:
    """What one server lets its clients have (the README's Limits table)."""

    max_queue: int = 256  # requests that may wait for a slot beyond max_num_seqs; more get 503
    max_body_bytes: int = 2 * 1024 * 1024  # larger request bodies get 413
    # connections (server/http.py): headers must arrive within, and then the body within, so many
    # seconds; an idle keep-alive connection closes after timeout_keep_alive; more than
    # max_connections open connections are refused
    timeout_headers: float = 10.0
    timeout_body: float = 30.0
    timeout_keep_alive: float = 5.0
    max_connections: int = 512

    def __post_init__(self):
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise GearshiftError(f"max_queue must be an integer >= 0, got {self.max_queue!r}")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise GearshiftError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes!r}")
        if not isinstance(self.max_connections, int) or self.max_connections < 1:
            raise GearshiftError(f"max_connections must be at least 1, got {self.max_connections!r}")
        for name in ("timeout_headers", "timeout_body", "timeout_keep_alive"):
            if not getattr(self, name) > 0:
                raise GearshiftError(f"{name} must be positive, got {getattr(self, name)!r}")
