"""The end-to-end bench: tunnels side by side, with iperf3 through each of them.

    python3 -m bench.e2e                       # 3 interleaved repetitions, every system; prints
    python3 -m bench.e2e --quick               # smoke run
    python3 -m bench.e2e --systems btmm-fast,wireguard-go --repetitions 5
    python3 -m bench.e2e --json                # the JSON report on stdout
    python3 -m bench.e2e --save                # and write the published figures, bench/results/

Two namespaces joined by a veth pair; per system, a tunnel between them and iperf3 across it.
The harness is cut in three:

- ``systems``: how each system (plain veth, btmm with either engine, wireguard-go, OpenVPN) is
  brought up in a fresh two-namespace lab, and the tools each needs;
- ``measure``: iperf3 runs (TCP streams, a bounded UDP rate search), the CPU time of the tunnel
  processes, interleaved repetitions, and the summary (medians, min-max, ratios);
- ``report``: the JSON report (with the versions measured), the table and the chart;

and ``cli`` is the command (``python3 -m bench.e2e``, ``btmm bench --e2e``).

The machine is shared and noisy (docs/architecture.md section 11): repetitions are
interleaved (rep 1 of every system, then rep 2, ...), and every system in every repetition
gets a fresh lab, so that nothing of one run (a full socket buffer, a stray process) leaks into
the next. Every traffic source is iperf3 with ``-t``, and every command runs with a timeout:
nothing sends unbounded.
"""

from __future__ import annotations

from btmm_core.errors import BtmmError


class BenchError(BtmmError):
    """The end-to-end bench could not set up or measure a system."""
