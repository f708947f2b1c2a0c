"""Shared parts of the namespace end-to-end tests: the two-host lab, `btmm tunnel` processes
driven over their JSON-lines control channel, and small traffic tools.

Run as a script inside a namespace, this file is also the traffic tool:

    e2e_helpers.py recv PORT                 TCP receiver on [::]:PORT; prints progress lines
                                             and finally {"bytes": n, "sha256": h}
    e2e_helpers.py send HOST PORT N [RATE]   TCP sender of N pseudo-random bytes (at most RATE
                                             bytes/s); prints {"bytes": n, "sha256": h}
    e2e_helpers.py udp SRC_HOST SRC_PORT DST_HOST DST_PORT WAIT [MOST]
                                             sends the hex payloads of a JSON list on stdin from
                                             a plain UDP socket, then collects up to MOST replies
                                             for up to WAIT seconds; prints {"replies": [...]}

Every loop here is bounded in count and in time.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btmm_core.dataplane.api import DEFAULT_MTU

REPO = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).resolve()

# Outer ("internet") addresses: documentation ranges of both families; inner: ULA.
A_OUTER, B_OUTER, A_ROAMED = "192.0.2.1", "192.0.2.2", "192.0.2.11"
A_OUTER6, B_OUTER6, A_ROAMED6 = "2001:db8:b7::1", "2001:db8:b7::2", "2001:db8:b7::11"
A_INNER, B_INNER = "fd00:b7:1::1", "fd00:b7:1::2"
PORT = 4500
#: the outer addresses (a, b, a's roamed one) of each underlay family
OUTER = {4: (A_OUTER, B_OUTER, A_ROAMED), 6: (A_OUTER6, B_OUTER6, A_ROAMED6)}


def endpoint(host: str, port: int = PORT) -> str:
    """An endpoint as `btmm tunnel` writes it: ``a.b.c.d:port`` or ``[IPv6]:port``."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


CHUNK = 64 * 1024


def keymat() -> str:
    """Fresh keying material for one SA: 32-byte AES key + 4-byte salt, hex."""
    return secrets.token_hex(36)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


