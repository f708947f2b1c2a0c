"""Registry bench: signed, durable updates per second and signed queries per second on loopback,
``btmm serve`` beside BIND's named serving the same zone with the same TSIG key, both driven by
dnsperf in the same run (interleaved repetitions, medians, ratio).

    python3 -m bench.registry [--seconds 5] [--reps 3] [--state-dir DIR] [--json PATH]

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
from pathlib import Path

from bench import REPO
from bench.serve import free_port, serving, stop, wait_answering

ZONE = "bob.members.example."
PARENT = "members.example."
QUERY_NAMES = 200
TOOLS = ("dnsperf", "named", "nsupdate", "dig")

Results = dict[str, dict[str, list[dict[str, float]]]]


@contextlib.contextmanager
def start_btmm(state: Path, port: int, env: dict[str, str]) -> Iterator[str]:
    """``btmm serve`` on ``port`` with user bob; yields bob's TSIG secret (base64)."""
    state.mkdir(parents=True, exist_ok=True)
    env = dict(env, BTMM_REGISTRY_DOMAIN=PARENT, BTMM_REGISTRY_STATE=str(state))
    # the bench measures throughput, not the per-key budget that guards against abuse
    options = ["--update-key-rate", "0", "--log-level", "warning"]
    with serving(env, port, options, state / "server.log", ZONE):
        text = (state / "credentials" / "bob.key").read_text()
        m = re.search(r'secret "([^"]+)"', text)
        if m is None:
            raise RuntimeError(f"no secret in {state / 'credentials' / 'bob.key'}")
        yield m.group(1)


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


def write_data(base: Path) -> tuple[Path, Path]:
    """The dnsperf data files: queries for the populated names, and add/delete update pairs."""
    qfile = base / "queries.txt"
    qfile.write_text("".join(f"hq{i}.{ZONE} AAAA\n" for i in range(QUERY_NAMES)))
    ufile = base / "updates.txt"
    blocks = []
    for i in range(5000):
        blocks.append(f"{ZONE}\nadd u{i} 300 A 198.51.100.{i % 250 + 1}\nsend\n")
        blocks.append(f"{ZONE}\ndelete u{i} A\nsend\n")
    ufile.write_text("".join(blocks))
    return qfile, ufile


def measure(
    ports: dict[str, int], secret: str, files: tuple[Path, Path], seconds: int, reps: int
) -> Results:
    """dnsperf against each server, updates then queries, the order of the servers alternating
    between repetitions so that neither always goes first."""
    qfile, ufile = files
    results: Results = {name: {"update": [], "query": []} for name in ports}
    for rep in range(reps):
        order = list(ports.items())
        if rep % 2:
            order.reverse()
        for kind, datafile, upd in (("update", ufile, True), ("query", qfile, False)):
            for name, port in order:
                res = dnsperf(port, secret, datafile, seconds, upd)
                results[name][kind].append(res)
                print(
                    f"rep {rep} {name:5} {kind:6} {res['rate']:10.1f}/s  {res['codes']}",
                    flush=True,
                )
    return results


def medians(results: Results) -> list[tuple[str, float, float, float]]:
    """Per kind: btmm's median rate, named's, and their ratio."""
    table = []
    for kind in ("update", "query"):
        ours = statistics.median(r["rate"] for r in results["btmm"][kind])
        named = statistics.median(r["rate"] for r in results["named"][kind])
        table.append((kind, ours, named, ours / named))
    return table


def print_table(table: list[tuple[str, float, float, float]]) -> None:
    print()
    print("| measure (loopback, TSIG hmac-sha256) | btmm serve | named | btmm/named |")
    print("|---|---:|---:|---:|")
    for kind, o, n, ratio in table:
        label = "signed durable updates/s" if kind == "update" else "signed queries/s"
        print(f"| {label} | {o:.0f} | {n:.0f} | {ratio:.2f} |")


def run(base: Path, seconds: int, reps: int) -> dict[str, object]:
    """Both servers up, populated, measured; the report."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ours_port, named_port = free_port(), free_port()
    with start_btmm(base / "btmm", ours_port, env) as secret:
        named = start_named(base / "named", named_port, secret)
        try:
            populate(ours_port, secret)
            populate(named_port, secret)
            files = write_data(base)
            ports = {"btmm": ours_port, "named": named_port}
            results = measure(ports, secret, files, seconds, reps)
        finally:
            stop(named)
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
    args = ap.parse_args()
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        print(f"{', '.join(missing)} missing: apt-get install dnsperf bind9 bind9-dnsutils",
              file=sys.stderr)  # fmt: skip
        return 2
    base = args.state_dir or Path(tempfile.mkdtemp(prefix="btmm-registry-bench-", dir="/var/tmp"))
    try:
        report = run(base, args.seconds, args.reps)
    finally:
        if args.state_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
