"""The Rust data plane (``btmm_core._fast``) behind the ``Engine`` protocol of ``api.py``.

ESP (RFC 4303) with AES-GCM (RFC 4106) in UDP (RFC 3948); the packet work happens in two
native threads that never take the GIL. This wrapper only converts between the API's types
(text IPv6 addresses, ``Endpoint``, ``Counters``, event dataclasses) and the extension's plain
values (16-byte addresses, ``(host, port)`` tuples, dicts, tuples).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import TYPE_CHECKING

import btmm_core._fast as _fast
from btmm_core.dataplane.api import (
    ControlPacket,
    Counters,
    Endpoint,
    EngineConfig,
    EngineEvent,
    PeerInfo,
    PeerRoamed,
    PeerWanted,
    StunPacket,
    TxSaExhausted,
    parse_inner,
)
from btmm_core.errors import DataPlaneError

if TYPE_CHECKING:  # the shapes of the extension's plain values exist only in _fast.pyi
    from btmm_core._fast import _Counters, _Event


def _inner_bytes(inner: str) -> bytes:
    return parse_inner(inner).packed


def _inner_text(raw: bytes) -> str:
    return str(ipaddress.IPv6Address(raw))


def _endpoint_tuple(endpoint: Endpoint | None) -> tuple[str, int] | None:
    return None if endpoint is None else (endpoint.host, endpoint.port)


def _endpoint(raw: tuple[str, int] | None) -> Endpoint | None:
    return None if raw is None else Endpoint(raw[0], raw[1])


def _counters(raw: _Counters) -> Counters:
    return Counters(
        packets_in=raw["packets_in"],
        bytes_in=raw["bytes_in"],
        packets_out=raw["packets_out"],
        bytes_out=raw["bytes_out"],
        keepalives_in=raw["keepalives_in"],
        control_in=raw["control_in"],
        drops=dict(raw["drops"]),
    )


def _event(raw: _Event) -> EngineEvent:
    match raw:
        case ("control", host, port, payload):
            return ControlPacket(Endpoint(host, port), bytes(payload))
        case ("stun", host, port, payload):
            return StunPacket(Endpoint(host, port), bytes(payload))
        case ("roamed", inner, old, new):
            return PeerRoamed(_inner_text(inner), _endpoint(old), Endpoint(new[0], new[1]))
        case ("exhausted", inner, spi):
            return TxSaExhausted(_inner_text(inner), spi)
        case ("wanted", inner):
            return PeerWanted(_inner_text(inner))
    raise DataPlaneError(
        f"the fast engine reported an unknown event {raw[0]!r}",
        hint="btmm_core._fast and btmm_core were built from different versions; reinstall",
    )


class FastEngine:
    """The Rust engine. Opening it creates (or attaches) the TUN device and binds the socket;
    ``start`` launches the packet threads."""

    kind = "fast"

    def __init__(self, config: EngineConfig) -> None:
        self._engine = _fast.Engine(
            config.tun_name,
            config.tun_fd,
            config.listen.host,
            config.listen.port,
            config.mtu,
            config.event_queue,
            config.control_queue_bytes,
        )

    @property
    def tun_name(self) -> str:
        return str(self._engine.tun_name)

    @property
    def local_port(self) -> int:
        return int(self._engine.local_port)

    def start(self) -> None:
        self._engine.start()

    def stop(self) -> None:
        self._engine.stop()

    def add_peer(self, inner: str, endpoint: Endpoint | None = None) -> None:
        self._engine.add_peer(_inner_bytes(inner), _endpoint_tuple(endpoint))

    def update_peer(self, inner: str, endpoint: Endpoint | None) -> None:
        self._engine.update_peer(_inner_bytes(inner), _endpoint_tuple(endpoint))

    def remove_peer(self, inner: str) -> None:
        self._engine.remove_peer(_inner_bytes(inner))

    def install_tx_sa(self, inner: str, spi: int, keymat: bytes, next_seq: int = 1) -> None:
        self._engine.install_tx_sa(_inner_bytes(inner), spi, keymat, next_seq)

    def install_rx_sa(self, inner: str, spi: int, keymat: bytes) -> None:
        self._engine.install_rx_sa(_inner_bytes(inner), spi, keymat)

    def retire_rx_sa(self, inner: str, spi: int) -> None:
        self._engine.retire_rx_sa(_inner_bytes(inner), spi)

    def reject_held(self, inner: str) -> int:
        return int(self._engine.reject_held(_inner_bytes(inner)))

    def clear_tx_sa(self, inner: str) -> None:
        self._engine.clear_tx_sa(_inner_bytes(inner))

    def send_control(self, destination: Endpoint, message: bytes) -> None:
        self._engine.send_control((destination.host, destination.port), message)

    def send_stun(self, destination: Endpoint, message: bytes) -> None:
        self._engine.send_stun((destination.host, destination.port), message)

    def send_keepalive(self, inner: str) -> None:
        self._engine.send_keepalive(_inner_bytes(inner))

    def fileno(self) -> int:
        return int(self._engine.fileno())

    def drain(self, limit: int = 256) -> Sequence[EngineEvent]:
        return [_event(raw) for raw in self._engine.drain(limit)]

    def counters(self) -> Counters:
        return _counters(self._engine.counters())

    def peers(self) -> Sequence[PeerInfo]:
        return [
            PeerInfo(
                inner=_inner_text(p["inner"]),
                endpoint=_endpoint(p["endpoint"]),
                tx_spi=p["tx_spi"],
                rx_spis=tuple(p["rx_spis"]),
                counters=_counters(p["counters"]),
                held=p["held"],
            )
            for p in self._engine.peers()
        ]

    def __enter__(self) -> FastEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
