"""Where a tunnel's time goes: perf samples of the tunnel processes during one iperf3 TCP
stream through them, grouped into what the issue asks about (crypto, copies, system calls and
the kernel's UDP/IP path, segmentation and checksums, memory, locking and scheduling).

    python3 -m bench.e2e.profile --systems btmm-fast,btmm-fast-ipv6 --seconds 8

Each system gets its own two-namespace lab (``systems.system_lab``, the e2e bench's); ``perf
record -F 999`` samples both tunnel processes (every thread, user and kernel) while iperf3
runs, and ``perf report`` lists the samples by shared object and symbol. The shares are of the
tunnel processes' samples only: where *their* CPU time went, not the iperf3 ends' or the
softirq work done on other tasks' behalf. Needs root and perf (Debian: linux-perf).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.e2e import BenchError
from bench.e2e.systems import IPERF_PORT, SYSTEMS, parse_systems, system_lab

#: categories in the order they are tested: the first whose keywords occur in a sample's
#: symbol takes it; then kernel symbols, the engine's own code and the interpreter
KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("crypto", ("aes", "gcm", "ghash", "aead")),
    ("copies", ("memcpy", "memmove", "copy_to_iter", "copy_from_iter", "copy_from_user",
                "copy_to_user", "skb_copy", "datagram_iter", "check_object_size")),
    ("segmentation & checksums", ("csum", "gso", "segment", "gro", "offload::")),
    ("memory (skb, slab)", ("slab", "kmem_cache", "kfree", "alloc_skb", "skb_release",
                            "page_frag", "netmem", "free_unref", "__alloc_pages")),
    ("locking & scheduling", ("spin_lock", "spin_unlock", "mutex", "futex", "task_switch",
                              "schedule", "__switch_to", "write_msr", "pthread")),
)  # fmt: skip
KERNEL = "kernel: syscalls, UDP/IP, TUN"
ENGINE = "engine code"
PYTHON = "python interpreter"
OTHER = "other"

_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[[.kgu]\]\s+(.+?)\s*$")


@dataclass(frozen=True)
class Sample:
    share: float  #: percent of the tunnel processes' samples
    dso: str
    symbol: str


def parse_report(text: str) -> list[Sample]:
    """The rows of ``perf report --stdio --no-children -g none --sort dso,sym``."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append(Sample(float(m.group(1)), m.group(2), m.group(3)))
    return out


def category(sample: Sample) -> str:
    for name, words in KEYWORDS:
        if any(w in sample.symbol for w in words):
            return name
    if sample.dso == "[kernel.kallsyms]":
        return KERNEL
    if "_fast" in sample.dso or "btmm" in sample.dso:
        return ENGINE
    if "python" in sample.dso:
        return PYTHON
    return OTHER


#: every category, in the order tables list them
CATEGORIES = (*(name for name, _ in KEYWORDS), KERNEL, ENGINE, PYTHON, OTHER)


def shares(samples: Sequence[Sample]) -> dict[str, float]:
    """Percent per category (every category listed, in order), rounded to 0.1."""
    total = dict.fromkeys(CATEGORIES, 0.0)
    for s in samples:
        total[category(s)] += s.share
    return {k: round(v, 1) for k, v in total.items()}


def profile(system: str, seconds: int, workdir: Path) -> dict[str, object]:
    """One iperf3 TCP stream through ``system`` with perf sampling its tunnel processes."""
    data = workdir / f"perf-{system}.data"
    with system_lab(system, workdir) as hosts:
        if not hosts.tunnel_pids:
            raise BenchError(f"{system} has no tunnel process to profile")
        perf = subprocess.Popen(
            ["perf", "record", "-F", "999", "-p", ",".join(map(str, hosts.tunnel_pids)),
             "-o", str(data), "--", "sleep", str(seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        run = hosts.a.run(
            ["iperf3", "-c", hosts.target, "-p", str(IPERF_PORT), "-t", str(seconds + 1), "-J"],
            check=False,
            timeout=seconds + 60,
        )
        _, err = perf.communicate(timeout=seconds + 60)
        if perf.returncode != 0:
            raise BenchError(f"perf record failed: {err.strip()[-500:]}")
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "-g", "none",
         "--sort", "dso,sym", "--percent-limit", "0.05"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    samples = parse_report(report.stdout)
    if not samples:
        raise BenchError(f"perf report of {system} has no samples: {report.stderr.strip()[-500:]}")
    try:
        gbps = json.loads(run.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError) as exc:
        raise BenchError(f"iperf3 through {system} failed: {run.stderr[-500:]}") from exc
    top = sorted(samples, key=lambda s: -s.share)[:10]
    return {
        "system": system,
        "tcp1_gbps": round(gbps, 2),
        "categories": shares(samples),
        "top": [{"share": s.share, "dso": s.dso, "symbol": s.symbol} for s in top],
    }


def render(results: Sequence[dict[str, object]]) -> str:
    names = [str(r["system"]) for r in results]
    width = max(len(n) for n in [*names, "category"]) + 2
    lines = ["category".ljust(32) + "".join(n.rjust(width) for n in names)]
    for c in CATEGORIES:
        row = [f"{r['categories'][c]:.1f} %" for r in results]  # type: ignore[index]
        lines.append(c.ljust(32) + "".join(v.rjust(width) for v in row))
    lines.append("TCP 1 stream, Gbit/s".ljust(32)
                 + "".join(f"{r['tcp1_gbps']}".rjust(width) for r in results))  # fmt: skip
    for r in results:
        lines.append(f"\n{r['system']}: top symbols")
        for t in r["top"]:  # type: ignore[attr-defined]
            lines.append(f"  {t['share']:5.2f} %  {t['dso']}  {t['symbol']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.e2e.profile", description=__doc__)
    parser.add_argument(
        "--systems",
        default="btmm-fast,btmm-fast-ipv6",
        help=f"comma-separated tunnel systems of: {', '.join(SYSTEMS[1:])}",
    )
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        systems = parse_systems(args.systems)
        if "veth" in systems:
            raise BenchError("veth has no tunnel process to profile", hint="leave it out")
        if shutil.which("perf") is None:
            raise BenchError("perf is not installed", hint="install the Debian package linux-perf")
        with tempfile.TemporaryDirectory(prefix="btmm-profile-") as tmp:
            results = [profile(s, args.seconds, Path(tmp)) for s in systems]
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=1) if args.json else render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
