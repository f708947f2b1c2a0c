"""``--metrics ADDR`` (``metrics/exporter.py``): loopback only, GET /metrics in the Prometheus
text format, and nothing else answered; bad requests never hurt the server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from btmm_core.aio import within
from btmm_core.errors import ConfigError
from btmm_core.metrics.exporter import MAX_HEAD, MetricsServer, parse_listen


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:9430", ("127.0.0.1", 9430)),
    ("[::1]:9430", ("::1", 9430)),
    ("localhost:0", ("127.0.0.1", 0)),
    (":9430", ("127.0.0.1", 9430)),
    ("127.8.9.1:1", ("127.8.9.1", 1)),
])
def test_loopback_addresses_are_taken(text: str, want: tuple[str, int]) -> None:
    assert parse_listen(text) == want


@pytest.mark.parametrize(("text", "why"), [
    ("0.0.0.0:9430", "not a loopback address"),
    ("[::]:9430", "not a loopback address"),
    ("192.0.2.1:9430", "not a loopback address"),
    ("9430", "not HOST:PORT"),
    ("127.0.0.1:http", "not HOST:PORT"),
    ("127.0.0.1:70000", "not HOST:PORT"),
    ("metrics.example:9430", "not an IP address"),
])
def test_other_addresses_are_refused_with_the_reason(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as info:
        parse_listen(text)
    if "loopback" in why:
        assert info.value.hint is not None and "SSH tunnel" in info.value.hint


class _Live(Collector):
    """Read at scrape time: the value of the moment."""

    def __init__(self) -> None:
        self.value = 1.0

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("btmm_test_live", "a value read when scraped")
        g.add_metric([], self.value)
        yield g


async def _http(port: int, request: bytes) -> tuple[int, bytes, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await within(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


def test_scrape_and_everything_that_is_not_one() -> None:
    async def main() -> None:
        registry = CollectorRegistry(auto_describe=False)
        live = _Live()
        registry.register(live)
        hits = Counter("btmm_test_hits", "a library counter", registry=registry)
        hits.inc(3)
        server = MetricsServer(registry, "127.0.0.1", 0)
        await server.start()
        try:
            status, head, body = await _http(server.port, b"GET /metrics HTTP/1.1\r\n"
                                                          b"Host: x\r\n\r\n")
            assert status == 200
            assert b"Content-Type: text/plain; version=0.0.4" in head
            assert b"btmm_test_live 1.0\n" in body and b"btmm_test_hits_total 3.0\n" in body
            live.value = 7.0
            _, _, body = await _http(server.port, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            assert b"btmm_test_live 7.0\n" in body
            status, _, body = await _http(server.port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
            assert status == 200 and body == b""
            assert (await _http(server.port, b"GET / HTTP/1.1\r\n\r\n"))[0] == 404
            assert (await _http(server.port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0] == 405
            assert (await _http(server.port, b"\x00\xff garbage\r\n\r\n"))[0] == 405
            too_big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
            assert (await _http(server.port, too_big))[0] == 400
            # a client that sends half a head and goes away
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /met")
            writer.close()
            status, _, body = await _http(server.port, b"GET /metrics HTTP/1.1\r\n\r\n")
            assert status == 200 and b"btmm_test_live 7.0" in body
            assert server.scrapes == 4
        finally:
            await server.close()

    asyncio.run(main())


def test_a_taken_port_is_a_clear_error() -> None:
    async def main() -> None:
        first = MetricsServer(CollectorRegistry(), "127.0.0.1", 0)
        await first.start()
        try:
            second = MetricsServer(CollectorRegistry(), "127.0.0.1", first.port)
            with pytest.raises(ConfigError, match=r"cannot serve metrics on 127\.0\.0\.1"):
                await second.start()
        finally:
            await first.close()

    asyncio.run(main())
