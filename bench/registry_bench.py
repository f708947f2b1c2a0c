#!/usr/bin/env python3
"""Registry bench: signed, durable updates per second and signed queries per second on loopback,
``btmm serve`` beside BIND's named serving the same zone with the same TSIG key, both driven by
dnsperf in the same run (interleaved repetitions, medians, ratio).

    python3 bench/registry_bench.py [--seconds 5] [--reps 3] [--state-dir DIR]

The state directories default to a disk-backed temporary directory (/var/tmp), because the
update figure is meant to include the cost of making each update durable.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ZONE = "bob.members.example."
PARENT = "members.example."
QUERY_NAMES = 200


def free_port() -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def wait_soa(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(
            ["dig", "@127.0.0.1", "-p", str(port), "+short", "+tries=1", "+time=1", ZONE, "SOA"],
            capture_output=True,
            text=True,
            check=False,
        )
        if "hostmaster" in r.stdout:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no server answered on port {port}")


def start_btmm(state: Path, port: int, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    env = dict(env, BTMM_REGISTRY_DOMAIN=PARENT, BTMM_REGISTRY_STATE=str(state))
    subprocess.run(
        [sys.executable, "-m", "btmm_core", "serve", "user", "add", "bob"],
        env=env,
        check=True,
        capture_output=True,
    )
    text = (state / "credentials" / "bob.key").read_text()
    m = re.search(r'secret "([^"]+)"', text)
    assert m is not None
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "btmm_core",
            "serve",
            "--port",
            str(port),
            "--tls-port",
            "0",
            # the bench measures throughput, not the per-key budget that guards against abuse
            "--update-key-rate",
            "0",
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(state / "server.log", "wb"),  # noqa: SIM115
    )
    wait_soa(port)
    return proc, m.group(1)


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
    wait_soa(port)
    return proc


def populate(port: int, secret: str) -> None:
    lines = [f"server 127.0.0.1 {port}", f"zone {ZONE}"]
    for i in range(QUERY_NAMES):
        lines.append(f"update add hq{i}.{ZONE} 300 AAAA fd00::{i + 1:x}")
    lines += ["send", ""]
    r = subprocess.run(
        ["nsupdate", "-y", f"hmac-sha256:{ZONE}:{secret}"],
        input="\n".join(lines),
        text=True,
        check=False,
        capture_output=True,
        timeout=120,
    )
    if r.returncode != 0:
        raise RuntimeError(f"populating port {port} failed: {r.stdout} {r.stderr}")


def dnsperf(port: int, secret: str, datafile: Path, seconds: int, update: bool) -> dict[str, float]:
    cmd = [
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(datafile),
        "-l",
        str(seconds),
        "-y",
        f"hmac-sha256:{ZONE}:{secret}",
        "-q",
        "64",
        "-t",
        "5",
    ]
    if update:
        cmd.append("-u")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    rate = re.search(r"(?:Queries|Updates) per second:\s+([\d.]+)", r.stdout)
    done = re.search(r"(?:Queries|Updates) completed:\s+(\d+)", r.stdout)
    lost = re.search(r"(?:Queries|Updates) lost:\s+(\d+)", r.stdout)
    codes = re.search(r"Response codes:\s+(.*)", r.stdout)
    if rate is None or done is None:
        raise RuntimeError(f"dnsperf output not understood:\n{r.stdout}\n{r.stderr}")
    noerror = re.search(r"NOERROR (\d+)", codes.group(1)) if codes else None
    return {
        "rate": float(rate.group(1)),
        "completed": int(done.group(1)),
        "lost": int(lost.group(1)) if lost else 0,
        "noerror": int(noerror.group(1)) if noerror else 0,
        "codes": codes.group(1) if codes else "",  # type: ignore[dict-item]
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--state-dir", type=Path, default=None, help="default: a new dir in /var/tmp")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "registry.json")
    args = ap.parse_args()
    for tool in ("dnsperf", "named", "nsupdate", "dig"):
        if shutil.which(tool) is None:
            print(
                f"{tool} is missing: apt-get install dnsperf bind9 bind9-dnsutils", file=sys.stderr
            )
            return 2
    base = args.state_dir or Path(tempfile.mkdtemp(prefix="btmm-registry-bench-", dir="/var/tmp"))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ours_port, named_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ours, secret = start_btmm(base / "btmm", ours_port, env)
        procs.append(ours)
        procs.append(start_named(base / "named", named_port, secret))
        populate(ours_port, secret)
        populate(named_port, secret)
        qfile = base / "queries.txt"
        qfile.write_text("".join(f"hq{i}.{ZONE} AAAA\n" for i in range(QUERY_NAMES)))
        ufile = base / "updates.txt"
        blocks = []
        for i in range(5000):
            blocks.append(f"{ZONE}\nadd u{i} 300 A 198.51.100.{i % 250 + 1}\nsend\n")
            blocks.append(f"{ZONE}\ndelete u{i} A\nsend\n")
        ufile.write_text("".join(blocks))
        results: dict[str, dict[str, list[dict[str, float]]]] = {
            "btmm": {"update": [], "query": []},
            "named": {"update": [], "query": []},
        }
        for rep in range(args.reps):
            order = [("btmm", ours_port), ("named", named_port)]
            if rep % 2:
                order.reverse()
            for kind, datafile, upd in (("update", ufile, True), ("query", qfile, False)):
                for name, port in order:
                    res = dnsperf(port, secret, datafile, args.seconds, upd)
                    results[name][kind].append(res)
                    print(
                        f"rep {rep} {name:5} {kind:6} {res['rate']:10.1f}/s  {res['codes']}",
                        flush=True,
                    )
        table = []
        for kind in ("update", "query"):
            ours_med = statistics.median(r["rate"] for r in results["btmm"][kind])
            named_med = statistics.median(r["rate"] for r in results["named"][kind])
            table.append((kind, ours_med, named_med, ours_med / named_med))
        print()
        print("| measure (loopback, TSIG hmac-sha256) | btmm serve | named | btmm/named |")
        print("|---|---:|---:|---:|")
        for kind, o, n, ratio in table:
            label = "signed durable updates/s" if kind == "update" else "signed queries/s"
            print(f"| {label} | {o:.0f} | {n:.0f} | {ratio:.2f} |")
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "seconds": args.seconds,
                    "reps": args.reps,
                    "state_dir": str(base),
                    "results": results,
                    "medians": table,
                },
                indent=2,
            )
        )
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if args.state_dir is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
