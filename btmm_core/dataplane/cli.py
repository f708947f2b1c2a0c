"""``btmm tunnel``: run one data-plane engine with static SAs from a JSON file.

For tests, benchmarks and people debugging the data plane before the key exchange exists. The
wire format is ESP (RFC 4303) with AES-256-GCM (RFC 4106) in UDP (RFC 3948), as fixed in
``btmm_core.dataplane.api``.

Configuration (JSON)::

    {"dataplane": "fast" | "python" | "auto",   (optional, default auto)
     "tun": "btmm0", "mtu": 1420,
     "address": "fd00:b7:1::1/64",              (inner ULA, /64 or /128)
     "listen_port": 4500, "listen_host": "::",   (optional; "::" or "0.0.0.0": both families)
     "peers": [{"inner": "fd00:b7:1::2",
                "endpoint": "192.0.2.2:4500" | "[2001:db8::2]:4500" | null,
                "tx_spi": 4097, "tx_key": "<72 hex digits>",
                "rx_spi": 4098, "rx_key": "<72 hex digits>"}]}

A peer may leave out both SAs of a direction (``tx_spi``/``tx_key`` or ``rx_spi``/``rx_key``
null or absent): it is then added without that SA.

Once the engine runs, ``btmm tunnel`` prints one line ``{"ready": true, "port": N, "tun": "..."}``
on stdout (or ``{"ready": false, "error": "..."}`` and exits 1), logs events on stderr, and
serves a JSON-lines control channel: one request object per line, one response per line.
With ``--control stdio`` (the default) requests come on stdin and responses go to stdout; end
of stdin stops the tunnel, so a tunnel never outlives the process that drives it. With
``--control unix:PATH`` the channel is a unix stream socket (any number of clients) and stdin
is ignored. Requests (``id``, if given, is echoed back)::

    {"cmd": "counters"}                     -> {"ok": true, "counters": {...}}
    {"cmd": "peers"}                        -> {"ok": true, "peers": [{...}]}
    {"cmd": "events"}                       -> {"ok": true, "events": [...], "lost": N}
    {"cmd": "update_peer", "inner": "...", "endpoint": "h:p" | null}
    {"cmd": "send_control", "endpoint": "h:p", "payload": "<hex>"}
    {"cmd": "send_stun", "endpoint": "h:p", "payload": "<hex>"}
    {"cmd": "send_keepalive", "inner": "..."}
    {"cmd": "reject_held", "inner": "..."}  -> {"ok": true, "rejected": N}
    {"cmd": "quit"}

Events (drained by ``events``, oldest first): ``{"type": "control", "source": "h:p",
"payload": "<hex>"}``, ``{"type": "stun", "source": "h:p", "payload": "<hex>"}``,
``{"type": "roamed", "inner": ..., "old": "h:p" | null, "new": "h:p"}``,
``{"type": "tx_sa_exhausted", "inner": ..., "spi": N}``,
``{"type": "peer_wanted", "inner": ...}`` (packets are held for a peer without a transmit SA;
its ``held`` in ``peers`` counts them). Failed requests answer
``{"ok": false, "error": "..."}``. SIGTERM and SIGINT stop the engine cleanly.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import click
import structlog

from btmm_core.dataplane import open_engine
from btmm_core.dataplane.api import (
    DEFAULT_MTU,
    DEFAULT_PORT,
    KEYMAT_LEN,
    ControlPacket,
    Counters,
    Endpoint,
    Engine,
    EngineConfig,
    EngineEvent,
    PeerInfo,
    PeerRoamed,
    PeerWanted,
    StunPacket,
    TxSaExhausted,
)
from btmm_core.dataplane.netconf import configure_tun
from btmm_core.errors import BtmmError, ConfigError, DataPlaneError, PermissionNeeded
from btmm_core.log import configure_logging

#: events kept for the ``events`` request; older ones are dropped (and counted as lost)
EVENT_BACKLOG = 4096
#: SPIs 1..255 are reserved by IANA (RFC 4303 §2.1) and 0 is never valid
SPI_MIN = 256
SPI_MAX = 2**32 - 1

log = structlog.get_logger("btmm.tunnel")


# ---------------------------------------------------------------------------------------------
# Configuration (pure: dicts in, frozen dataclasses out)


@dataclass(frozen=True)
class PeerConfig:
    inner: str
    endpoint: Endpoint | None
    tx_spi: int | None
    tx_key: bytes | None
    rx_spi: int | None
    rx_key: bytes | None


@dataclass(frozen=True)
class TunnelConfig:
    dataplane: str
    tun: str
    mtu: int
    address: ipaddress.IPv6Interface
    listen: Endpoint
    peers: tuple[PeerConfig, ...]


def parse_endpoint(text: str) -> Endpoint:
    """Parse ``"a.b.c.d:port"`` or ``"[IPv6]:port"`` (the underlay may be either family) into
    an ``Endpoint`` (v4-mapped IPv6 becomes plain IPv4, as engines report it)."""
    host, sep, port = str(text).rpartition(":")
    example = 'write e.g. "192.0.2.2:4500" or "[2001:db8::2]:4500"'
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"endpoint {text!r} is not host:port", hint=example)
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        addr: ipaddress.IPv4Address | ipaddress.IPv6Address = (
            ipaddress.IPv6Address(host[1:-1]) if bracketed else ipaddress.IPv4Address(host)
        )
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
            raise ValueError("zone index")
    except ValueError as err:
        raise ConfigError(
            f"endpoint host {host!r} is not an IPv4 address or a bracketed IPv6 address",
            hint=example,
        ) from err
    number = int(port)
    if not 0 < number < 65536:
        raise ConfigError(f"endpoint port {number} is out of range", hint="use 1..65535")
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return Endpoint(str(addr), number)


def format_endpoint(endpoint: Endpoint | None) -> str | None:
    """``a.b.c.d:port`` or ``[IPv6]:port``, what ``parse_endpoint`` reads."""
    return None if endpoint is None else str(endpoint)


def _spi(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if not SPI_MIN <= value <= SPI_MAX:
        raise ConfigError(
            f"{where} {value} is out of range",
            hint=f"SPIs are {SPI_MIN}..{SPI_MAX} (0 is invalid, 1..255 are reserved)",
        )
    return value


def _key(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a hex string, got {value!r}")
    try:
        key = bytes.fromhex(value)
    except ValueError as err:
        raise ConfigError(f"{where} is not hexadecimal") from err
    if len(key) != KEYMAT_LEN:
        raise ConfigError(
            f"{where} is {len(key)} bytes long, not {KEYMAT_LEN}",
            hint=f"give {2 * KEYMAT_LEN} hex digits: a 32-byte AES-256 key and a 4-byte salt",
        )
    return key


def _sa(raw: Mapping[str, Any], direction: str, where: str) -> tuple[int | None, bytes | None]:
    spi, key = raw.get(f"{direction}_spi"), raw.get(f"{direction}_key")
    if spi is None and key is None:
        return None, None
    if spi is None or key is None:
        raise ConfigError(
            f"{where} has only one of {direction}_spi and {direction}_key",
            hint="give both (an SA) or neither (no SA in that direction)",
        )
    return _spi(spi, f"{where}.{direction}_spi"), _key(key, f"{where}.{direction}_key")


def parse_config(raw: Mapping[str, Any]) -> TunnelConfig:
    """Validate a decoded JSON configuration; every error names the offending field."""
    if not isinstance(raw, Mapping):
        raise ConfigError("the tunnel configuration must be a JSON object")
    known = {"dataplane", "tun", "mtu", "address", "listen_port", "listen_host", "peers"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown configuration keys {unknown}", hint=f"known: {sorted(known)}")
    dataplane = str(raw.get("dataplane") or "auto")
    tun = raw.get("tun", "btmm0")
    if not isinstance(tun, str) or not 0 < len(tun) < 16:
        raise ConfigError(f"tun {tun!r} is not a device name", hint="1..15 characters")
    mtu = raw.get("mtu", DEFAULT_MTU)
    if isinstance(mtu, bool) or not isinstance(mtu, int) or not 1280 <= mtu <= 65535:
        raise ConfigError(f"mtu {mtu!r} is invalid", hint="IPv6 needs 1280..65535")
    if "address" not in raw:
        raise ConfigError("address is missing", hint='give the inner ULA, e.g. "fd00:b7:1::1/64"')
    try:
        address = ipaddress.IPv6Interface(str(raw["address"]))
    except ValueError as err:
        raise ConfigError(f"address {raw['address']!r} is not an IPv6 address/prefix") from err
    port = raw.get("listen_port", DEFAULT_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ConfigError(f"listen_port {port!r} is invalid", hint="0..65535 (0: any free port)")
    host = str(raw.get("listen_host", "::"))
    try:
        ipaddress.ip_address(host)
    except ValueError as err:
        raise ConfigError(f"listen_host {host!r} is not an IPv4 or IPv6 address") from err
    peers_raw = raw.get("peers", [])
    if not isinstance(peers_raw, list):
        raise ConfigError("peers must be a list")
    peers: list[PeerConfig] = []
    seen: set[ipaddress.IPv6Address] = set()
    for i, p in enumerate(peers_raw):
        where = f"peers[{i}]"
        if not isinstance(p, Mapping) or "inner" not in p:
            raise ConfigError(f"{where} must be an object with an inner address")
        try:
            inner = ipaddress.IPv6Address(str(p["inner"]))
        except ValueError as err:
            raise ConfigError(f"{where}.inner {p['inner']!r} is not an IPv6 address") from err
        if inner in seen:
            raise ConfigError(f"{where}.inner {inner} appears twice")
        seen.add(inner)
        ep = p.get("endpoint")
        endpoint = None if ep is None else parse_endpoint(ep)
        tx_spi, tx_key = _sa(p, "tx", where)
        rx_spi, rx_key = _sa(p, "rx", where)
        peers.append(PeerConfig(str(inner), endpoint, tx_spi, tx_key, rx_spi, rx_key))
    return TunnelConfig(dataplane, tun, mtu, address, Endpoint(host, port), tuple(peers))


def load_config(path: Path) -> TunnelConfig:
    try:
        raw = json.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    return parse_config(raw)


# ---------------------------------------------------------------------------------------------
# Events and the control channel (pure: request dicts in, response dicts out)


def event_to_json(event: EngineEvent) -> dict[str, Any]:
    if isinstance(event, ControlPacket):
        return {
            "type": "control",
            "source": format_endpoint(event.source),
            "payload": event.payload.hex(),
        }
    if isinstance(event, StunPacket):
        return {
            "type": "stun",
            "source": format_endpoint(event.source),
            "payload": event.payload.hex(),
        }
    if isinstance(event, PeerRoamed):
        return {
            "type": "roamed",
            "inner": event.inner,
            "old": format_endpoint(event.old),
            "new": format_endpoint(event.new),
        }
    if isinstance(event, TxSaExhausted):
        return {"type": "tx_sa_exhausted", "inner": event.inner, "spi": event.spi}
    if isinstance(event, PeerWanted):
        return {"type": "peer_wanted", "inner": event.inner}
    return {"type": "unknown", "repr": repr(event)}


def counters_to_json(counters: Counters) -> dict[str, Any]:
    out = asdict(counters)
    out["drops"] = dict(counters.drops or {})
    return out


def peer_to_json(peer: PeerInfo) -> dict[str, Any]:
    return {
        "inner": peer.inner,
        "endpoint": format_endpoint(peer.endpoint),
        "tx_spi": peer.tx_spi,
        "rx_spis": list(peer.rx_spis),
        "counters": counters_to_json(peer.counters),
        "held": peer.held,
    }


class ControlSession:
    """Answers control requests against one engine and keeps the drained event backlog."""

    def __init__(self, engine: Engine, backlog: int = EVENT_BACKLOG) -> None:
        self.engine = engine
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=backlog)
        self.lost = 0
        self.quit_requested = False

    def pump(self) -> list[EngineEvent]:
        """Move every queued engine event into the backlog; returns them for logging."""
        taken: list[EngineEvent] = []
        while True:
            batch = list(self.engine.drain())
            taken.extend(batch)
            if not batch:
                break
        for event in taken:
            if len(self.events) == self.events.maxlen:
                self.lost += 1
            self.events.append(event_to_json(event))
        return taken

    def handle_line(self, line: str) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except json.JSONDecodeError as err:
            return {"ok": False, "error": f"request is not JSON: {err}"}
        if not isinstance(request, dict):
            return {"ok": False, "error": "a request is a JSON object with a cmd field"}
        response = self.handle(request)
        if "id" in request:
            response["id"] = request["id"]
        return response

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        handler = self._handlers.get(str(cmd))
        if handler is None:
            return {
                "ok": False,
                "error": f"unknown cmd {cmd!r}; known: {', '.join(sorted(self._handlers))}",
            }
        try:
            return {"ok": True, **handler(self, request)}
        except (BtmmError, KeyError, ValueError, TypeError, OSError) as err:
            text = str(err) if not isinstance(err, KeyError) else f"missing field {err}"
            return {"ok": False, "error": f"{cmd}: {text}"}

    def _counters(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {"counters": counters_to_json(self.engine.counters())}

    def _peers(self, _: Mapping[str, Any]) -> dict[str, Any]:
        return {"peers": [peer_to_json(p) for p in self.engine.peers()]}

    def _events(self, _: Mapping[str, Any]) -> dict[str, Any]:
        self.pump()
        events, lost = list(self.events), self.lost
        self.events.clear()
        self.lost = 0
        return {"events": events, "lost": lost}

    def _update_peer(self, req: Mapping[str, Any]) -> dict[str, Any]:
        ep = req["endpoint"]
        self.engine.update_peer(str(req["inner"]), None if ep is None else parse_endpoint(ep))
        return {}

    def _send_control(self, req: Mapping[str, Any]) -> dict[str, Any]:
        payload = bytes.fromhex(str(req.get("payload", "")))
        self.engine.send_control(parse_endpoint(req["endpoint"]), payload)
        return {}

    def _send_stun(self, req: Mapping[str, Any]) -> dict[str, Any]:
        payload = bytes.fromhex(str(req.get("payload", "")))
        self.engine.send_stun(parse_endpoint(req["endpoint"]), payload)
        return {}

    def _send_keepalive(self, req: Mapping[str, Any]) -> dict[str, Any]:
        self.engine.send_keepalive(str(req["inner"]))
        return {}

    def _reject_held(self, req: Mapping[str, Any]) -> dict[str, Any]:
        return {"rejected": self.engine.reject_held(str(req["inner"]))}

    def _quit(self, _: Mapping[str, Any]) -> dict[str, Any]:
        self.quit_requested = True
        return {}

    _handlers: ClassVar[
        dict[str, Callable[[ControlSession, Mapping[str, Any]], dict[str, Any]]]
    ] = {
        "counters": _counters,
        "peers": _peers,
        "events": _events,
        "update_peer": _update_peer,
        "send_control": _send_control,
        "send_stun": _send_stun,
        "send_keepalive": _send_keepalive,
        "reject_held": _reject_held,
        "quit": _quit,
    }


# ---------------------------------------------------------------------------------------------
# I/O: engine setup and the asyncio driver


def _emit(stream: TextIO, obj: Mapping[str, Any]) -> None:
    stream.write(json.dumps(obj, separators=(",", ":")) + "\n")
    stream.flush()


def _explain_os_error(err: OSError, config: TunnelConfig) -> BtmmError:
    if err.errno == errno.EADDRINUSE:
        return DataPlaneError(
            f"UDP port {config.listen.port} on {config.listen.host} is in use",
            hint="choose another listen_port (0 picks a free one) or stop the other tunnel",
        )
    if err.errno in (errno.EPERM, errno.EACCES):
        return PermissionNeeded(
            f"opening the TUN device {config.tun!r} or the UDP socket was refused: {err}",
            hint="run as root or grant CAP_NET_ADMIN",
        )
    return DataPlaneError(f"opening the engine failed: {err}")


def open_configured(config: TunnelConfig) -> Engine:
    """Open the engine, install the peers and SAs, and configure its TUN device (not started)."""
    try:
        engine = open_engine(
            EngineConfig(tun_name=config.tun, listen=config.listen, mtu=config.mtu),
            config.dataplane,
        )
    except OSError as err:
        raise _explain_os_error(err, config) from err
    try:
        for peer in config.peers:
            engine.add_peer(peer.inner, peer.endpoint)
            # make-before-break order: receive SA first, then transmit SA
            if peer.rx_spi is not None and peer.rx_key is not None:
                engine.install_rx_sa(peer.inner, peer.rx_spi, peer.rx_key)
            if peer.tx_spi is not None and peer.tx_key is not None:
                engine.install_tx_sa(peer.inner, peer.tx_spi, peer.tx_key)
        configure_tun(
            engine.tun_name,
            mtu=config.mtu,
            address=config.address,
            peers=[p.inner for p in config.peers],
        )
    except BaseException:
        engine.stop()
        raise
    return engine


async def _serve_stdio(
    session: ControlSession, reader: asyncio.StreamReader, stop: asyncio.Event
) -> None:
    while not session.quit_requested:
        line = await reader.readline()
        if not line:
            log.info("stdin closed, stopping")
            break
        if line.strip():
            _emit(sys.stdout, session.handle_line(line.decode(errors="replace")))
    stop.set()


def _unix_client(
    session: ControlSession, stop: asyncio.Event
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not session.quit_requested:
                line = await reader.readline()
                if not line:
                    break
                if line.strip():
                    response = session.handle_line(line.decode(errors="replace"))
                    writer.write((json.dumps(response, separators=(",", ":")) + "\n").encode())
                    await writer.drain()
            if session.quit_requested:
                stop.set()
        finally:
            writer.close()

    return client


async def _run(engine: Engine, control: str, announce: Callable[[], None]) -> None:
    """Serve the control channel until quit, end of stdin, SIGTERM or SIGINT. ``announce`` is
    called once the channel accepts requests."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    session = ControlSession(engine)

    def on_events() -> None:
        for event in session.pump():
            _log_event(event)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_reader(engine.fileno(), on_events)
    task: asyncio.Task[None] | None = None
    server: asyncio.Server | None = None
    path: Path | None = None
    try:
        if control == "stdio":
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            task = asyncio.create_task(_serve_stdio(session, reader, stop))
        else:
            path = Path(control[5:])
            # A stale socket file from an earlier run would make bind fail.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            server = await asyncio.start_unix_server(_unix_client(session, stop), path=str(path))
        announce()
        await stop.wait()
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if server is not None:
            server.close()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        loop.remove_reader(engine.fileno())
    log.info("stopping", counters=counters_to_json(engine.counters()))


