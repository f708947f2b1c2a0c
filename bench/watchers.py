"""LLQ and DNS Push at N watchers, one command: ``btmm serve`` on loopback, the watchers spread
over worker processes (issue 18's "done when").

    python3 -m bench.watchers [--transport llq push] [--watchers 10000] [--zones 2500]
                              [--rate 100] [--duration 30] [--processes 4] [--reps 3]
                              [--skip-load] [--skip-fanout] [--shared-keys]

Per transport, one server process serves every repetition (a server that degrades from one
repetition to the next shows in the figures), and per repetition:

- **setup**: time until every watcher is established (LLQ: challenge answered, ACK received;
  Push: bound, subscribed, first PUSH received), and the server's CPU seconds for it;
- **realistic load**: ``--watchers`` over ``--zones`` user zones (watchers/zones per zone),
  each watching ``w.<zone>`` AAAA; ``--rate`` signed UPDATEs per second to random zones for
  ``--duration`` s, each replacing the AAAA with an address that numbers the update.
  Latency = arrival at a watcher minus the moment the UPDATE was sent (one host, one clock),
  p50 and p99 over every delivery. LLQ may merge changes that come while an event waits for
  its acknowledgement (RFC 8764 allows it, the server does it): those count as merged, not
  as deliveries;
- **fan-out**: every watcher on one name, one update: time until the last watcher has it;
- server RSS (MiB, after the phase) and CPU seconds (from /proc);
- the load generator's own ceiling: each worker's CPU share during the measured phase and the
  deliveries it handled per CPU second. A worker near 1.0 (a whole core) means the figure
  measures the load generator, not the server.

Each watcher signs with its own device key, as hosts do. ``--shared-keys`` gives all watchers
of a zone its account key instead (what bench.push did): the registry refuses a signed
message whose Time Signed is older than the newest it accepted for that key (the replay rule
of issue 11), so watchers sharing a key in several processes are refused now and then when
their clocks straddle a second, and each refusal costs a retry after 2 s. That, and starting
watchers in batches that wait for their slowest member, is what made 10,000 LLQ setups take
93 s.

Everything runs waits for conditions with deadlines; results are printed as JSON lines (one
per phase and repetition, then ``{"median": ...}`` per transport and scenario) and nothing is
written into the repository. The machine is shared: the figures are noisy, compare medians.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import multiprocessing as mp
import os
import random
import secrets
import shutil
import statistics
import struct
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import dns.name
import dns.query
import dns.rcode

from bench import REPO
from bench.push import BASE, pct, proc_cpu_rss, seq_of, split, update
from bench.serve import free_ports, serving

PARENT = "members.example."
NS = "ns.members.example"
TRANSPORTS = ("llq", "push")

#: (zone, key name, key secret) of one watcher
KeyRef = tuple[str, str, bytes]


def light_llq_event(wire: bytes, sign: Any, now: int) -> tuple[list[int], bytes] | None:
    """``--light``: an LLQ event read without dnspython, and its signed acknowledgement.

    What the real client sends back (header ID and QR, the question, OPT with the LLQ option,
    TSIG as a response to the event's MAC), built from the event's bytes; the event is not
    verified (the bench trusts its own server; tests/llq checks the real client). None when
    the message is not an event: the real client handles it.
    """
    from btmm_core.dns.wire import after_questions, rrs, skip_name

    if len(wire) < 12 or not wire[2] & 0x80:
        return None
    msg_id = wire[:2]
    q_end = after_questions(wire)
    seqs: list[int] = []
    llq: bytes | None = None
    mac = b""
    for rr in rrs(wire):
        if rr.rdtype == 28 and rr.rdlength == 16 and rr.ttl != 0xFFFFFFFF:
            seqs.append(int.from_bytes(wire[rr.rdata : rr.end]) - BASE)
        elif rr.rdtype == 41 and rr.rdlength == 22:
            llq = wire[rr.rdata + 4 : rr.end]
        elif rr.rdtype == 250:
            p = skip_name(wire, rr.rdata) + 8  # algorithm, Time Signed, Fudge
            (size,) = struct.unpack_from("!H", wire, p)
            mac = wire[p + 2 : p + 2 + size]
    if llq is None or struct.unpack_from("!H", llq, 2)[0] != 3:  # not an EVENT
        return None
    ack = b"".join(
        (
            msg_id, b"\x80\x00\x00\x01\x00\x00\x00\x00\x00\x01", wire[12:q_end],
            b"\x00", struct.pack("!HHIHHH", 41, 1232, 0, 22, 1, 18), llq,
        )
    )  # fmt: skip
    signed, _ = sign(ack, time_signed=now, fudge=300, request_mac=mac)
    return seqs, signed


def light_push(wire: bytes) -> list[int] | None:
    """``--light``: the AAAA adds of a PUSH read without dnspython (names are not compressed
    in our server's PUSHes); None when the message is not a PUSH."""
    if len(wire) < 16 or (wire[2] >> 3) & 0xF != 6 or struct.unpack_from("!H", wire, 12)[0] != 0x41:
        return None
    end = 16 + struct.unpack_from("!H", wire, 14)[0]
    p, seqs = 16, []
    while p < end:
        while wire[p]:
            p += 1 + wire[p]
        rdtype, _, ttl, rdlen = struct.unpack_from("!HHIH", wire, p + 1)
        p += 11
        if rdtype == 28 and rdlen == 16 and ttl <= 0x7FFFFFFF:
            seqs.append(int.from_bytes(wire[p : p + 16]) - BASE)
        p += rdlen
    return seqs


@dataclass(frozen=True)
class Job:
    """What one worker process runs."""

    transport: str
    #: the UDP port (LLQ) or the DoT port (Push)
    port: int
    cafile: str
    label: str
    watchers: list[KeyRef]
    #: watchers being set up at once in this worker
    window: int = 100
    #: events and PUSHes read (and LLQ events acknowledged) without dnspython once set up
    light: bool = False


def _worker(job: Job, conn: Connection) -> None:
    asyncio.run(_work(job, conn))


async def _work(job: Job, conn: Connection) -> None:
    import ssl

    import dns.rdatatype

    from btmm_core.dns.tsig import HMAC_SHA256, TsigKey
    from btmm_core.llq.client import Changes as LLQChanges
    from btmm_core.llq.client import ClientConfig, ClientState, Send
    from btmm_core.llq.driver import Watcher
    from btmm_core.llq.fastwire import KeyWire
    from btmm_core.push.client import Changes as PushChanges
    from btmm_core.push.client import PushClientConfig, PushState
    from btmm_core.push.driver import PushWatcher

    ctx = ssl.create_default_context(cafile=job.cafile) if job.transport == "push" else None
    arrivals: list[tuple[int, float]] = []
    latest = [0] * len(job.watchers)
    zones = [zone for zone, _, _ in job.watchers]
    watchers: list[Any] = []
    for zone, key_name, secret in job.watchers:
        z = dns.name.from_text(zone)
        key = TsigKey(dns.name.from_text(key_name), HMAC_SHA256, secret, z)
        qname = dns.name.from_text(job.label, origin=z)
        if job.transport == "push":
            watchers.append(
                PushWatcher(("127.0.0.1", job.port), qname, dns.rdatatype.AAAA, key=key,
                            config=PushClientConfig(keepalive_ms=3_600_000), ssl_context=ctx,
                            server_hostname=NS)
            )  # fmt: skip
        else:
            watchers.append(
                Watcher(("127.0.0.1", job.port), qname, dns.rdatatype.AAAA, key=key,
                        config=ClientConfig(lease=7200))
            )  # fmt: skip

    def ready(w: Any) -> bool:
        if job.transport == "push":
            return bool(w.client.state == PushState.SUBSCRIBED)
        return bool(w.client.state == ClientState.ESTABLISHED)

    async def drain(i: int, w: Any) -> None:
        while True:
            ev = await w.events.get()
            if isinstance(ev, LLQChanges | PushChanges) and not ev.full:
                record(i, [seq_of(r.rdata.to_text()) for r in ev.added])

    async def until(cond: Any, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                return False
            await asyncio.sleep(0.01)
        return True

    def record(i: int, seqs: list[int]) -> None:
        now = time.time()
        for seq in seqs:
            arrivals.append((seq, now))
            latest[i] = max(latest[i], seq)

    def light_receive(i: int, slow: Any, kw: KeyWire, wire: bytes, now: float) -> list[Any]:
        if job.transport == "push":
            seqs = light_push(wire)
            if seqs is None:
                return list(slow(wire, now))
            record(i, seqs)
            return []
        got = light_llq_event(wire, kw.sign, int(now))
        if got is None:
            return list(slow(wire, now))
        record(i, got[0])
        return [Send(got[1])]

    def room_among(started: int) -> bool:
        return sum(not ready(w) for w in watchers[:started]) < job.window

    def behind(want: list[int]) -> int:
        return sum(have < need for have, need in zip(latest, want, strict=True))

    def caught_up(want: list[int]) -> bool:
        return behind(want) == 0

    t0 = time.monotonic()
    tasks = []
    started = 0
    # a sliding window: never more than ``window`` watchers setting up at once
    while started < len(watchers):
        setting_up = sum(not ready(w) for w in watchers[:started])
        for i in range(started, min(len(watchers), started + job.window - setting_up)):
            await watchers[i].start()
            tasks.append(asyncio.create_task(drain(i, watchers[i])))
            started += 1
        await until(functools.partial(room_among, started), 600)
    if not await until(lambda: all(ready(w) for w in watchers), 600):
        raise RuntimeError("watchers not set up in 10 minutes")
    # what came during setup (a Push subscription's first PUSH holds the record as the last
    # phase left it) is not a delivery of this phase
    arrivals.clear()
    latest[:] = [0] * len(latest)
    if job.light:
        for i, w in enumerate(watchers):
            w.client.receive = functools.partial(light_receive, i, w.client.receive,
                                                 KeyWire(w.client.key))  # fmt: skip
    conn.send(("ready", time.monotonic() - t0, time.process_time()))
    loop = asyncio.get_running_loop()
    cpu0, wall0 = time.process_time(), time.monotonic()
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd[0] == "wait":
            # every watcher of a zone has the zone's last update (or the deadline passed)
            _, expected, timeout = cmd
            want = [expected.get(z, 0) for z in zones]
            await until(functools.partial(caught_up, want), timeout)
            conn.send(("waited", behind(want)))
        else:  # "stop"
            break
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    conn.send(("done", arrivals, cpu, wall))
    for t in tasks:
        t.cancel()
    # a hundred at a time: 2,500 LLQ cancels at once overflow the server's receive buffer,
    # and a lost cancel leaves the LLQ until its lease ends (the next phase then finds the
    # server fuller and fuller: SERV-FULL, retry in 5 min)
    for i in range(0, len(watchers), 100):
        await asyncio.gather(*(w.close() for w in watchers[i : i + 100]), return_exceptions=True)


def make_keys(state: Path, zones: int, per_zone: int, fanout: int, shared: bool) -> dict[str, Any]:
    """``zones`` users straight into the database (the CLI takes ~0.5 s a user) and a device
    key for every watcher: ``per_zone`` in each zone for the load, ``fanout`` in the first zone
    for the fan-out. ``shared``: the account keys instead."""
    from btmm_core.dns.tsig import HMAC_SHA256, KeyRole, TsigKey
    from btmm_core.registry.accounts import add_user
    from btmm_core.registry.model import DeviceKey, SeenMac
    from btmm_core.registry.storage import SqliteStorage

    storage = SqliteStorage(state / "registry.sqlite")
    parent = dns.name.from_text(PARENT)
    storage.ensure_zone(parent, None)
    accounts = [add_user(storage, f"u{i}", parent, legacy=False) for i in range(zones)]
    now = time.time()

    def device(i: int, name: str) -> KeyRef:
        a = accounts[i]
        if shared:
            return a.zone.to_text(), a.key.name.to_text(), a.key.secret
        key_name = dns.name.from_text(f"{name}-key", origin=a.zone)
        key = TsigKey(key_name, HMAC_SHA256, secrets.token_bytes(32), a.zone, KeyRole.DEVICE, name)
        storage.enrol_device(DeviceKey(a.user, key, now), invite=None, replace=False,
                             seen=SeenMac(key_name, 0, secrets.token_bytes(32)))  # fmt: skip
        return a.zone.to_text(), key_name.to_text(), key.secret

    load = [device(i, f"l{j}") for i in range(zones) for j in range(per_zone)]
    fan = [device(0, f"f{j}") for j in range(fanout)]
    storage.close()
    signers = {a.zone.to_text(): (a.key.name.to_text(), a.key.secret) for a in accounts}
    return {"load": load, "fanout": fan, "signers": signers}


def start_workers(
    jobs: list[Job],
) -> tuple[list[mp.process.BaseProcess], list[Connection], float, float]:
    """The workers, each with its watchers set up: the wall time that took and the workers'
    CPU seconds for it (their ceiling during setup)."""
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
    cpu = 0.0
    for c in conns:
        if not c.poll(900):
            raise RuntimeError("a load-generator worker did not get its watchers up in 15 min")
        kind, _, worker_cpu = c.recv()
        assert kind == "ready"
        cpu += worker_cpu
    return procs, conns, time.monotonic() - t0, cpu


def wait_caught_up(conns: list[Connection], expected: dict[str, int], timeout: float) -> int:
    """Until every worker's watchers have their zone's last update: how many have not."""
    for c in conns:
        c.send(("wait", expected, timeout))
    missing = 0
    for c in conns:
        if not c.poll(timeout + 30):
            raise RuntimeError("a load-generator worker stopped answering")
        _, n = c.recv()
        missing += n
    return missing


def stop_workers(
    procs: list[mp.process.BaseProcess], conns: list[Connection]
) -> tuple[list[tuple[int, float]], list[dict[str, float]]]:
    arrivals: list[tuple[int, float]] = []
    ceilings = []
    for c in conns:
        c.send(("stop",))
    for c in conns:
        _, got, cpu, wall = c.recv()
        arrivals += got
        ceilings.append(
            {"cpu_s": round(cpu, 2), "cpu_share": round(cpu / wall, 3) if wall > 0 else 0.0,
             "deliveries_per_cpu_s": round(len(got) / cpu, 1) if cpu > 0 else 0.0}
        )  # fmt: skip
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    return arrivals, ceilings


def fresh_seq() -> int:
    """A number above every one used before (microseconds since the epoch): an update's
    address then never repeats one a record already holds, and a watcher's newest number
    only grows across phases and repetitions."""
    return time.time_ns() // 1000


def send_update(args: argparse.Namespace, zone: str, signer: tuple[str, bytes], label: str,
                seq: int) -> None:  # fmt: skip
    r = dns.query.udp(update(zone, signer, label, seq), "127.0.0.1", port=args.dns_port, timeout=5)
    if r.rcode() != dns.rcode.NOERROR:
        raise RuntimeError(f"update refused: {dns.rcode.to_text(r.rcode())}")


def run_load(args: argparse.Namespace, transport: str, keys: dict[str, Any],
             server_pid: int) -> dict[str, Any]:  # fmt: skip
    watchers: list[KeyRef] = keys["load"][: args.watchers]
    per_zone = {z: 0 for z, _, _ in watchers}
    for z, _, _ in watchers:
        per_zone[z] += 1
    zones = sorted(per_zone)
    port = args.tls_port if transport == "push" else args.dns_port
    jobs = [Job(transport, port, args.cafile, "w", part, args.window, args.light)
            for part in split(watchers, args.processes) if part]  # fmt: skip
    cpu0, _ = proc_cpu_rss(server_pid)
    procs, conns, setup, loadgen_setup = start_workers(jobs)
    cpu1, _ = proc_cpu_rss(server_pid)
    rng = random.Random(1)
    sent: dict[int, tuple[float, str]] = {}
    last: dict[str, int] = {}
    seq = fresh_seq()
    t_start = time.monotonic()
    end = t_start + args.duration
    next_at = t_start
    while time.monotonic() < end:
        zone = rng.choice(zones)
        seq += 1
        sent[seq] = (time.time(), zone)
        send_update(args, zone, keys["signers"][zone], "w", seq)
        last[zone] = seq
        next_at += 1 / args.rate
        time.sleep(max(0.0, next_at - time.monotonic()))
    not_caught_up = wait_caught_up(conns, last, 30.0)
    elapsed = time.monotonic() - t_start
    cpu2, rss2 = proc_cpu_rss(server_pid)
    arrivals, ceilings = stop_workers(procs, conns)
    left = llqs_left(args, transport)
    lat = [t - sent[s][0] for s, t in arrivals if s in sent]
    expected = sum(per_zone[z] for _, z in sent.values())
    return {
        "transport": transport,
        "scenario": "load",
        "watchers": len(watchers),
        "zones": len(zones),
        "updates": len(sent),
        "updates_per_s": round(len(sent) / args.duration, 1),
        "deliveries": len(lat),
        # LLQ merges a change into the next event while one waits for its acknowledgement
        "merged_or_missing": expected - len(lat),
        "watchers_without_last_update": not_caught_up,
        "latency_p50_ms": round(pct(lat, 50) * 1000, 2) if lat else -1,
        "latency_p99_ms": round(pct(lat, 99) * 1000, 2) if lat else -1,
        "setup_s": round(setup, 2),
        "server_cpu_s_setup": round(cpu1 - cpu0, 2),
        "loadgen_cpu_s_setup": round(loadgen_setup, 2),
        "server_cpu_share_load": round((cpu2 - cpu1) / elapsed, 3),
        "server_rss_mib": round(rss2 / 2**20, 1),
        "llqs_left_after_close": left,
        "loadgen": ceilings,
    }


def run_fanout(args: argparse.Namespace, transport: str, keys: dict[str, Any],
               server_pid: int) -> dict[str, Any]:  # fmt: skip
    watchers: list[KeyRef] = keys["fanout"][: args.watchers]
    zone = watchers[0][0]
    port = args.tls_port if transport == "push" else args.dns_port
    jobs = [Job(transport, port, args.cafile, "fan", part, args.window, args.light)
            for part in split(watchers, args.processes) if part]  # fmt: skip
    cpu0, _ = proc_cpu_rss(server_pid)
    procs, conns, setup, loadgen_setup = start_workers(jobs)
    cpu1, _ = proc_cpu_rss(server_pid)
    seq = fresh_seq()
    sent = time.time()
    send_update(args, zone, keys["signers"][zone], "fan", seq)
    missing = wait_caught_up(conns, {zone: seq}, 60.0)
    cpu2, rss2 = proc_cpu_rss(server_pid)
    arrivals, ceilings = stop_workers(procs, conns)
    left = llqs_left(args, transport)
    got = [t - sent for s, t in arrivals if s == seq]
    return {
        "transport": transport,
        "scenario": "fanout",
        "watchers": len(watchers),
        "delivered": len(got),
        "missing": missing,
        "last_ms": round(max(got) * 1000, 1) if got else -1,
        "p50_ms": round(pct(got, 50) * 1000, 1) if got else -1,
        "setup_s": round(setup, 2),
        "server_cpu_s_setup": round(cpu1 - cpu0, 2),
        "loadgen_cpu_s_setup": round(loadgen_setup, 2),
        "server_cpu_s_fanout": round(cpu2 - cpu1, 2),
        # both sides' CPU for the fan-out: when the workers' is the larger, the wall time
        # above measures the load generator more than the server
        "loadgen_cpu_s_fanout": round(sum(c["cpu_s"] for c in ceilings), 2),
        "server_rss_mib": round(rss2 / 2**20, 1),
        "llqs_left_after_close": left,
        "loadgen": ceilings,
    }


def llq_active(metrics_port: int) -> int:
    """LLQs the server holds now (its ``--metrics`` gauge)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return int(float(next(ln.split()[1] for ln in text.splitlines()
                          if ln.startswith("btmm_llq_active "))))  # fmt: skip


def llqs_left(args: argparse.Namespace, transport: str) -> int:
    """After the watchers closed: LLQs still held once the cancels were read (30 s at most).
    Not 0: cancels were lost, and those LLQs stay until their lease ends."""
    if transport != "llq":
        return 0
    end = time.monotonic() + 30
    while (n := llq_active(args.metrics_port)) and time.monotonic() < end:
        time.sleep(0.2)
    return n


def log_lines(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines() if log.exists() else []


def medians(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"transport": rows[0]["transport"], "scenario": rows[0]["scenario"],
                           "reps": len(rows)}  # fmt: skip
    for k, v in rows[0].items():
        if isinstance(v, int | float) and k != "rep":
            out[k] = statistics.median(r[k] for r in rows)
    out["server_rss_mib_by_rep"] = [r["server_rss_mib"] for r in rows]
    out["loadgen_max_cpu_share"] = max(c["cpu_share"] for r in rows for c in r["loadgen"])
    out["loadgen_cpu_s"] = statistics.median(sum(c["cpu_s"] for c in r["loadgen"]) for r in rows)
    return out


def bench_transport(args: argparse.Namespace, transport: str) -> list[dict[str, Any]]:
    """Every repetition of both scenarios against one fresh ``btmm serve``; the medians."""
    state = Path(tempfile.mkdtemp(prefix=f"btmm-watchers-{transport}-", dir="/dev/shm"))
    env = dict(os.environ, BTMM_REGISTRY_DOMAIN=PARENT, BTMM_REGISTRY_STATE=str(state))
    env["PYTHONPATH"] = str(REPO)
    per_zone = max(1, -(-args.watchers // args.zones))
    fanout = 0 if args.skip_fanout else args.watchers
    keys = make_keys(state, args.zones, per_zone, fanout, args.shared_keys)
    args.dns_port, args.tls_port, args.metrics_port = free_ports(3)
    args.cafile = str(state / "tls" / "dot-cert.pem")
    room = str(2 * args.watchers + 100)
    # room for every phase's LLQs, should cancels be lost (``llqs_left_after_close``)
    llq_room = str((2 * args.reps + 1) * args.watchers + 100)
    options = [
        "--tls-port", str(args.tls_port), "--max-connections", room,
        "--max-connections-per-client", room, "--push-max-per-client", room,
        "--push-max-total", room, "--llq-max-total", llq_room, "--llq-max-per-client", llq_room,
        "--metrics", f"127.0.0.1:{args.metrics_port}",
        "--log-level", "warning", "--lease-min", "60",
    ]  # fmt: skip
    out: list[dict[str, Any]] = []
    try:
        with serving(env, args.dns_port, options, state / "server.log", PARENT, users=()) as srv:
            rows: dict[str, list[dict[str, Any]]] = {"load": [], "fanout": []}
            for rep in range(args.reps):
                for name, fn in (("load", run_load), ("fanout", run_fanout)):
                    if getattr(args, f"skip_{name}"):
                        continue
                    seen = log_lines(state / "server.log")
                    row = fn(args, transport, keys, srv.pid)
                    # refused signatures cost the watcher a retry after 2 s (module doc)
                    new = log_lines(state / "server.log")[len(seen) :]
                    row["server_tsig_refusals"] = sum("tsig refused" in line for line in new)
                    row["server_warnings"] = sum("[warning" in line for line in new)
                    row["rep"] = rep
                    rows[name].append(row)
                    print(json.dumps(row), flush=True)
            for rs in rows.values():
                if rs:
                    m = medians(rs)
                    out.append(m)
                    print(json.dumps({"median": m}), flush=True)
    finally:
        log = state / "server.log"
        if log.exists():
            for line in log.read_text(errors="replace").splitlines()[-5:]:
                print(f"# {transport} server:", line, file=sys.stderr)
        shutil.rmtree(state, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", nargs="+", choices=TRANSPORTS, default=list(TRANSPORTS))
    ap.add_argument("--watchers", type=int, default=10_000)
    ap.add_argument("--zones", type=int, default=2_500)
    ap.add_argument("--rate", type=float, default=100.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--window", type=int, default=100, help="watchers each worker sets up at once")
    ap.add_argument("--skip-fanout", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument(
        "--light",
        action="store_true",
        help="watchers read events (and acknowledge LLQ events) without dnspython once set up",
    )
    ap.add_argument(
        "--shared-keys", action="store_true", help="each zone's account key for its watchers"
    )
    args = ap.parse_args()
    if args.zones > args.watchers:
        ap.error("--zones must not exceed --watchers")
    for transport in args.transport:
        bench_transport(args, transport)


if __name__ == "__main__":
    main()
