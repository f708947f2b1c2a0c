"""btmm's benchmarks: developer tools run from a source checkout, not part of the installed tool.

    python3 -m bench.codec         # ESP codec per engine beside bare AES-256-GCM (= `btmm bench`)
    python3 -m bench.e2e           # iperf3 through btmm, wireguard-go, OpenVPN beside veth (root)
    python3 -m bench.registry      # `btmm serve` beside BIND's named under dnsperf
    python3 -m bench.query_path    # µs per signed query in the registry core
    python3 -m bench.llq           # LLQ event latency and events/s with N watchers
    python3 -m bench.big_update    # how long one maximal signed UPDATE holds the registry core
    python3 -m bench.soak --minutes 60  # four hosts under churn: losses, recoveries, leaks (root)

Why a package at the repository root and not ``btmm_core/bench/``: the benchmarks need what a
user's machine does not (network namespaces through ``btmm_core.lab``, iperf3, wireguard-go,
OpenVPN, BIND, dnsperf, valgrind, git for the commit a figure measured, matplotlib for the
chart), and they compare btmm with other systems, which is the developers' question, not the
user's. So the wheel (maturin ``python-packages = ["btmm_core"]``) does not carry them, and
runtime code never imports them. ``btmm bench`` stays a command of the ``btmm`` tool for
convenience: ``btmm_core/cli.py`` imports this package only when the command runs, and from an
installed wheel it says to run it from a source checkout (after ``./scripts/setup``, whose
editable install puts the checkout on ``sys.path`` through ``btmm.pth``).

Results: a run prints its figures and writes nothing into the repository unless asked
(``--save`` or ``--output PATH``); see ``bench/README.md`` for the published figures in
``bench/results/``.
"""

from __future__ import annotations

from pathlib import Path

#: the checkout this package lives in (the benchmarks start ``btmm`` processes from it)
REPO = Path(__file__).resolve().parent.parent
#: where the published figures live (tracked in git, written only on request)
RESULTS = REPO / "bench" / "results"