def _log_event(event: EngineEvent) -> None:
    if isinstance(event, PeerRoamed):
        log.info(
            "peer roamed",
            inner=event.inner,
            old=format_endpoint(event.old),
            new=format_endpoint(event.new),
        )
    elif isinstance(event, ControlPacket):
        log.info(
            "control packet",
            source=format_endpoint(event.source),
            length=len(event.payload),
            head=event.payload[:16].hex(),
        )
    elif isinstance(event, StunPacket):
        log.info("stun packet", source=format_endpoint(event.source), length=len(event.payload))
    elif isinstance(event, TxSaExhausted):
        log.warning("transmit SA exhausted, rekey needed", inner=event.inner, spi=event.spi)


def _control_option(_: click.Context, __: click.Parameter, value: str) -> str:
    if value == "stdio" or (value.startswith("unix:") and len(value) > 5):
        return value
    raise click.BadParameter("use stdio or unix:PATH")


def _announce(engine: Engine, config: TunnelConfig, control: str) -> None:
    """Log that the tunnel is up and print the ready line on stdout."""
    log.info(
        "tunnel up",
        engine=engine.kind,
        tun=engine.tun_name,
        port=engine.local_port,
        address=str(config.address),
        peers=len(config.peers),
        control=control,
    )
    _emit(
        sys.stdout,
        {
            "ready": True,
            "port": engine.local_port,
            "tun": engine.tun_name,
            "engine": engine.kind,
        },
    )


