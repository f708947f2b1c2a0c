"""DNS Push bench (RFC 8765): ``btmm serve`` on loopback, watchers spread over processes.

    python3 -m bench.push [--watchers 10000] [--zones 2500] [--rate 100] [--duration 30]
                          [--processes 4] [--reps 3] [--skip-fanout] [--skip-load]

Two scenarios per repetition, medians reported:

- **realistic load**: ``--watchers`` sessions over ``--zones`` user zones (watchers/zones per
  zone, each bound by its zone's own key), one subscription each on ``w.<zone>`` AAAA; the parent
  sends ``--rate`` signed UPDATEs per second to random zones for ``--duration`` s, each replacing
  the AAAA with an address that numbers the update. Latency = arrival at a watcher minus the
  moment the UPDATE was sent (one host, one clock), p50 and p99 over every delivery.
- **fan-out**: every watcher subscribed to one name, one update: time until the last has it.

Also: setup time (all sessions subscribed), server RSS and CPU seconds per phase (from /proc),
and the load generator's own ceiling: each worker's CPU use during the measured phase (a worker
near 100 % of a core is the bottleneck, not the server) and the deliveries it handled per CPU
second. Workers are separate processes (``multiprocessing``, spawn), each running its watchers
on one asyncio loop with the project's ``PushWatcher``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update

from bench import REPO
from bench.serve import free_port, serving

PARENT = "members.example."
NS = "ns.members.example"
BASE = int(ipaddress.IPv6Address("fd00::"))


@dataclass(frozen=True)
class Job:
    """What one worker process runs: (zone, key name, key secret, algorithm) per watcher."""

    port: int
    cafile: str
    name_label: str
    watchers: list[tuple[str, str, bytes, str]]


def seq_of(address: str) -> int:
    return int(ipaddress.IPv6Address(address)) - BASE


def _worker(job: Job, conn: Connection) -> None:
    asyncio.run(_work(job, conn))


async def _work(job: Job, conn: Connection) -> None:
    import ssl

    from btmm_core.dns.tsig import HMAC_SHA256, TsigKey
    from btmm_core.push.client import Changes, PushClientConfig, PushState
    from btmm_core.push.driver import PushWatcher

    ctx = ssl.create_default_context(cafile=job.cafile)
    arrivals: list[tuple[int, float]] = []
    watchers: list[PushWatcher] = []
    cfg = PushClientConfig(keepalive_ms=3_600_000)
    for zone, key_name, secret, _alg in job.watchers:
        z = dns.name.from_text(zone)
        key = TsigKey(dns.name.from_text(key_name), HMAC_SHA256, secret, z)
        qname = dns.name.from_text(job.name_label, origin=z)
        w = PushWatcher(("127.0.0.1", job.port), qname, dns.rdatatype.AAAA, key=key,
                        config=cfg, ssl_context=ctx, server_hostname=NS)  # fmt: skip
        watchers.append(w)

    async def drain(w: PushWatcher) -> None:
        while True:
            ev = await w.events.get()
            if isinstance(ev, Changes) and not ev.full:
                now = time.time()
                arrivals.extend((seq_of(r.rdata.to_text()), now) for r in ev.added)

    t0 = time.monotonic()
    tasks = []
    for i in range(0, len(watchers), 100):
        for w in watchers[i : i + 100]:
            await w.start()
            tasks.append(asyncio.create_task(drain(w)))
        while not all(w.client.state == PushState.SUBSCRIBED for w in watchers[i : i + 100]):
            await asyncio.sleep(0.02)
    conn.send(("ready", time.monotonic() - t0))
    loop = asyncio.get_running_loop()
    cpu0, wall0 = time.process_time(), time.monotonic()
    await loop.run_in_executor(None, conn.recv)  # "stop"
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    conn.send(("done", arrivals, cpu, wall))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*(w.close() for w in watchers), return_exceptions=True)


def proc_cpu_rss(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system) and resident memory in bytes of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
    return cpu, rss


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def add_users(state: Path, zones: int) -> list[tuple[str, str, bytes, str]]:
    """``zones`` users straight into the database (the CLI takes ~0.5 s a user)."""
    from btmm_core.registry.accounts import add_user
    from btmm_core.registry.storage import SqliteStorage

    storage = SqliteStorage(state / "registry.sqlite")
    parent = dns.name.from_text(PARENT)
    storage.ensure_zone(parent, None)
    out = []
    for i in range(zones):
        a = add_user(storage, f"u{i}", parent, legacy=False)
        out.append((a.zone.to_text(), a.key.name.to_text(), a.key.secret, "hmac-sha256"))
    storage.close()
    return out


def update(zone: str, key: tuple[str, bytes], label: str, seq: int) -> dns.message.Message:
    u = dns.update.UpdateMessage(zone)
    name = dns.name.from_text(label, origin=dns.name.from_text(zone))
    u.replace(name, 300, "AAAA", str(ipaddress.IPv6Address(BASE + seq)))
    u.use_tsig(dns.tsig.Key(key[0], key[1], "hmac-sha256"))
    return u


def start_workers(
    jobs: list[Job],
) -> tuple[list[mp.process.BaseProcess], list[Connection], float]:
    ctx = mp.get_context("spawn")
    procs: list[mp.process.BaseProcess] = []
    conns: list[Connection] = []
    t0 = time.monotonic()
    for job in jobs:
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(job, child), daemon=True)
        p.start()
        procs.append(p)
        conns.append(parent)
    for c in conns:
        if not c.poll(600):
            raise RuntimeError("a load-generator worker did not get its sessions up in 10 min")
        kind, _ = c.recv()
        assert kind == "ready"
    return procs, conns, time.monotonic() - t0


def stop_workers(
    procs: list[mp.process.BaseProcess], conns: list[Connection]
) -> tuple[list[tuple[int, float]], list[dict[str, float]]]:
    arrivals: list[tuple[int, float]] = []
    ceilings = []
    for c in conns:
        c.send("stop")
    for c in conns:
        _, got, cpu, wall = c.recv()
        arrivals += got
        ceilings.append(
            {"cpu_s": round(cpu, 2), "cpu_share": round(cpu / wall, 3),
             "deliveries_per_cpu_s": round(len(got) / cpu, 1) if cpu > 0 else 0.0}
        )  # fmt: skip
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return arrivals, ceilings


def split(items: list[Any], n: int) -> list[list[Any]]:
    return [items[i::n] for i in range(n)]


def run_load(args: argparse.Namespace, port: int, cafile: str, users: list[Any],
             server_pid: int) -> dict[str, Any]:  # fmt: skip
    per_zone = max(1, args.watchers // len(users))
    watchers = [u for u in users for _ in range(per_zone)][: args.watchers]
    jobs = [Job(port, cafile, "w", part) for part in split(watchers, args.processes)]
    cpu0, _ = proc_cpu_rss(server_pid)
    procs, conns, setup = start_workers(jobs)
    cpu1, rss1 = proc_cpu_rss(server_pid)
    rng = random.Random(1)
    sent: dict[int, tuple[float, str]] = {}
    seq = 1_000_000 * (1 + int(time.time()) % 1000)  # fresh addresses each run
    end = time.monotonic() + args.duration
    next_at = time.monotonic()
    while time.monotonic() < end:
        zone, key_name, secret, _ = rng.choice(users)
        seq += 1
        msg = update(zone, (key_name, secret), "w", seq)
        sent[seq] = (time.time(), zone)
        r = dns.query.udp(msg, "127.0.0.1", port=args.dns_port, timeout=5)
        if r.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"update refused: {dns.rcode.to_text(r.rcode())}")
        next_at += 1 / args.rate
        time.sleep(max(0.0, next_at - time.monotonic()))
    time.sleep(2)  # the last updates' events on their way
    cpu2, rss2 = proc_cpu_rss(server_pid)
    arrivals, ceilings = stop_workers(procs, conns)
    lat = [t - sent[s][0] for s, t in arrivals if s in sent]
    expected = sum(per_zone for _ in sent)
    return {
        "scenario": "load",
        "watchers": len(watchers),
        "zones": len(users),
        "updates": len(sent),
        "updates_per_s": round(len(sent) / args.duration, 1),
        "deliveries": len(lat),
        "deliveries_missing": expected - len(lat),
        "latency_p50_ms": round(pct(lat, 50) * 1000, 2) if lat else -1,
        "latency_p99_ms": round(pct(lat, 99) * 1000, 2) if lat else -1,
        "setup_s": round(setup, 2),
        "server_cpu_s_setup": round(cpu1 - cpu0, 2),
        "server_cpu_share_load": round((cpu2 - cpu1) / (args.duration + 2), 3),
        "server_rss_mib": round(max(rss1, rss2) / 2**20, 1),
        "loadgen": ceilings,
    }


def run_fanout(args: argparse.Namespace, port: int, cafile: str, users: list[Any],
               server_pid: int) -> dict[str, Any]:  # fmt: skip
    zone, key_name, secret, alg = users[0]
    watchers = [(zone, key_name, secret, alg)] * args.watchers
    jobs = [Job(port, cafile, "fan", part) for part in split(watchers, args.processes)]
    procs, conns, setup = start_workers(jobs)
    cpu1, rss1 = proc_cpu_rss(server_pid)
    seq = 2_000_000 * (1 + int(time.time()) % 1000)
    sent = time.time()
    msg = update(zone, (key_name, secret), "fan", seq)
    r = dns.query.udp(msg, "127.0.0.1", port=args.dns_port, timeout=5)
    assert r.rcode() == dns.rcode.NOERROR
    time.sleep(min(5.0, 1.0 + args.watchers / 2000))
    cpu2, rss2 = proc_cpu_rss(server_pid)
    arrivals, ceilings = stop_workers(procs, conns)
    got = [t - sent for s, t in arrivals if s == seq]
    return {
        "scenario": "fanout",
        "watchers": args.watchers,
        "delivered": len(got),
        "last_ms": round(max(got) * 1000, 1) if got else -1,
        "p50_ms": round(pct(got, 50) * 1000, 1) if got else -1,
        "setup_s": round(setup, 2),
        "server_cpu_s_fanout": round(cpu2 - cpu1, 2),
        "server_rss_mib": round(max(rss1, rss2) / 2**20, 1),
        "loadgen": ceilings,
    }


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"scenario": rows[0]["scenario"], "reps": len(rows)}
    for k, v in rows[0].items():
        if isinstance(v, int | float) and k != "rep":
            out[k] = statistics.median(r[k] for r in rows)
    out["loadgen_max_cpu_share"] = max(c["cpu_share"] for r in rows for c in r["loadgen"])
    out["loadgen_cpu_s"] = statistics.median(sum(c["cpu_s"] for c in r["loadgen"]) for r in rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--watchers", type=int, default=10_000)
    ap.add_argument("--zones", type=int, default=2_500)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-fanout", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="btmm-push-bench-", dir="/dev/shm"))
    env = dict(os.environ, BTMM_REGISTRY_DOMAIN=PARENT, BTMM_REGISTRY_STATE=str(state))
    env["PYTHONPATH"] = str(REPO)
    users = add_users(state, args.zones)
    port, tls_port = free_port(), free_port()
    args.dns_port = port
    room = str(args.watchers + 100)
    options = [
        "--tls-port", str(tls_port), "--max-connections", room,
        "--max-connections-per-client", room, "--push-max-per-client", room,
        "--log-level", "warning", "--lease-min", "60",
    ]  # fmt: skip
    try:
        with serving(env, port, options, state / "server.log", PARENT) as server:
            cafile = str(state / "tls" / "dot-cert.pem")
            rows: dict[str, list[dict[str, Any]]] = {"load": [], "fanout": []}
            for rep in range(args.reps):
                for name, fn in (("load", run_load), ("fanout", run_fanout)):
                    if getattr(args, f"skip_{name}"):
                        continue
                    row = fn(args, tls_port, cafile, users, server.pid)
                    row["rep"] = rep
                    rows[name].append(row)
                    print(json.dumps(row), flush=True)
            for rs in rows.values():
                if rs:
                    print(json.dumps({"median": medians(rs)}), flush=True)
    finally:
        log = state / "server.log"
        if log.exists():
            for line in log.read_text(errors="replace").splitlines()[-5:]:
                print("# server:", line, file=sys.stderr)
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
