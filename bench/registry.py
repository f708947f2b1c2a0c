"""Registry bench: signed, durable updates per second and signed queries per second on loopback,
``btmm serve`` beside BIND's named serving the same zones with the same TSIG keys, all driven by
dnsperf in the same run (interleaved repetitions, medians, ratio), and the time from a commit at
one server (or worker) to the LLQ event from another.

    python3 -m bench.registry [--seconds 5] [--reps 3] [--state-dir DIR] [--json PATH]
                              [--no-postgresql] [--events 100]

Systems: ``named``; ``btmm``, one ``btmm serve`` on SQLite; ``btmm1``, the same with
``--no-group-commit`` (every update its own transaction); ``btmm2w``, ``btmm serve --workers
2`` on one SQLite file; with PostgreSQL installed (Debian ``postgresql``), on a throwaway
cluster in the state directory's file system, ``pg1``, one ``btmm serve --database
postgresql://...``, and ``pg2``, two of them on one database. Every system gets the same load:
two dnsperf at once, one for user bob's zone and one for carol's (``pg2``: bob's at the first
server, carol's at the second), each with 4 client sockets (so that SO_REUSEPORT spreads them
over workers) and 64 messages in flight, TSIG hmac-sha256 on every message; their rates added.

The commit-to-event latency is measured on ``pg2`` (an LLQ watcher at the second server,
updates at the first) and ``btmm2w`` (the watcher's TCP connection held by one worker, the
updates sent on a connection held by the other): from the update's NOERROR answer to the event.

The state directories default to a disk-backed temporary directory (/var/tmp), because the
update figure is meant to include the cost of making each update durable. The table goes to
stdout; the JSON of every run only where ``--json`` says.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.name
import dns.query
import dns.rdatatype
import dns.tsig
import dns.update

from bench import REPO
from bench.pgcluster import PgCluster, pg_bin, pg_cluster
from bench.serve import free_ports, serving, stop, wait_answering
from btmm_core.aio import within
from btmm_core.dns.keyfile import read_key
from btmm_core.llq.client import Changes
from btmm_core.llq.driver import Watcher

ZONE = "bob.members.example."
PARENT = "members.example."
CAROL = f"carol.{PARENT}"
ZONES = (ZONE, CAROL)
#: dnsperf client sockets per dnsperf
CLIENTS = 4
QUERY_NAMES = 200
TOOLS = ("dnsperf", "named", "nsupdate", "dig")

Results = dict[str, dict[str, list[dict[str, float]]]]


@dataclass(frozen=True)
class Target:
    """One dnsperf's server and zone, and the key that signs for it."""

    port: int
    zone: str
    secret: str


def _secret(state: Path, user: str) -> str:
    path = state / "credentials" / f"{user}.key"
    m = re.search(r'secret "([^"]+)"', path.read_text())
    if m is None:
        raise RuntimeError(f"no secret in {path}")
    return m.group(1)


@contextlib.contextmanager
def start_btmm(
    state: Path,
    port: int,
    env: dict[str, str],
    *,
    database: str | None = None,
    users: tuple[str, ...] = ("bob", "carol"),
    extra: tuple[str, ...] = (),
) -> Iterator[subprocess.Popen[bytes]]:
    """``btmm serve`` on ``port`` with ``users`` added (on a shared ``database``, only by the
    first server); yields its process (``secrets`` reads the keys)."""
    state.mkdir(parents=True, exist_ok=True)
    env = dict(env, BTMM_REGISTRY_DOMAIN=PARENT, BTMM_REGISTRY_STATE=str(state))
    if database is not None:
        env["BTMM_REGISTRY_DATABASE"] = database
    # the bench measures throughput, not the per-key budget that guards against abuse
    options = ["--update-key-rate", "0", "--log-level", "warning", *extra]
    with serving(env, port, options, state / f"server-{port}.log", ZONE, users=users) as proc:
        yield proc


