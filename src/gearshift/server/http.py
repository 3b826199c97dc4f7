"""The HTTP connection layer: uvicorn, with deadlines a stalled client cannot stretch.

uvicorn closes an idle keep-alive connection (`timeout_keep_alive`), but it waits forever for a
request that has begun and stopped: headers that never end, a body that never comes (a
slowloris holds a socket and a task per connection that way), and for a connection that never
sends a byte. `GuardedProtocol` adds what nginx calls client_header_timeout and
client_body_timeout, as absolute deadlines (a byte every few seconds does not extend them):

- a request's headers must be complete within `timeout_headers` seconds of the connection
  opening or of the request's first byte;
- its body must be complete within `timeout_body` seconds of its headers;
- beyond `max_connections` open connections, a new one is closed at once.

A connection past its deadline is closed; a route waiting on its body sees a disconnect. The
request line and headers together may hold `MAX_HEADER_BYTES` (431 beyond), the body what the
app allows (`max_body_bytes`, 413 beyond).
"""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..config import ServerLimits

log = logging.getLogger("gearshift.server")
MAX_HEADER_BYTES = 64 * 1024
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)
_TOO_LARGE_BODY = (
    b'{"error":{"message":"the request line and headers are larger than %d bytes",'
    b'"type":"invalid_request_error","param":null,"code":"headers_too_large"}}' % MAX_HEADER_BYTES
)


class GuardedProtocol(HttpToolsProtocol):
    timeout_headers: float = ServerLimits.timeout_headers  # (`config` sets the server's own)
    timeout_body: float = ServerLimits.timeout_body
    max_connections: int = ServerLimits.max_connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            log.warning("refused a connection: %d are open (max_connections)", len(self.connections) - 1)
            transport.close()
            return
        self._arm(self.timeout_headers)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._deadline is None:  # a keep-alive connection's next request
            self._arm(self.timeout_headers)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self.transport.write(_TOO_LARGE % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY))
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._arm(self.timeout_body)  # disarmed when the body is complete (at once, for a request without one)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closed a connection that stalled before its request arrived")
            self.transport.close()


def config(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's configuration for the app, its connection limits read from its ServerConfig."""
    cfg = app.state.gearshift.config
    protocol = type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {
            "timeout_headers": cfg.timeout_headers,
            "timeout_body": cfg.timeout_body,
            "max_connections": cfg.max_connections,
        },
    )
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        timeout_keep_alive=cfg.timeout_keep_alive,
        timeout_graceful_shutdown=5,
    )
