"""The end-to-end bench's report: the JSON (settings, versions measured, summary, every run),
the table for a terminal and the chart (matplotlib, a development dependency)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import REPO
from bench.e2e.measure import (
    CEILING,
    LOSS_LIMIT,
    METRICS,
    REFERENCE,
    UDP_SIZES,
    UDP_SOCKET_BUFFER,
    Durations,
    RunResult,
    summarize,
)
from bench.e2e.systems import INNER_MTU


def to_json(
    runs: Sequence[RunResult], systems: Sequence[str], durations: Durations
) -> dict[str, Any]:
    return {
        "bench": "btmm end-to-end (iperf3 through each tunnel between two namespaces)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": _versions(systems),
        "settings": {
            **asdict(durations),
            "systems": list(systems),
            "inner_mtu": INNER_MTU,
            "udp_sizes": list(UDP_SIZES),
            "loss_limit": LOSS_LIMIT,
            "udp_socket_buffer": UDP_SOCKET_BUFFER,
            "udp_search": "probe 1 unlimited (-b 0); then at most udp_probes - 1 more: just "
            "below the rate that got through until one loses < loss_limit, then geometric "
            "bisection up to twice that rate; a final probe at 0.7 of what got through at the "
            "last lossy rate if none was lossless yet",
            "openvpn_mode": "p2p TLS (self-signed, --peer-fingerprint), AES-256-GCM, UDP, no DCO",
        },
        "units": {
            "gbps": "Gbit/s; TCP: iperf3 receiver goodput; UDP: whole inner IPv6 packets",
            "pps": "packets/s received, at the fastest offered rate with loss < loss_limit",
            "cpu": "CPU time of the tunnel processes of both ends (user + system) over the "
            "test, percent of one core; kernel work outside them (softirq) is not counted",
            "sizes": "UDP sizes count the whole inner IPv6 packet (40 + 8 header bytes)",
        },
        "summary": summarize(runs, systems),
        "runs": [asdict(r) for r in runs],
    }


def _versions(systems: Sequence[str]) -> dict[str, str]:
    commands = {
        "iperf3": ["iperf3", "--version"],
        "wireguard-go": ["wireguard-go", "--version"],
        "openvpn": ["openvpn", "--version"],
    }
    wanted = ["iperf3"] + [s for s in systems if s in commands]
    out = {}
    if any(s.startswith("btmm-") for s in systems):
        out["btmm"] = _btmm_version()
    for name in wanted:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            proc = subprocess.run(commands[name], capture_output=True, text=True, timeout=10)
            first = (proc.stdout or proc.stderr).strip().splitlines()
            out[name] = first[0] if first else ""
    return out


def _btmm_version() -> str:
    """The commit measured, whether the Rust sources differ from it, and when the extension
    was built: the engine changes under active work, and a figure must say what it measured.
    Outside a git checkout (or without git) the commit is "unknown", never an error."""
    parts = [_commit()]
    for so in sorted((REPO / "btmm_core").glob("_fast*.so")):
        built = datetime.datetime.fromtimestamp(so.stat().st_mtime, datetime.UTC)
        parts.append(f"{so.name} built {built.isoformat(timespec='seconds')}")
    return ", ".join(parts)


def _commit() -> str:
    def git(*args: str) -> str | None:
        argv = ["git", "-C", str(REPO), *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    head = git("rev-parse", "--short", "HEAD")
    if not head:
        return "commit unknown (not a git checkout)"
    dirty = git("status", "--porcelain", "--", "btmm_fast")
    return f"commit {head}" + (" (btmm_fast/ modified)" if dirty else "")


def table(report: dict[str, Any]) -> Any:
    """Metrics down, systems across: median, min-max, and the ratios to wireguard-go and
    plain veth under each number."""
    from rich.table import Table

    summary = report["summary"]
    t = Table(
        title="End to end through each tunnel (iperf3, two namespaces, one veth pair)",
        caption=f"median (min-max) of {report['settings']['repetitions']} interleaved "
        "repetitions; x wg: ratio to wireguard-go; % veth: share of plain veth; "
        "* sender-bound in n: in n runs iperf3's sender, not the path, set the UDP figure",
    )
    t.add_column("metric")
    for system in summary:
        t.add_column(system, justify="right")
    for key, label, unit, _ in METRICS:
        digits = 0 if key.endswith(("_cpu", "_kpps")) else 2
        cells = []
        for system, metrics in summary.items():
            m = metrics.get(key)
            if m is None:
                cells.append("-")
                continue
            lines = [f"{m['median']:.{digits}f}", f"({m['min']:.{digits}f}-{m['max']:.{digits}f})"]
            ratios = []
            if m.get("vs_wireguard_go") is not None and system != REFERENCE:
                ratios.append(f"{m['vs_wireguard_go']:.2f}x wg")
            if m.get("vs_veth") is not None and system != CEILING:
                ratios.append(f"{100 * m['vs_veth']:.0f}% veth")
            if m.get("sender_limited_runs"):
                ratios.append(f"* sender-bound in {m['sender_limited_runs']}")
            cells.append("\n".join(lines + ratios))
        t.add_row(f"{label}\n{unit}", *cells, end_section=True)
    return t


def chart(report: dict[str, Any], path: Path) -> None:
    """Bars of the medians with min-max whiskers, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    systems = list(summary)
    fig, axes = plt.subplots(2, 4, figsize=(18, 8.5))
    flat = list(axes.flat)
    colors = [f"C{i}" for i in range(10)]  # matplotlib's default cycle, one per system
    for ax, (key, label, unit, _) in zip(flat, METRICS, strict=False):
        shown = [s for s in systems if key in summary[s]]
        med = [summary[s][key]["median"] for s in shown]
        low = [summary[s][key]["median"] - summary[s][key]["min"] for s in shown]
        high = [summary[s][key]["max"] - summary[s][key]["median"] for s in shown]
        bars = ax.bar(
            range(len(shown)), med, yerr=[low, high], capsize=4,
            color=[colors[systems.index(s) % len(colors)] for s in shown],
        )  # fmt: skip
        marks = ["*" if summary[s][key].get("sender_limited_runs") else "" for s in shown]
        ax.bar_label(
            bars, labels=[f"{v:.3g}{m}" for v, m in zip(med, marks, strict=True)], padding=2,
            fontsize=8,
        )  # fmt: skip
        ax.set_xticks(range(len(shown)), shown, rotation=25, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_ylabel(unit)
        ax.margins(y=0.15)
    for ax in flat[len(METRICS) :]:
        ax.axis("off")
    flat[-1].text(
        0.0, 0.5,
        f"{report['date']}\nkernel {report['machine']['kernel']}, "
        f"{report['machine']['cpus']} CPUs\n"
        f"median of {report['settings']['repetitions']} interleaved repetitions,\n"
        f"whiskers: min-max\ninner MTU {INNER_MTU}, IPv6 inside every tunnel\n"
        "*: in some runs the iperf3 sender, not the path,\n   set the UDP figure",
        fontsize=9, va="center",
    )  # fmt: skip
    fig.suptitle("btmm end-to-end bench: iperf3 through each tunnel")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