def secrets(state: Path) -> dict[str, str]:
    """bob's and carol's TSIG secrets (base64) in a btmm state directory, by zone."""
    return {ZONE: _secret(state, "bob"), CAROL: _secret(state, "carol")}


def start_named(state: Path, port: int, keys: dict[str, str]) -> subprocess.Popen[bytes]:
    """named serving each zone of ``keys`` (zone -> secret), updatable with that key."""
    state.mkdir(parents=True, exist_ok=True)
    parts = []
    for zone, secret in keys.items():
        label = zone.split(".")[0]
        zfile = state / f"{label}.zone"
        lines = [
            f"$ORIGIN {zone}",
            "$TTL 300",
            f"@ IN SOA ns.{PARENT} hostmaster.{PARENT} 1 3600 600 86400 60",
            f"@ IN NS ns.{PARENT}",
        ]
        zfile.write_text("\n".join(lines) + "\n")
        parts.append(f"""
key "{zone}" {{ algorithm hmac-sha256; secret "{secret}"; }};
zone "{zone}" {{
    type primary;
    file "{zfile}";
    update-policy {{ grant {zone} zonesub ANY; }};
}};""")
    conf = state / "named.conf"
    conf.write_text(f"""
options {{
    directory "{state}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    pid-file "{state}/named.pid";
    session-keyfile "{state}/session.key";
    recursion no;
    dnssec-validation no;
    notify no;
}};
controls {{ }};
{"".join(parts)}
logging {{ category default {{ null; }}; category update {{ null; }}; }};
""")
    proc = subprocess.Popen(
        ["named", "-g", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=open(state / "named.log", "wb"),  # noqa: SIM115
    )
    wait_answering(port, ZONE)
    return proc


def populate(port: int, secret: str, zone: str = ZONE) -> None:
    lines = [f"server 127.0.0.1 {port}", f"zone {zone}"]
    for i in range(QUERY_NAMES):
        lines.append(f"update add hq{i}.{zone} 300 AAAA fd00::{i + 1:x}")
    lines += ["send", ""]
    r = subprocess.run(
        ["nsupdate", "-y", f"hmac-sha256:{zone}:{secret}"],
        input="\n".join(lines),
        text=True,
        check=False,
        capture_output=True,
        timeout=120,
    )
    if r.returncode != 0:
        raise RuntimeError(f"populating port {port} failed: {r.stdout} {r.stderr}")


def dnsperf(
    targets: list[Target], files: dict[str, tuple[Path, Path]], seconds: int, update: bool
) -> dict[str, float]:
    """One dnsperf per target, all at once; their rates and counts added."""
    procs = []
    for t in targets:
        qfile, ufile = files[t.zone]
        cmd = [
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            str(t.port),
            "-d",
            str(ufile if update else qfile),
            "-l",
            str(seconds),
            "-y",
            f"hmac-sha256:{t.zone}:{t.secret}",
            "-q",
            "64",
            "-c",
            str(CLIENTS),
            "-t",
            "5",
        ]
        if update:
            cmd.append("-u")
        procs.append(
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    parts = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 60)
        parts.append(_parse_dnsperf(out, err))
    return {
        "rate": sum(p["rate"] for p in parts),
        # answers other than NOERROR (BADTIME when several sockets race one key across a
        # second boundary: the registry's replay rule) are not counted as work done
        "ok_rate": sum(p["rate"] * p["noerror"] / p["completed"] for p in parts if p["completed"]),
        "completed": sum(p["completed"] for p in parts),
        "lost": sum(p["lost"] for p in parts),
        "noerror": sum(p["noerror"] for p in parts),
        "codes": " | ".join(str(p["codes"]) for p in parts),  # type: ignore[dict-item]
    }


def _parse_dnsperf(stdout: str, stderr: str) -> dict[str, float]:
    rate = re.search(r"(?:Queries|Updates) per second:\s+([\d.]+)", stdout)
    done = re.search(r"(?:Queries|Updates) completed:\s+(\d+)", stdout)
    lost = re.search(r"(?:Queries|Updates) lost:\s+(\d+)", stdout)
    codes = re.search(r"Response codes:\s+(.*)", stdout)
    if rate is None or done is None:
        raise RuntimeError(f"dnsperf output not understood:\n{stdout}\n{stderr}")
    noerror = re.search(r"NOERROR (\d+)", codes.group(1)) if codes else None
    return {
        "rate": float(rate.group(1)),
        "completed": int(done.group(1)),
        "lost": int(lost.group(1)) if lost else 0,
        "noerror": int(noerror.group(1)) if noerror else 0,
        "codes": codes.group(1) if codes else "",  # type: ignore[dict-item]
    }


def write_data(base: Path, zone: str = ZONE) -> tuple[Path, Path]:
    """The dnsperf data files: queries for the populated names, and add/delete update pairs."""
    label = zone.split(".")[0]
    qfile = base / f"queries-{label}.txt"
    qfile.write_text("".join(f"hq{i}.{zone} AAAA\n" for i in range(QUERY_NAMES)))
    ufile = base / f"updates-{label}.txt"
    blocks = []
    for i in range(5000):
        blocks.append(f"{zone}\nadd u{i} 300 A 198.51.100.{i % 250 + 1}\nsend\n")
        blocks.append(f"{zone}\ndelete u{i} A\nsend\n")
    ufile.write_text("".join(blocks))
    return qfile, ufile


def measure(
    systems: dict[str, list[Target]], files: dict[str, tuple[Path, Path]], seconds: int,
    reps: int,
) -> Results:
    """dnsperf against each system, updates then queries, the order of the systems reversed
    every other repetition so that none always goes first."""
    results: Results = {name: {"update": [], "query": []} for name in systems}
    for rep in range(reps):
        order = list(systems.items())
        if rep % 2:
            order.reverse()
        for kind, upd in (("update", True), ("query", False)):
            for name, targets in order:
                res = dnsperf(targets, files, seconds, upd)
                results[name][kind].append(res)
                print(
                    f"rep {rep} {name:6} {kind:6} {res['ok_rate']:10.1f}/s NOERROR"
                    f" ({res['rate']:.1f}/s answered)  {res['codes']}",
                    flush=True,
                )
    return results


def medians(results: Results) -> list[tuple[str, str, float, float]]:
    """Per kind and system: its median rate and its ratio to named's."""
    table = []
    for kind in ("update", "query"):
        named = statistics.median(r["ok_rate"] for r in results["named"][kind])
        for name in results:
            rate = statistics.median(r["ok_rate"] for r in results[name][kind])
            table.append((kind, name, rate, rate / named))
    return table


LABELS = {
    "btmm": "btmm serve (SQLite, 1 process)",
    "btmm1": "btmm serve (SQLite, --no-group-commit)",
    "btmm2w": "btmm serve (SQLite, --workers 2)",
    "named": "named",
    "pg1": "btmm serve (PostgreSQL, 1 server)",
    "pg2": "btmm serve (PostgreSQL, 2 servers)",
}


def print_table(table: list[tuple[str, str, float, float]]) -> None:
    print()
    print("| measure (loopback, TSIG hmac-sha256) | system | NOERROR per second | / named |")
    print("|---|---|---:|---:|")
    for kind, name, rate, ratio in table:
        label = "signed durable updates" if kind == "update" else "signed queries"
        print(f"| {label} | {LABELS.get(name, name)} | {rate:.0f} | {ratio:.2f} |")


@contextlib.contextmanager
def postgresql_systems(
    base: Path, env: dict[str, str], cluster: PgCluster, pg_ports: list[int]
) -> Iterator[dict[str, list[Target]]]:
    """``pg1`` and ``pg2``: one and two ``btmm serve`` on their own databases of ``cluster``,
    users bob and carol, populated."""
    with contextlib.ExitStack() as stack:
        systems: dict[str, list[Target]] = {}
        for name, servers in (("pg1", 1), ("pg2", 2)):
            url = cluster.create_database()
            state = base / name
            ports = [pg_ports.pop() for _ in range(servers)]
            for i, port in enumerate(ports):
                stack.enter_context(start_btmm(
                    state, port, env, database=url, users=("bob", "carol") if i == 0 else ()))
            keys = secrets(state)
            for zone in ZONES:
                populate(ports[0], keys[zone], zone)
            systems[name] = [
                Target(ports[i % servers], zone, keys[zone]) for i, zone in enumerate(ZONES)
            ]
        yield systems


# ---- commit-to-event latency across servers -----------------------------------------------------


def _holder(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server end of a loopback TCP connection (from /proc)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local, remote = f[1].split(":")[1], f[2].split(":")[1]
        if (int(local, 16), int(remote, 16)) == (server_port, client_port):
            inode = f[9]
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    return None


def _workers_of(proc: subprocess.Popen[bytes]) -> list[int]:
    """A ``btmm serve --workers`` process and the workers it forked."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [proc.pid, *(int(c) for c in children)]


def _tcp_update(sock: socket.socket, zone: str, secret: str, addr: str) -> int:
    key = dns.tsig.Key(zone, secret, "hmac-sha256")
    u = dns.update.UpdateMessage(zone)
    u.add("watched", 60, "AAAA", addr)
    u.use_tsig(key)
    dns.query.send_tcp(sock, u)
    r, _ = dns.query.receive_tcp(sock, keyring={key.name: key}, request_mac=u.mac)
    return int(r.rcode())


def event_latency(
    watch_port: int, update_port: int, state: Path, count: int,
    pids: list[int] | None = None,
) -> list[tuple[float, float]]:
    """Seconds to the LLQ event of a watcher at ``watch_port`` from the NOERROR of an update at
    ``update_port`` (a lower bound of commit-to-event: the commit came before the answer; the
    event may even be read first, then 0) and from sending the update (an upper bound: it
    includes the update's own exchange); with ``pids`` (workers on one port), the update goes
    on a TCP connection held by another worker than the watcher's."""
    zone, secret = CAROL, secrets(state)[CAROL]
    key = read_key(state / "credentials" / "carol.key")
    name = dns.name.from_text(f"watched.{zone}")

    async def main() -> list[tuple[float, float]]:
        async with Watcher(("127.0.0.1", watch_port), name, dns.rdatatype.AAAA, key=key,
                           transport="tcp") as w:
            await within(w.events.get(), 10)  # the full set first
            sock = socket.create_connection(("127.0.0.1", update_port), timeout=5)
            if pids is not None:
                mine = None
                for _ in range(100):
                    mine = _holder(watch_port, w.local_address[1], pids)
                    if mine is not None:
                        break
                    await asyncio.sleep(0.05)
                for _ in range(60):  # a connection the other worker holds
                    probe = await asyncio.to_thread(_tcp_update, sock, zone, secret, "fd00::ffff")
                    if probe != 0:
                        raise RuntimeError(f"update refused: rcode {probe}")
                    held = _holder(update_port, sock.getsockname()[1], pids)
                    if held is not None and held != mine:
                        break
                    sock.close()
                    sock = socket.create_connection(("127.0.0.1", update_port), timeout=5)
                else:
                    raise RuntimeError("no connection reached another worker than the watcher's")
            lat = []
            try:
                for i in range(count):
                    addr = f"fd00::{i + 1:x}"
                    t0 = time.monotonic()
                    rc = await asyncio.to_thread(_tcp_update, sock, zone, secret, addr)
                    if rc != 0:
                        raise RuntimeError(f"update refused: rcode {rc}")
                    t1 = time.monotonic()
                    while True:
                        ev = await within(w.events.get(), 10)
                        if isinstance(ev, Changes) and any(
                            r.rdata.to_text() == addr for r in ev.added
                        ):
                            break
                    t2 = time.monotonic()
                    lat.append((t2 - t1, t2 - t0))
            finally:
                sock.close()
            return lat

    return asyncio.run(main())


def _quantiles(pairs: list[tuple[float, float]]) -> dict[str, float]:
    out: dict[str, float] = {"n": len(pairs)}
    for i, what in enumerate(("answer", "sent")):
        lat = [p[i] for p in pairs]
        q = statistics.quantiles(lat, n=100, method="inclusive")
        out[f"{what}_p50_ms"] = statistics.median(lat) * 1000
        out[f"{what}_p99_ms"] = q[98] * 1000
    return out


def run(base: Path, seconds: int, reps: int, postgresql: bool, events: int) -> dict[str, object]:
    """Every system up, populated, measured; the report."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ours_port, single_port, workers_port, named_port, *pg_ports = free_ports(7)
    files = {zone: write_data(base, zone) for zone in ZONES}
    latency: dict[str, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(start_btmm(base / "btmm", ours_port, env))
        keys = secrets(base / "btmm")
        named = start_named(base / "named", named_port, keys)
        stack.callback(stop, named)
        stack.enter_context(
            start_btmm(base / "btmm1", single_port, env, extra=("--no-group-commit",))
        )
        two = stack.enter_context(
            start_btmm(base / "btmm2w", workers_port, env, extra=("--workers", "2"))
        )
        systems: dict[str, list[Target]] = {}
        for name, port, state in (
            ("named", named_port, base / "btmm"),
            ("btmm", ours_port, base / "btmm"),
            ("btmm1", single_port, base / "btmm1"),
            ("btmm2w", workers_port, base / "btmm2w"),
        ):
            own = secrets(state)
            for zone in ZONES:
                populate(port, own[zone], zone)
            systems[name] = [Target(port, zone, own[zone]) for zone in ZONES]
        if postgresql:
            # the cluster's own directory: initdb runs as another user, who cannot enter base
            cluster = stack.enter_context(pg_cluster(str(base.parent)))
            systems.update(
                stack.enter_context(postgresql_systems(base, env, cluster, pg_ports))
            )
        results = measure(systems, files, seconds, reps)
        if events:
            latency["btmm2w"] = _quantiles(event_latency(
                workers_port, workers_port, base / "btmm2w", events, _workers_of(two)))
            if postgresql:
                a, b = (t.port for t in systems["pg2"])
                latency["pg2"] = _quantiles(event_latency(b, a, base / "pg2", events))
    table = medians(results)
    print_table(table)
    print_latency(latency)
    return {"seconds": seconds, "reps": reps, "state_dir": str(base), "results": results,
            "medians": table, "latency": latency}  # fmt: skip


def print_latency(latency: dict[str, dict[str, float]]) -> None:
    if not latency:
        return
    print()
    print("| LLQ event from the other server or worker, after an update at one | from its answer:"
          " p50 ms | p99 ms | from its sending: p50 ms | p99 ms | n |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, q in latency.items():
        print(f"| {LABELS.get(name, name)} | {q['answer_p50_ms']:.2f} | {q['answer_p99_ms']:.2f}"
              f" | {q['sent_p50_ms']:.2f} | {q['sent_p99_ms']:.2f} | {q['n']:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--state-dir", type=Path, default=None, help="default: a new dir in /var/tmp")
    ap.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--no-postgresql", action="store_true", help="leave out pg1 and pg2")
    ap.add_argument("--events", type=int, default=100,
                    help="updates timed from commit to LLQ event across servers (0: none)")
    args = ap.parse_args()
    postgresql = not args.no_postgresql
    if postgresql:
        try:
            pg_bin()
        except RuntimeError as e:
            print(f"{e}; or run with --no-postgresql", file=sys.stderr)
            return 2
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"{', '.join(missing)} missing: apt-get install dnsperf bind9 bind9-dnsutils",
              file=sys.stderr)  # fmt: skip
        return 2
    base = args.state_dir or Path(tempfile.mkdtemp(prefix="btmm-registry-bench-", dir="/var/tmp"))
    try:
        report = run(base, args.seconds, args.reps, postgresql, args.events)
    finally:
        if args.state_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
