"""Run ``btmm lab --scenario NAME`` many times in a row and report, per scenario and engine
pairing: how many runs passed (and the longest unbroken series), the time from ``btmm up`` on
both hosts to the first ping answer by name (median), the path the tunnel settled on, the TCP
throughput on it (median), and the handshake retries seen (the cold-start rule of issue 13: a
host must never initiate before its own endpoint exists, so this must stay 0).

Each run is a fresh ``python3 -m btmm_core lab`` process, exactly as a user runs it, with its own
namespaces (the lab removes them, also on failure). Needs root.

    python3 -m bench.lab --runs 10 --scenarios same-home no-mapping roam-home \
        --pairs fast mixed --megabytes 100 [--json /tmp/lab.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("default", "same-home", "no-mapping", "roam-home")
PAIRS = {"fast": "fast/fast", "mixed": "fast/python", "python": "python/python"}

_PING = re.compile(r"first ping by name answered after ([\d.]+) s")
_UP = re.compile(r"tunnels up ([\d.]+) s after")
_RATE = re.compile(r"(\d+) MB to \S+ in ([\d.]+) s: (\d+) Mbit/s")
_PATH = re.compile(r"path (desktop|laptop) -> \w+: (\w+)(?:.*handshake retries (\d+))?")


@dataclass(frozen=True)
class Run:
    """What one ``btmm lab`` run printed (None where it did not get that far)."""
    ok: bool
    seconds: float
    first_ping: float | None = None
    tunnels_up: float | None = None
    mbit_s: float | None = None
    paths: tuple[str, ...] = ()
    final_paths: tuple[str, ...] = ()
    handshake_retries: int | None = None
    failure: str = ""


def parse_run(out: str, returncode: int, seconds: float, err: str = "") -> Run:
    """Read one run's output. ``paths`` are each host's path when the tunnels came up (the
    throughput is measured on it), ``final_paths`` the ones at the end (after the move, for
    roam-home); ``handshake_retries`` is the sum over the status lines printed right after the
    tunnels came up (the cold start)."""
    ping, up, rate = _PING.search(out), _UP.search(out), _RATE.search(out)
    lines = _PATH.findall(out)
    first = lines[:2]
    retries = (sum(int(r) for _, _, r in first if r) if first and all(r for _, _, r in first)
               else None)
    ok = (returncode == 0 and ping is not None and rate is not None
          and "SHA-256 matches" in out and "DIFFERS" not in out)
    failure = ""
    if not ok:
        failed = [line for line in out.splitlines() if "lab failed" in line or "Error" in line]
        last = err.strip().splitlines()[-1:] if err.strip() else []
        failure = (failed[0] if failed else last[0] if last else "") or f"exit status {returncode}"
    return Run(ok=ok, seconds=seconds,
               first_ping=float(ping.group(1)) if ping else None,
               tunnels_up=float(up.group(1)) if up else None,
               mbit_s=float(rate.group(3)) if rate else None,
               paths=tuple(p for _, p, _ in first),
               final_paths=tuple(p for _, p, _ in lines[-2:]),
               handshake_retries=retries, failure=failure)


def run_once(scenario: str, pair: str, megabytes: int, timeout: float = 300) -> Run:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "btmm_core", "lab", "--scenario", scenario,
                               "--dataplane", pair, "--megabytes", str(megabytes)],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        return Run(ok=False, seconds=time.monotonic() - t0, failure=f"timeout {timeout} s")
    return parse_run(proc.stdout, proc.returncode, time.monotonic() - t0, proc.stderr)


@dataclass
class Series:
    scenario: str
    pair: str
    runs: list[Run] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        good = [r for r in self.runs if r.ok]
        longest = streak = 0
        for r in self.runs:
            streak = streak + 1 if r.ok else 0
            longest = max(longest, streak)

        def median(values: list[float | None]) -> float | None:
            vals = [v for v in values if v is not None]
            return statistics.median(vals) if vals else None

        paths = sorted({" → ".join(dict.fromkeys(["/".join(sorted(set(r.paths))),
                                                  "/".join(sorted(set(r.final_paths)))]))
                        for r in good if r.paths})
        retries = [r.handshake_retries for r in self.runs if r.handshake_retries is not None]
        return {
            "scenario": self.scenario, "pair": PAIRS.get(self.pair, self.pair),
            "passed": len(good), "runs": len(self.runs), "longest_streak": longest,
            "first_ping_median_s": median([r.first_ping for r in good]),
            "first_ping_max_s": max((r.first_ping for r in good if r.first_ping), default=None),
            "mbit_s_median": median([r.mbit_s for r in good]),
            "paths": paths,
            "handshake_retries_total": sum(retries) if retries else None,
            "runs_with_retries": sum(1 for r in retries if r),
            "failures": [r.failure for r in self.runs if not r.ok],
        }


def table(summaries: list[dict[str, Any]]) -> str:
    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    rows = ["| scenario | engines | passed | first ping (median, max) | path | TCP Mbit/s "
            "(median) | handshake retries |",
            "|---|---|---:|---:|---|---:|---:|"]
    for s in summaries:
        rows.append(
            f"| {s['scenario']} | {s['pair']} | {s['passed']}/{s['runs']} | "
            f"{num(s['first_ping_median_s'], '.2f')} s, {num(s['first_ping_max_s'], '.2f')} s | "
            f"{', '.join(s['paths']) or '—'} | {num(s['mbit_s_median'], '.0f')} | "
            f"{'—' if s['handshake_retries_total'] is None else s['handshake_retries_total']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m bench.lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--pairs", nargs="+", choices=list(PAIRS), default=["fast", "mixed"])
    ap.add_argument("--megabytes", type=int, default=100)
    ap.add_argument("--json", type=Path, help="also write the runs and summaries here")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.lab builds network namespaces: run it as root", file=sys.stderr)
        return 2
    series = [Series(s, p) for s in args.scenarios for p in args.pairs]
    # interleaved: run i of every series before run i+1 of any, so machine noise spreads evenly
    for i in range(args.runs):
        for s in series:
            run = run_once(s.scenario, s.pair, args.megabytes)
            s.runs.append(run)
            print(f"[{i + 1}/{args.runs}] {s.scenario} {PAIRS[s.pair]}: "
                  + (f"ok, first ping {run.first_ping:.2f} s, {run.mbit_s:.0f} Mbit/s, "
                     f"path {'/'.join(run.paths)} then {'/'.join(run.final_paths)}, "
                     f"retries {run.handshake_retries}"
                     if run.ok else f"FAILED after {run.seconds:.0f} s: {run.failure}"),
                  flush=True)
    summaries = [s.summary() for s in series]
    print(table(summaries))
    if args.json:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit,
            "cores": os.cpu_count(), "summaries": summaries,
            "runs": {f"{s.scenario} {s.pair}": [asdict(r) for r in s.runs] for s in series},
        }, indent=1))
    return 0 if all(s["passed"] == s["runs"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
