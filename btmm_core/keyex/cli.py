"""``python -m btmm_core.keyex.cli CONFIG``: one engine, keyed by the handshake.

The key exchange without the registry, for tests and for debugging a handshake by hand (``btmm
up`` is the real program): it opens a data-plane engine, configures its TUN device, and runs
``KeyExchangeDriver`` for the peers of a JSON file. The handshake itself is specified in
``btmm_core.keyex.noise``.

Configuration (JSON)::

    {"dataplane": "fast" | "python" | "auto", "tun": "btmm0", "mtu": 1420,
     "address": "fd../128", "listen_port": 4500, (optional: our key's ULA, /128)
     "key_file": "/path/device.key",            (created 0600 if absent)
     "secret_file": "/path/account.secret",     (the account secret, raw bytes)
     "session": {"rekey_after_time": 120, ...}, (optional SessionConfig overrides)
     "handshake": {"load_threshold": 64, ...},  (optional HandshakeConfig overrides)
     "poll_interval": 1.0,                      (seconds between packet-budget checks)
     "peers": [{"public": "<base64>", "inner": "fd..",  (optional: ula_of(public))
                "endpoint": "192.0.2.2:4500" | null, "connect": true}]}

Inner addresses are bound to keys (``btmm_core.keyex.keys.ula_of``): a peer's ``inner``
must be the ULA of its ``public`` key, and our own ``address`` should be the ULA of our key,
or the peer drops our packets; both default to those.

It prints ``{"ready": true, "public": "<base64>", "port": N}`` on stdout, then one JSON line
per report (``established`` / ``failed``). Each line on stdin is a request: ``stats`` prints
``{"stats": {...}}`` (engine counters, per-peer SAs and key-exchange counters); end of stdin
stops the runner, so it never outlives the process that drives it; so do SIGTERM and SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from btmm_core.dataplane import open_engine
from btmm_core.dataplane.api import DEFAULT_MTU, Endpoint, Engine, EngineConfig
from btmm_core.dataplane.netconf import configure_tun
from btmm_core.errors import BtmmError, ConfigError
from btmm_core.keyex.driver import KeyExchangeDriver, Report
from btmm_core.keyex.keys import decode_public, derive_psk, load_or_create, ula_of
from btmm_core.keyex.noise import HandshakeConfig, Handshaker
from btmm_core.keyex.session import Established, KeyExchange, SessionConfig
from btmm_core.log import configure_logging


def _endpoint(text: str | None) -> Endpoint | None:
    if text is None:
        return None
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"endpoint {text!r} is not HOST:PORT")
    return Endpoint(host, int(port))


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _open(cfg: dict[str, Any]) -> tuple[Engine, KeyExchange]:
    """Open the engine and configure its TUN device (synchronously: pyroute2's IPRoute cannot
    run inside a running event loop)."""
    static = load_or_create(Path(cfg["key_file"]))
    psk = derive_psk(Path(cfg["secret_file"]).read_bytes())
    session_cfg = SessionConfig(**cfg.get("session", {}))
    hs_cfg = HandshakeConfig(**cfg.get("handshake", {}))
    kx = KeyExchange(Handshaker(static, psk, os.urandom, hs_cfg), session_cfg)
    peers = cfg.get("peers", [])
    for p in peers:
        public = decode_public(p["public"])
        p.setdefault("inner", str(ula_of(public)))
        kx.add_peer(public, p["inner"], _endpoint(p.get("endpoint")))
    mtu = int(cfg.get("mtu", DEFAULT_MTU))
    engine = open_engine(
        EngineConfig(
            tun_name=cfg.get("tun", "btmm0"),
            listen=Endpoint("0.0.0.0", int(cfg.get("listen_port", 4500))),
            mtu=mtu,
        ),
        cfg.get("dataplane"),
    )
    try:
        configure_tun(
            engine.tun_name,
            mtu=mtu,
            address=cfg.get("address", f"{ula_of(static.public)}/128"),
            peers=[p["inner"] for p in peers],
        )
    except BaseException:
        engine.stop()
        raise
    return engine, kx


async def _serve(cfg: dict[str, Any], engine: Engine, kx: KeyExchange) -> None:
    engine.start()

    def report(r: Report) -> None:
        kind = "established" if isinstance(r, Established) else "failed"
        _emit({"event": kind, **asdict(r)})

    driver = KeyExchangeDriver(
        engine, kx, on_report=report, poll_interval=float(cfg.get("poll_interval", 1.0))
    )
    driver.start()
    _emit({"ready": True, "public": kx.handshaker.static.public_b64, "port": engine.local_port})
    for p in cfg.get("peers", []):
        if p.get("connect", True):
            driver.connect(p["inner"])
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, asyncio.current_task().cancel)  # type: ignore[union-attr]
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            if line.strip() == b"stats":
                _emit({"stats": _stats(engine, kx, driver)})
    except asyncio.CancelledError:
        pass  # SIGTERM/SIGINT: stop like at end of stdin
    finally:
        driver.close()


def _stats(engine: Engine, kx: KeyExchange, driver: KeyExchangeDriver) -> dict[str, Any]:
    c = engine.counters()
    return {
        "engine": {**{k: v for k, v in asdict(c).items() if k != "drops"}, "drops": c.drops or {}},
        "peers": [
            {
                "inner": p.inner,
                "endpoint": None if p.endpoint is None else str(p.endpoint),
                "tx_spi": p.tx_spi,
                "rx_spis": list(p.rx_spis),
            }
            for p in engine.peers()
        ],
        "refused": {k: v for k, v in kx.handshaker.refused.items() if v},
        "cookies_sent": kx.handshaker.cookies_sent,
        "cookies_received": kx.handshaker.cookies_received,
        "sessions": {
            inner: {
                "rekeys": s.rekeys,
                "handshakes": s.handshakes,
                "retries": s.retries,
                "collisions": s.collisions,
                "failures": s.failures,
            }
            for inner, s in kx.by_inner.items()
        },
        "driver_errors": driver.errors,
    }


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m btmm_core.keyex.cli CONFIG.json\n")
        return 2
    # stdout carries the JSON protocol; logs go to stderr
    configure_logging("debug")
    try:
        cfg = json.loads(Path(args[0]).read_text())
        engine, kx = _open(cfg)
        with engine:
            asyncio.run(_serve(cfg, engine, kx))
    except (BtmmError, OSError, KeyError, ValueError) as err:
        _emit({"ready": False, "error": f"{type(err).__name__}: {err}"})
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
