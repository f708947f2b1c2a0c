"""LLQ bench (RFC 8764): event latency (update sent -> event received) p50/p99 and events per
second, with N long-lived queries on one name, ``btmm serve`` on loopback.

    python3 -m bench.llq [--llqs 1000 10000] [--updates 10] [--reps 1]

All watchers live in this one process (one UDP socket each, asyncio): what is measured is the
whole loop, server and clients, on a shared 2-core machine. Each update is sent after the
previous one reached every watcher. Latency is taken per watcher per update; events/s per
update is N / (time from sending the update to the last watcher receiving it), the median over
updates is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update

from bench import REPO
from bench.serve import free_port, serving
from btmm_core.dns.keyfile import read_key
from btmm_core.llq.client import Changes as ChangesOut
from btmm_core.llq.client import ClientConfig, ClientState, Output
from btmm_core.llq.driver import Watcher

PARENT = "members.example."
NAME = dns.name.from_text("bench.bob.members.example.")


class TimedWatcher(Watcher):
    """Notes when each pushed (not full-answer) change arrives."""

    arrivals: list[float]

    def _emit(self, outputs: list[Output]) -> None:
        now = time.monotonic()
        for o in outputs:
            if isinstance(o, ChangesOut) and not o.full:
                self.arrivals.append(now)
        super()._emit(outputs)
        # The bench reads arrivals, not the queue: keep it from growing.
        while not self.events.empty():
            self.events.get_nowait()


def udp_drops(ports: set[int]) -> int:
    """Datagrams the kernel dropped on the UDP sockets bound to ``ports`` (receive buffer full),
    from the ``drops`` column of /proc/net/udp: exact per socket, unlike the system-wide
    UdpRcvbufErrors that other processes on the machine also add to."""
    total = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) in ports:
                total += int(fields[-1])
    return total


def udp_rcvbuf_errors() -> int:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def establish(port: int, key_path: Path, n: int) -> list[TimedWatcher]:
    """``n`` watchers of NAME, started 200 at a time, all with an established LLQ."""
    key = read_key(key_path)
    cfg = ClientConfig(lease=7200)
    watchers = [
        TimedWatcher(("127.0.0.1", port), NAME, dns.rdatatype.AAAA, key=key, config=cfg)
        for _ in range(n)
    ]
    for w in watchers:
        w.arrivals = []
    t0 = time.monotonic()
    for i in range(0, n, 200):
        await asyncio.gather(*(w.start() for w in watchers[i : i + 200]))
        await asyncio.sleep(0.05)
    while not all(w.client.state == ClientState.ESTABLISHED for w in watchers):
        if time.monotonic() - t0 > 300:
            states: dict[str, int] = {}
            for w in watchers:
                states[w.client.state.value] = states.get(w.client.state.value, 0) + 1
            raise RuntimeError(f"LLQs not established in 5 minutes: {states}")
        await asyncio.sleep(0.1)
    return watchers


def update(tkey: dns.tsig.Key, u: int) -> dns.message.Message:
    """Update ``u`` of a round: even ones add the record, odd ones delete it, so each one
    changes the RRset once the round started without it (``clear``)."""
    msg = dns.update.UpdateMessage("bob.members.example.")
    if u % 2 == 0:
        msg.add(NAME, 300, "AAAA", "fd00::b")
    else:
        msg.delete(NAME, "AAAA", "fd00::b")
    msg.use_tsig(tkey)
    return msg


async def send_update(port: int, msg: dns.message.Message) -> None:
    r = await asyncio.to_thread(dns.query.udp, msg, "127.0.0.1", port=port, timeout=5)
    if r.rcode() != dns.rcode.NOERROR:
        raise RuntimeError(f"bench update refused: {dns.rcode.to_text(r.rcode())}")


async def clear(port: int, tkey: dns.tsig.Key) -> None:
    """Delete NAME's AAAA RRset before a round's watchers exist. Without it a round after one
    with an odd number of updates began with the record present: its first update (an add)
    changed nothing, so no event went out and every watcher "missed" it (issue 18)."""
    msg = dns.update.UpdateMessage("bob.members.example.")
    msg.delete(NAME, "AAAA")
    msg.use_tsig(tkey)
    await send_update(port, msg)


async def push_updates(
    port: int, tkey: dns.tsig.Key, watchers: list[TimedWatcher], updates: int
) -> tuple[list[float], list[float], list[int]]:
    """Each update sent once the previous one reached every watcher (or 60 s passed): the
    latencies, the events/s per update and, per update, how many watchers missed it."""
    n = len(watchers)
    latencies: list[float] = []
    rates: list[float] = []
    missed: list[int] = []
    for u in range(updates):
        msg = update(tkey, u)
        sent = time.monotonic()
        await send_update(port, msg)
        while sum(len(w.arrivals) > u for w in watchers) < n:
            if time.monotonic() - sent > 60:
                break
            await asyncio.sleep(0.005)
        got = [w.arrivals[u] - sent for w in watchers if len(w.arrivals) > u]
        missed.append(n - len(got))
        latencies += got
        if missed[-1]:
            # An LLQ dropped after unacknowledged events: its client only learns at the
            # next refresh. Count it and stop: later arrivals no longer line up by index.
            if got:
                rates.append(len(got) / max(got))
            break
        rates.append(n / max(got))
    return latencies, rates, missed


async def run(port: int, key_path: Path, n: int, updates: int) -> dict[str, float | int]:
    key = read_key(key_path)
    tkey = dns.tsig.Key(key.name, key.secret, key.algorithm)
    await clear(port, tkey)
    t0 = time.monotonic()
    watchers = await establish(port, key_path, n)
    setup_s = time.monotonic() - t0
    client_ports = {w.local_address[1] for w in watchers}
    drops0 = udp_drops({port}), udp_drops(client_ports), udp_rcvbuf_errors()
    latencies: list[float] = []
    rates: list[float] = []
    missed: list[int] = []
    try:
        latencies, rates, missed = await push_updates(port, tkey, watchers, updates)
    finally:
        drops1 = udp_drops({port}), udp_drops(client_ports), udp_rcvbuf_errors()
        await asyncio.gather(*(w.close() for w in watchers))
        await asyncio.sleep(1.0)  # let the server read the cancels
        drops2 = udp_drops({port})
    return {
        "llqs": n,
        "setup_s": round(setup_s, 2),
        "latency_p50_ms": round(pct(latencies, 50) * 1000, 2) if latencies else -1,
        "latency_p99_ms": round(pct(latencies, 99) * 1000, 2) if latencies else -1,
        "events_per_s": round(statistics.median(rates), 1) if rates else 0,
        "updates_done": len(missed),
        "llqs_missing_an_event_after_60s": missed[-1] if missed else 0,
        # Kernel drops during the updates: the registry's socket, the watchers' sockets, and
        # the machine-wide UdpRcvbufErrors (other processes included) for comparison.
        "server_socket_drops": drops1[0] - drops0[0],
        "watcher_socket_drops": drops1[1] - drops0[1],
        "udp_rcvbuf_errors_system": drops1[2] - drops0[2],
        # While every watcher cancels at once at the end (lost cancels only cost a lease).
        "server_socket_drops_at_close": drops2 - drops1[0],
    }


def server_counters(log: Path) -> None:
    """The server's LLQ counters (events, resends, acks, drops), logged as it stops."""
    for line in log.read_text(errors="replace").splitlines():
        if "llq stopped" in line or "udp receive buffer" in line:
            print("# server:", line.strip(), file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llqs", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="btmm-llq-bench-"))
    env = dict(os.environ, BTMM_REGISTRY_DOMAIN=PARENT, BTMM_REGISTRY_STATE=str(state))
    env["PYTHONPATH"] = str(REPO)
    port = free_port()
    # Room for every run's LLQs: a cancel lost at the end of one run leaves its LLQ until the
    # lease ends, and the next run must not meet SERV-FULL.
    room = str(sum(args.llqs) * args.reps + 10)
    options = ["--llq-max-total", room, "--llq-max-per-client", room, "--log-level", "info"]
    try:
        with serving(env, port, options, state / "server.log", PARENT):
            for rep in range(args.reps):
                for n in args.llqs:
                    key = state / "credentials" / "bob.key"
                    res = asyncio.run(run(port, key, n, args.updates))
                    res["rep"] = rep
                    print(json.dumps(res), flush=True)
    finally:
        if (state / "server.log").exists():
            server_counters(state / "server.log")
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