@click.command("tunnel")
@click.argument("config_path", metavar="CONFIG", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--dataplane",
    type=click.Choice(["fast", "python", "auto"]),
    default=None,
    help="Override the configuration's data plane engine.",
)
@click.option(
    "--control",
    default="stdio",
    callback=_control_option,
    show_default=True,
    help="Control channel: stdio (end of stdin stops the tunnel) or unix:PATH.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages too.")
def tunnel(config_path: Path, dataplane: str | None, control: str, verbose: bool) -> None:
    """Run one data-plane engine with the static SAs in CONFIG (JSON), for tests and debugging.

    \b
    CONFIG: {"dataplane": "fast|python|auto", "tun": "btmm0", "mtu": 1420,
             "address": "fd00:b7:1::1/64", "listen_port": 4500,
             "peers": [{"inner": "fd00:b7:1::2", "endpoint": "192.0.2.2:4500",
                        "tx_spi": 4097, "tx_key": "<72 hex>",
                        "rx_spi": 4098, "rx_key": "<72 hex>"}]}

    Prints {"ready": true, "port": N, "tun": NAME, "engine": KIND} on stdout, logs events on
    stderr, then answers JSON-lines requests, one per line:

    \b
    {"cmd": "counters"}  {"cmd": "peers"}  {"cmd": "events"}
    {"cmd": "update_peer", "inner": ..., "endpoint": "host:port" | null}
    {"cmd": "send_control", "endpoint": "host:port", "payload": "<hex>"}
    {"cmd": "send_keepalive", "inner": ...}  {"cmd": "quit"}
    """
    configure_logging("debug" if verbose else "info")
    try:
        config = load_config(config_path)
        if dataplane is not None:
            config = TunnelConfig(
                dataplane, config.tun, config.mtu, config.address, config.listen, config.peers
            )
        engine = open_configured(config)
    except BtmmError as err:
        _emit(sys.stdout, {"ready": False, "error": str(err)})
        log.error("tunnel did not start", error=err.what, hint=err.hint)
        sys.exit(1)
    ready = False

    def announce() -> None:
        nonlocal ready
        _announce(engine, config, control)
        ready = True

    try:
        engine.start()
        asyncio.run(_run(engine, control, announce))
    except (BtmmError, OSError) as err:
        what = err.what if isinstance(err, BtmmError) else f"control channel {control}: {err}"
        hint = err.hint if isinstance(err, BtmmError) else None
        if not ready:
            _emit(
                sys.stdout, {"ready": False, "error": what if hint is None else f"{what} ({hint})"}
            )
        log.error("tunnel failed", error=what, hint=hint)
        sys.exit(1)
    finally:
        engine.stop()
