"""Micro-bench of the registry core's signed-query path, without sockets: µs per
``RegistryCore.receive`` of a TSIG-signed query for a name the registry holds.

    python3 -m bench.query_path [--count 20000] [--reps 5]

``cached`` is the path dnsperf exercises (the same 200 names asked again and again: the answer
comes from the answer cache, the TSIG is verified and the answer signed per query); ``full`` is
the path with the cache off (dnspython parses and renders every message). Medians of ``--reps``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import dns.message
import dns.name
import dns.rdatatype
import dns.update
import structlog

from btmm_core.dns.tsig import sign
from btmm_core.registry.accounts import add_user
from btmm_core.registry.handler import RegistryCore, Transport
from btmm_core.registry.storage import MemoryStorage
from btmm_core.registry.zones import ZoneConfig, ZoneStore

PARENT = dns.name.from_text("members.example.")
NAMES = 200
NOW = 1_800_000_000


def core() -> tuple[RegistryCore, list[bytes]]:
    """A core on memory storage with ``NAMES`` AAAA records in bob's zone, and one signed
    query per name (each signed once: the bench varies the ID and time, see ``run``)."""
    storage = MemoryStorage()
    storage.ensure_zone(PARENT, None)
    account = add_user(storage, "bob", PARENT, legacy=False)
    config = ZoneConfig(PARENT, dns.name.from_text("ns.members.example."), ("192.0.2.53",), 53)
    c = RegistryCore(ZoneStore(storage, config))
    zone = account.key.zone
    u = dns.update.UpdateMessage(zone)
    for i in range(NAMES):
        u.add(f"hq{i}", 300, "AAAA", f"fd00::{i + 1:x}")
    wire, _ = sign(u.to_wire(), account.key, time_signed=NOW, fudge=300)
    reply = c.receive(wire, NOW, Transport.UDP)
    assert reply is not None and reply[3] & 0xF == 0, "populating failed"
    queries = []
    for i in range(NAMES):
        q = dns.message.make_query(f"hq{i}.{zone}", dns.rdatatype.AAAA, use_edns=False)
        queries.append(q.to_wire())
    return c, queries


def run(count: int, cached: bool) -> float:
    """µs per signed query over ``count`` queries (signing them is not timed)."""
    from btmm_core.dns.tsig import TsigKey

    c, queries = core()
    key: TsigKey = next(k for k in c.store.keys.values())
    if not cached:
        c.answer_cache_size = 0
    signed = []
    for i in range(count):
        q = queries[i % NAMES]
        q = (i & 0xFFFF).to_bytes(2, "big") + q[2:]
        wire, _ = sign(q, key, time_signed=NOW + i // 1000, fudge=300)
        signed.append((wire, NOW + i // 1000))
    started = time.perf_counter()
    for wire, now in signed:
        c.receive(wire, now, Transport.UDP, "127.0.0.1")
    took = time.perf_counter() - started
    assert c.responses[0] == count, f"not all NOERROR: {c.responses}"
    # the first query of each name fills the cache; with it on, every later one is a hit
    assert c.cached_answers == (max(count - NAMES, 0) if cached else 0), c.cached_answers
    return took / count * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for name, cached in (("cached", True), ("full", False)):
        runs = [run(args.count, cached) for _ in range(args.reps)]
        print(f"{name:6} signed query: {statistics.median(runs):6.1f} µs "
              f"(min {min(runs):.1f}, max {max(runs):.1f}, {args.reps} runs of {args.count})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