class LineReader:
    """Reads a pipe line by line in a thread so that the test can wait with a timeout."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def get(self, timeout: float, what: str) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {what} within {timeout:.0f} s") from None
        if line is None:
            raise AssertionError(f"the process ended before {what}")
        return line


@dataclass
class Tunnel:
    """A `btmm tunnel` process in a namespace, driven over stdin/stdout."""

    name: str
    ns: Any  # btmm_core.lab.netns.Netns
    kind: str
    config: dict[str, Any]
    workdir: Path
    #: extra environment for the `btmm tunnel` process, e.g. {"BTMM_TUN_OFFLOAD": "0"}
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    ready: dict[str, Any] = field(default_factory=dict)
    _out: LineReader | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"tunnel-{self.name}.log"

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text()[-n:]
        except OSError:
            return ""

    def start(self, timeout: float = 90.0) -> dict[str, Any]:
        cfg = self.workdir / f"tunnel-{self.name}.json"
        cfg.write_text(json.dumps({**self.config, "dataplane": self.kind}))
        self.proc = self.ns.popen(
            [sys.executable, "-m", "btmm_core.cli", "tunnel", str(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_path.open("w"),
            text=True,
            env={**env(), **self.extra_env},
            cwd=str(REPO),
        )
        assert self.proc.stdout is not None
        self._out = LineReader(self.proc.stdout)
        try:
            line = self._out.get(timeout, f"ready line from tunnel {self.name}")
        except AssertionError as err:
            raise AssertionError(f"{err}; log:\n{self.log_tail()}") from None
        self.ready = json.loads(line)
        assert self.ready.get("ready") is True, (
            f"tunnel {self.name} ({self.kind}) did not start: {self.ready}\n{self.log_tail()}"
        )
        assert self.ready.get("engine") == self.kind, self.ready
        return self.ready

    def tun_vnet_hdr(self) -> bool:
        """Whether the kernel says this tunnel's TUN device takes virtio-net headers (the
        offloads' switch), from ``ip -details link``: the kernel's view, not the engine's."""
        dev = str(self.ready.get("tun") or self.config["tun"])
        out = self.ns.run(["ip", "-details", "link", "show", "dev", dev]).stdout
        for flag in ("vnet_hdr on", "vnet_hdr off"):
            if flag in out:
                return flag.endswith("on")
        raise AssertionError(f"ip -details link shows no vnet_hdr flag for {dev}:\n{out}")

    def request(self, cmd: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self._out is not None
        self.assert_alive()
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()
        line = self._out.get(timeout, f"answer to {cmd} from tunnel {self.name}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ok(self, cmd: str, **fields: Any) -> dict[str, Any]:
        answer = self.request(cmd, **fields)
        assert answer.get("ok") is True, f"{cmd} {fields} failed on {self.name}: {answer}"
        return answer

    def counters(self) -> dict[str, Any]:
        c: dict[str, Any] = self.ok("counters")["counters"]
        return c

    def drops(self) -> dict[str, int]:
        d: dict[str, int] = self.counters()["drops"]
        return d

    def peers(self) -> dict[str, dict[str, Any]]:
        return {p["inner"]: p for p in self.ok("peers")["peers"]}

    def events(self) -> list[dict[str, Any]]:
        ev: list[dict[str, Any]] = self.ok("events")["events"]
        return ev

    def assert_alive(self) -> None:
        assert self.proc is not None
        code = self.proc.poll()
        assert code is None, f"tunnel {self.name} exited with {code}; log:\n{self.log_tail()}"

    def close_stdin(self, timeout: float = 15.0) -> int:
        """End the control channel (stdin): the tunnel must stop by itself; its exit status."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def stop(self, timeout: float = 15.0) -> int:
        """Ask the tunnel to quit and return its exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            try:
                self.ok("quit")
            finally:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            self.proc.wait(timeout=timeout)
        return self.proc.returncode


def pair_configs(
    a_kind: str,
    b_kind: str,
    *,
    a_extra_peers: list[dict[str, Any]] | None = None,
    family: int = 4,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Matching static configurations for hosts a and b (one SA each way), each with the
    other's outer address of ``family`` as its endpoint. The inner MTU is the default one,
    which fits a 1500-byte path over either family."""
    a_out, b_out, _ = OUTER[family]
    k_ab, k_ba = keymat(), keymat()
    spi_ab, spi_ba = 0x1000 + secrets.randbelow(1 << 20), 0x2000000 + secrets.randbelow(1 << 20)
    a = {
        "dataplane": a_kind,
        "tun": "btmm0",
        "mtu": DEFAULT_MTU,
        "address": f"{A_INNER}/64",
        "listen_port": PORT,
        "peers": [
            {
                "inner": B_INNER,
                "endpoint": endpoint(b_out),
                "tx_spi": spi_ab,
                "tx_key": k_ab,
                "rx_spi": spi_ba,
                "rx_key": k_ba,
            },
            *(a_extra_peers or []),
        ],
    }
    b = {
        "dataplane": b_kind,
        "tun": "btmm0",
        "mtu": DEFAULT_MTU,
        "address": f"{B_INNER}/64",
        "listen_port": PORT,
        "peers": [
            {
                "inner": A_INNER,
                "endpoint": endpoint(a_out),
                "tx_spi": spi_ba,
                "tx_key": k_ba,
                "rx_spi": spi_ab,
                "rx_key": k_ab,
            },
        ],
    }
    return a, b


def two_hosts(lab: Any) -> tuple[Any, Any]:
    """Namespaces a and b joined by a veth pair, outer addresses 192.0.2.1 and .2 /24 and
    2001:db8:b7::1 and ::2 /64 (both usable at once: the lab turns DAD off)."""
    a, b = lab.ns("a"), lab.ns("b")
    lab.veth(a, "eth0", b, "eth0")
    # Removing the primary address of a subnet must keep the roaming secondary one.
    a.run(["sysctl", "-qw", "net.ipv4.conf.eth0.promote_secondaries=1"])
    a.run(["ip", "addr", "add", f"{A_OUTER}/24", "dev", "eth0"])
    b.run(["ip", "addr", "add", f"{B_OUTER}/24", "dev", "eth0"])
    a.run(["ip", "-6", "addr", "add", f"{A_OUTER6}/64", "dev", "eth0", "nodad"])
    b.run(["ip", "-6", "addr", "add", f"{B_OUTER6}/64", "dev", "eth0", "nodad"])
    return a, b


def ping6(ns: Any, dest: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[str] = ns.run(
        ["ping", "-6", "-n", "-c", str(count), "-i", "0.2", "-W", "2", dest],
        check=False,
        timeout=90,
    )
    return result


def helper_argv(*args: str) -> list[str]:
    return [sys.executable, str(HELPER), *args]


@dataclass(frozen=True)
class TransferResult:
    sent: dict[str, Any]
    received: dict[str, Any]


def transfer(
    sender: Any,
    receiver: Any,
    dest: str,
    size: int,
    *,
    rate: float = 0.0,
    port: int = 5001,
    at_fraction: float | None = None,
    action: Callable[[], None] | None = None,
    timeout: float = 180.0,
    actions: list[tuple[float, Callable[[], None]]] | None = None,
) -> TransferResult:
    """Send ``size`` bytes over TCP from namespace ``sender`` to ``dest`` (in ``receiver``);
    when ``action`` is given, run it once the receiver has ``at_fraction`` of the data (and
    each of ``actions``, ``(fraction, action)`` in order, likewise)."""
    pending = sorted(actions or [], key=lambda fa: fa[0])
    if action is not None:
        pending.insert(0, (at_fraction or 0.0, action))
    recv = receiver.popen(
        helper_argv("recv", str(port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    lines = LineReader(recv.stdout)
    assert json.loads(lines.get(60, "the receiver to listen")) == {"listening": port}
    send = sender.popen(
        helper_argv("send", dest, str(port), str(size), str(rate)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    deadline = time.monotonic() + timeout
    received: dict[str, Any] = {}
    while not received:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the {size}-byte transfer did not finish in {timeout:.0f} s")
        try:
            msg = json.loads(lines.get(left, "the end of the transfer"))
        except AssertionError as err:
            raise AssertionError(
                f"{err}; receiver stderr: {_stderr(recv)}; sender stderr: {_stderr(send)}"
            ) from None
        while "progress" in msg and pending and msg["progress"] >= size * pending[0][0]:
            pending.pop(0)[1]()
        if "sha256" in msg:
            received = msg
    assert not pending, "the transfer ended before every mid-transfer action ran"
    out, errors = send.communicate(timeout=max(5.0, deadline - time.monotonic()))
    assert send.returncode == 0, f"sender failed ({send.returncode}): {errors[-2000:]}"
    recv.wait(timeout=10)
    return TransferResult(json.loads(out.strip().splitlines()[-1]), received)


def _stderr(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None or proc.stderr is None:
        return "(still running)"
    return proc.stderr.read()[-2000:]


def icmp6_echo(
    src: str, dst: str, ident: int, seq: int, data: bytes, *, reply: bool = False
) -> bytes:
    """An IPv6 packet carrying an ICMPv6 echo request (or reply), checksum per RFC 4443 §2.3."""
    import ipaddress
    import struct

    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    body = struct.pack(">BBHHH", 129 if reply else 128, 0, 0, ident, seq) + data
    pseudo = s + d + struct.pack(">I3xB", len(body), 58) + body
    if len(pseudo) % 2:
        pseudo += b"\0"
    total = sum(struct.unpack(f">{len(pseudo) // 2}H", pseudo))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    body = body[:2] + struct.pack(">H", ~total & 0xFFFF) + body[4:]
    header = struct.pack(">IHBB", 6 << 28, len(body), 58, 64) + s + d
    return header + body


def flat_counters(c: dict[str, Any]) -> dict[str, int]:
    out = {k: int(v) for k, v in c.items() if k != "drops"}
    out.update({f"drops.{k}": int(v) for k, v in (c.get("drops") or {}).items()})
    return out


# ---------------------------------------------------------------------------------------------
# Script mode: the traffic tools that run inside the namespaces.


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _recv(port: int) -> None:
    srv = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("::", port))
    srv.listen(1)
    _emit({"listening": port})
    srv.settimeout(60)
    conn, _ = srv.accept()
    conn.settimeout(30)
    digest, total, next_report = hashlib.sha256(), 0, 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        data = conn.recv(1 << 20)
        if not data:
            break
        digest.update(data)
        total += len(data)
        if total >= next_report:
            _emit({"progress": total})
            next_report = total + (1 << 20)
    else:
        raise SystemExit("receiver: the transfer did not end within 300 s")
    conn.close()
    _emit({"bytes": total, "sha256": digest.hexdigest()})


def _send(host: str, port: int, size: int, rate: float) -> None:
    rng = random.Random(secrets.randbits(64))
    sock = socket.create_connection((host, port), timeout=30)
    digest, sent = hashlib.sha256(), 0
    start = time.monotonic()
    while sent < size:
        chunk = rng.randbytes(min(CHUNK, size - sent))
        sock.sendall(chunk)
        digest.update(chunk)
        sent += len(chunk)
        if rate > 0:
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        if time.monotonic() - start > 300:
            raise SystemExit("sender: the transfer did not end within 300 s")
    sock.shutdown(socket.SHUT_WR)
    # Wait for the receiver to close: all data reached it.
    sock.settimeout(60)
    while sock.recv(4096):
        pass
    sock.close()
    _emit({"bytes": sent, "sha256": digest.hexdigest()})


def _udp(
    src_host: str, src_port: int, dst_host: str, dst_port: int, wait: float, most: int = 100
) -> None:
    payloads = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
    family = socket.AF_INET6 if ":" in src_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((src_host, src_port))
    for p in payloads[:10_000]:
        sock.sendto(p, (dst_host, dst_port))
        time.sleep(0.01)
    replies: list[dict[str, str]] = []
    deadline = time.monotonic() + wait
    while len(replies) < most:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(65535)
        except TimeoutError:
            break
        replies.append({"source": endpoint(addr[0], addr[1]), "payload": data.hex()})
    _emit({"replies": replies})


def main(argv: list[str]) -> None:
    cmd, *args = argv
    if cmd == "recv":
        _recv(int(args[0]))
    elif cmd == "send":
        _send(args[0], int(args[1]), int(args[2]), float(args[3]) if len(args) > 3 else 0.0)
    elif cmd == "udp":
        _udp(args[0], int(args[1]), args[2], int(args[3]), float(args[4]), *map(int, args[5:6]))
    else:
        raise SystemExit(f"unknown helper command {cmd!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
