"""``--metrics ADDR``: Prometheus text exposition over HTTP, served from the program's own
event loop (Prometheus exposition format 0.0.4, from the ``prometheus-client`` library).

Why the event loop and not ``prometheus_client.start_http_server``: that one answers from a
thread of its own, while btmm's numbers live in cores that the event loop changes without
locks. Collectors here read them at scrape time (``Collector.collect``), on the loop, so a
scrape sees one consistent moment and the cores keep plain counters and no metrics library.

Loopback only, by decision: the metrics name peers, zones and addresses, and the endpoint has
no authentication, so it is never offered to the network; a scraper elsewhere comes through
its own agent or an SSH tunnel. A non-loopback ADDR is refused at start with that said.

The HTTP side is the least that a scraper needs: ``GET /metrics`` (HTTP/1.0 or 1.1), one
request per connection, a request head of at most ``MAX_HEAD`` bytes read within
``READ_TIMEOUT`` seconds, at most ``MAX_CONNECTIONS`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress

import structlog
from prometheus_client import CollectorRegistry, generate_latest

from btmm_core.aio import within
from btmm_core.errors import ConfigError

log = structlog.get_logger("btmm.metrics")

#: the text format ``generate_latest`` writes for names like ours (only [a-z_] in them), said
#: the way every Prometheus since 2.0 reads it; the library's own constant names a newer
#: format in recent versions and this one in older ones
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_HEAD = 8192
READ_TIMEOUT = 5.0
MAX_CONNECTIONS = 8
LOOPBACK_HINT = ("the metrics name peers and addresses and have no authentication: serve them "
                 "on 127.0.0.1 or [::1] and scrape through a local agent or an SSH tunnel")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (127.0.0.1) on a loopback address."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--metrics {text!r} is not HOST:PORT",
                          hint="e.g. --metrics 127.0.0.1:9430")
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"--metrics {text!r}: {host!r} is not an IP address",
                          hint="e.g. --metrics 127.0.0.1:9430") from exc
    if not addr.is_loopback:
        raise ConfigError(f"--metrics {text!r}: {host} is not a loopback address",
                          hint=LOOPBACK_HINT)
    return str(addr), int(port)


class MetricsServer:
    """Serves ``registry`` at ``http://HOST:PORT/metrics`` until ``close``."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._open = 0
        self.scrapes = 0

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._client, self.host, self.port,
                                                      limit=MAX_HEAD)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {self.host}:{self.port}: "
                              f"{exc.strerror or exc}",
                              hint="pick another port with --metrics") from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics", url=f"http://{self.url_host}:{self.port}/metrics")

    @property
    def url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await within(self._server.wait_closed(), 2.0)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open += 1
        try:
            if self._open > MAX_CONNECTIONS:
                await _respond(writer, 503, b"busy\n")
                return
            try:
                head = await within(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError):
                await _respond(writer, 400, b"bad request\n")
                return
            method, _, rest = head.partition(b" ")
            target = rest.partition(b" ")[0].split(b"?")[0]
            if method not in (b"GET", b"HEAD"):
                await _respond(writer, 405, b"GET /metrics\n")
            elif target != b"/metrics":
                await _respond(writer, 404, b"see /metrics\n")
            else:
                self.scrapes += 1
                body = generate_latest(self.registry)
                await _respond(writer, 200, body, CONTENT_TYPE,
                               send_body=method == b"GET")
        except ConnectionError:
            pass
        except Exception:
            log.exception("metrics scrape failed")
            with contextlib.suppress(Exception):
                await _respond(writer, 500, b"internal error; see the log\n")
        finally:
            self._open -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes,
                   content_type: str = "text/plain; charset=utf-8", *,
                   send_body: bool = True) -> None:
    head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    writer.write(head + (body if send_body else b""))
    await writer.drain()
