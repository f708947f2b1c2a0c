"""Registry bench: signed, durable updates per second and signed queries per second on loopback,
``btmm serve`` beside BIND's named serving the same zone with the same TSIG key, both driven by
dnsperf in the same run (interleaved repetitions, medians, ratio).

    python3 -m bench.registry [--seconds 5] [--reps 3] [--state-dir DIR] [--json PATH]
                              [--no-postgresql]

``btmm1`` is ``btmm serve --no-group-commit``: every update in its own transaction, so the
gain of group commit is measured in the same run.

With PostgreSQL installed (Debian ``postgresql``) two more systems run in the same rounds, on a
throwaway cluster in the state directory's file system: ``pg1``, one ``btmm serve --database
postgresql://...``, and ``pg2``, two of them on one database. Both get the same load: two
dnsperf at once, one for user bob's zone and one for carol's (``pg2``: bob's at the first
server, carol's at the second), their rates added. The other systems get one dnsperf.

The state directories default to a disk-backed temporary directory (/var/tmp), because the
update figure is meant to include the cost of making each update durable. The table goes to
stdout; the JSON of every run only where ``--json`` says.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import REPO
from bench.pgcluster import PgCluster, pg_bin, pg_cluster
from bench.serve import free_ports, serving, stop, wait_answering

ZONE = "bob.members.example."
PARENT = "members.example."
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
    users: tuple[str, ...] = ("bob",),
    extra: tuple[str, ...] = (),
) -> Iterator[str]:
    """``btmm serve`` on ``port`` with ``users`` added (on a shared ``database``, only by the
    first server); yields bob's TSIG secret (base64)."""
    state.mkdir(parents=True, exist_ok=True)
    env = dict(env, BTMM_REGISTRY_DOMAIN=PARENT, BTMM_REGISTRY_STATE=str(state))
    if database is not None:
        env["BTMM_REGISTRY_DATABASE"] = database
    # the bench measures throughput, not the per-key budget that guards against abuse
    options = ["--update-key-rate", "0", "--log-level", "warning", *extra]
    with serving(env, port, options, state / f"server-{port}.log", ZONE, users=users):
        yield _secret(state, "bob")


def start_named(state: Path, port: int, secret: str) -> subprocess.Popen[bytes]:
    state.mkdir(parents=True, exist_ok=True)
    zone = state / "bob.zone"
    lines = [
        f"$ORIGIN {ZONE}",
        "$TTL 300",
        f"@ IN SOA ns.{PARENT} hostmaster.{PARENT} 1 3600 600 86400 60",
        f"@ IN NS ns.{PARENT}",
    ]
    zone.write_text("\n".join(lines) + "\n")
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
key "{ZONE}" {{ algorithm hmac-sha256; secret "{secret}"; }};
zone "{ZONE}" {{
    type primary;
    file "{zone}";
    update-policy {{ grant {ZONE} zonesub ANY; }};
}};
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
                    f"rep {rep} {name:5} {kind:6} {res['rate']:10.1f}/s  {res['codes']}",
                    flush=True,
                )
    return results


def medians(results: Results) -> list[tuple[str, str, float, float]]:
    """Per kind and system: its median rate and its ratio to named's."""
    table = []
    for kind in ("update", "query"):
        named = statistics.median(r["rate"] for r in results["named"][kind])
        for name in results:
            rate = statistics.median(r["rate"] for r in results[name][kind])
            table.append((kind, name, rate, rate / named))
    return table


LABELS = {
    "btmm": "btmm serve (SQLite)",
    "btmm1": "btmm serve (SQLite, --no-group-commit)",
    "named": "named",
    "pg1": "btmm serve (PostgreSQL, 1 server)",
    "pg2": "btmm serve (PostgreSQL, 2 servers)",
}


def print_table(table: list[tuple[str, str, float, float]]) -> None:
    print()
    print("| measure (loopback, TSIG hmac-sha256) | system | per second | / named |")
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
    zones = (ZONE, f"carol.{PARENT}")
    with contextlib.ExitStack() as stack:
        systems: dict[str, list[Target]] = {}
        for name, servers in (("pg1", 1), ("pg2", 2)):
            url = cluster.create_database()
            state = base / name
            ports = [pg_ports.pop() for _ in range(servers)]
            for i, port in enumerate(ports):
                stack.enter_context(start_btmm(
                    state, port, env, database=url, users=("bob", "carol") if i == 0 else ()))
            secrets = {ZONE: _secret(state, "bob"), zones[1]: _secret(state, "carol")}
            for zone in zones:
                populate(ports[0], secrets[zone], zone)
            systems[name] = [
                Target(ports[i % servers], zone, secrets[zone]) for i, zone in enumerate(zones)
            ]
        yield systems


def run(base: Path, seconds: int, reps: int, postgresql: bool) -> dict[str, object]:
    """Every system up, populated, measured; the report."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ours_port, single_port, named_port, *pg_ports = free_ports(6)
    files = {ZONE: write_data(base), f"carol.{PARENT}": write_data(base, f"carol.{PARENT}")}
    with contextlib.ExitStack() as stack:
        secret = stack.enter_context(start_btmm(base / "btmm", ours_port, env))
        named = start_named(base / "named", named_port, secret)
        stack.callback(stop, named)
        single = stack.enter_context(
            start_btmm(base / "btmm1", single_port, env, extra=("--no-group-commit",))
        )
        populate(ours_port, secret)
        populate(single_port, single)
        populate(named_port, secret)
        systems = {
            "btmm": [Target(ours_port, ZONE, secret)],
            "btmm1": [Target(single_port, ZONE, single)],
            "named": [Target(named_port, ZONE, secret)],
        }
        if postgresql:
            # the cluster's own directory: initdb runs as another user, who cannot enter base
            cluster = stack.enter_context(pg_cluster(str(base.parent)))
            systems.update(
                stack.enter_context(postgresql_systems(base, env, cluster, pg_ports))
            )
        results = measure(systems, files, seconds, reps)
    table = medians(results)
    print_table(table)
    return {"seconds": seconds, "reps": reps, "state_dir": str(base), "results": results,
            "medians": table}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--state-dir", type=Path, default=None, help="default: a new dir in /var/tmp")
    ap.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--no-postgresql", action="store_true", help="leave out pg1 and pg2")
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
        report = run(base, args.seconds, args.reps, postgresql)
    finally:
        if args.state_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
