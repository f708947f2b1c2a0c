"""Drive ``python -m btmm_core.keyex.cli`` processes inside lab namespaces (tests only)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from e2e_helpers import A_OUTER, B_OUTER, PORT, LineReader, env

from btmm_core.keyex.keys import StaticKey, ula_of

#: fixed device keys for hosts a and b, so that their inner addresses (bound to the keys)
#: are known in advance
KEYS = {n: StaticKey.from_private(hashlib.sha256(b"kx netns " + n.encode()).digest())
        for n in ("a", "b")}
A_INNER, B_INNER = (str(ula_of(KEYS[n].public)) for n in ("a", "b"))


def device_key(path: Path, name: str) -> StaticKey:
    """Write host ``name``'s fixed device key to ``path`` (mode 0600, as btmm makes it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(base64.b64encode(KEYS[name].private) + b"\n")
    return KEYS[name]


def device_key_file(work: Path, name: str) -> Path:
    """``work/NAME.key`` holding host ``name``'s fixed device key, written on first use."""
    path = work / f"{name}.key"
    if not path.exists():
        device_key(path, name)
    return path


class Runner:
    def __init__(self, ns: Any, name: str, cfg: dict[str, Any], work: Path) -> None:
        path = work / f"{name}.json"
        path.write_text(json.dumps(cfg))
        self.name = name
        self.log = work / f"{name}.log"
        self.proc = ns.popen(
            [sys.executable, "-m", "btmm_core.keyex.cli", str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            env=env(),
        )
        self.lines = LineReader(self.proc.stdout)
        self.events: list[dict[str, Any]] = []

    def next(self, timeout: float, what: str) -> dict[str, Any]:
        try:
            msg: dict[str, Any] = json.loads(self.lines.get(timeout, f"{self.name}: {what}"))
        except AssertionError as err:
            raise AssertionError(
                f"{err}\n{self.name} log:\n{self.log.read_text()[-3000:]}"
            ) from None
        return msg

    def wait_event(self, kind: str, timeout: float) -> dict[str, Any]:
        while True:
            msg = self.next(timeout, f"a {kind} event")
            if "event" in msg:
                self.events.append(msg)
                if msg["event"] == kind:
                    return msg

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        while True:
            msg = self.next(10, "stats")
            if "stats" in msg:
                return msg["stats"]  # type: ignore[no-any-return]
            self.events.append(msg)

    def stop(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=60)


def runner_config(
    kind: str,
    me: str,
    key: Path,
    secret: Path,
    peer_pub: str,
    peer_inner: str,
    peer_outer: str,
    session: dict[str, Any],
    *,
    port: int = PORT,
    connect: bool = True,
    handshake: dict[str, Any] | None = None,
    poll_interval: float = 0.2,
) -> dict[str, Any]:
    return {
        "handshake": handshake or {},
        "dataplane": kind,
        "tun": "btmm0",
        "mtu": 1420,
        "address": f"{me}/128",
        "listen_port": port,
        "key_file": str(key),
        "secret_file": str(secret),
        "session": session,
        "poll_interval": poll_interval,
        "peers": [
            {
                "public": peer_pub,
                "inner": peer_inner,
                "endpoint": f"{peer_outer}:{port}",
                "connect": connect,
            }
        ],
    }


_OTHER = {"a": "b", "b": "a"}
_INNER = {"a": A_INNER, "b": B_INNER}
_OUTER = {"a": A_OUTER, "b": B_OUTER}


def host_runner(
    ns: Any,
    name: str,
    work: Path,
    secret: Path,
    session: dict[str, Any],
    *,
    kind: str = "python",
    peer_public: str | None = None,
    peer_inner: str | None = None,
    **options: Any,
) -> Runner:
    """Start host ``name`` (``a`` or ``b``, its fixed key written to ``work/NAME.key``) with the
    other host as its one peer, trusted by its fixed key unless ``peer_public``/``peer_inner``
    say otherwise; ``options`` go to ``runner_config``."""
    other = _OTHER[name]
    cfg = runner_config(
        kind,
        _INNER[name],
        device_key_file(work, name),
        secret,
        peer_public or KEYS[other].public_b64,
        peer_inner or _INNER[other],
        _OUTER[other],
        session,
        **options,
    )
    return Runner(ns, name, cfg, work)
