#!/usr/bin/env python3
"""End-to-end bench: iperf3 through btmm (fast and python engines), wireguard-go and OpenVPN 2.6,
beside plain veth, in two network namespaces (see btmm_core/dataplane/e2e_bench.py). Needs root.

python3 bench/e2e.py                              # 3 interleaved repetitions, every system
python3 bench/e2e.py --quick                      # smoke run
python3 bench/e2e.py --systems btmm-fast,wireguard-go --repetitions 5
python3 bench/e2e.py --json                       # the JSON report on stdout

Writes bench/results/e2e.json and bench/results/e2e.png unless told otherwise (--output, --chart).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from btmm_core.dataplane.e2e_bench import script

if __name__ == "__main__":
    script()
