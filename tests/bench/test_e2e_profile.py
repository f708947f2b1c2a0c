"""The per-packet profile of the end-to-end bench (`python3 -m bench.e2e.profile`): the pure
parser and categories on a recorded `perf report`, then one short run through the fast engine
over the IPv6 underlay that checks the report's structure. Never a speed threshold."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from e2e_helpers import REPO, env

from bench.e2e import profile as p

REPORT = """\
# Samples: 1K of event 'cpu-clock:pppH'
#
# Overhead  Shared Object      Symbol
# ........  .................  ..........................
#
    10.46%  [kernel.kallsyms]  [k] _copy_to_iter
     5.17%  _fast.abi3.so      [.] ring_core_0_17_14__aes_gcm_enc_update_vaes_avx2
     4.38%  [kernel.kallsyms]  [k] finish_task_switch.isra.0
     3.65%  _fast.abi3.so      [.] btmm_fast::offload::Tcp6Gso::write_segment
     2.19%  [kernel.kallsyms]  [k] udpv6_recvmsg
     1.70%  [kernel.kallsyms]  [k] ___slab_alloc
     1.76%  libc.so.6          [.] __memmove_avx512_unaligned_erms
     0.73%  _fast.abi3.so      [.] btmm_fast::engine::tx::TxBatch::flush
     0.50%  python3.11         [.] _PyEval_EvalFrameDefault
     0.20%  libm.so.6          [.] cos
"""


def test_perf_rows_fall_into_their_categories() -> None:
    rows = p.parse_report(REPORT)
    assert len(rows) == 10
    assert rows[0] == p.Sample(10.46, "[kernel.kallsyms]", "_copy_to_iter")
    got = {r.symbol.split("::")[-1][:20]: p.category(r) for r in rows}
    assert got == {
        "_copy_to_iter": "copies",
        "ring_core_0_17_14__a": "crypto",
        "finish_task_switch.i": "locking & scheduling",
        "write_segment": "segmentation & checksums",
        "udpv6_recvmsg": p.KERNEL,
        "___slab_alloc": "memory (skb, slab)",
        "__memmove_avx512_una": "copies",
        "flush": p.ENGINE,
        "_PyEval_EvalFrameDef": p.PYTHON,
        "cos": p.OTHER,
    }
    shares = p.shares(rows)
    assert list(shares) == list(p.CATEGORIES)
    assert shares["copies"] == pytest.approx(12.2)
    assert sum(shares.values()) == pytest.approx(sum(r.share for r in rows), abs=0.2)


def test_veth_has_nothing_to_profile() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.e2e.profile", "--systems", "veth"],
        capture_output=True, text=True, timeout=60, env=env(), cwd=str(REPO),
    )  # fmt: skip
    assert proc.returncode == 2 and "no tunnel process" in proc.stderr, proc.stderr


@pytest.mark.netns
def test_a_short_profile_of_the_fast_engine_over_ipv6() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.e2e.profile", "--systems", "btmm-fast-ipv6",
         "--seconds", "2", "--json"],
        capture_output=True, text=True, timeout=300, env=env(), cwd=str(REPO),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = json.loads(proc.stdout)
    assert result["system"] == "btmm-fast-ipv6" and result["tcp1_gbps"] > 0
    assert list(result["categories"]) == list(p.CATEGORIES)
    # the engine sealed and opened ESP, so crypto and the kernel's UDP path were sampled
    assert result["categories"]["crypto"] > 0 and result["categories"][p.KERNEL] > 0
    assert 90 <= sum(result["categories"].values()) <= 100.5
    assert result["top"] and all(t["share"] > 0 for t in result["top"])
