#!/usr/bin/env python3
"""Codec benchmark: seal+open per engine beside bare AES-256-GCM (see btmm_core/dataplane/bench.py).

python3 bench/codec.py            # table, both engines, 64/512/1400-byte packets
python3 bench/codec.py --json     # for machines
python3 bench/codec.py --quick    # smoke run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from btmm_core.dataplane.bench import main

if __name__ == "__main__":
    main()
