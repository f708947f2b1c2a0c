"""``btmm serve --metrics ADDR``: the registry's Prometheus metrics.

Counters the cores keep anyway (``RegistryCore.responses``, ``tsig_errors``,
``leases_expired``, ``updates_over_limit``; ``LLQServer.stats`` and its live LLQs; the STUN
responder's stats) are read at scrape time by a collector, on the event loop
(``metrics/exporter.py`` says why). The one measurement no core makes is the commit latency:
the SQLite storage times each zone transaction, BEGIN to durable COMMIT, into a histogram.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import dns.opcode
import dns.rcode
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from btmm_core.registry.storage import SqliteStorage

if TYPE_CHECKING:
    from btmm_core.serve.compose import Registry

#: commit latency buckets (seconds): an fsync on SSD is ~0.1-2 ms, on a busy disk tens of ms
COMMIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _name(to_text: object, code: int) -> str:
    try:
        return str(to_text(code))  # type: ignore[operator]
    except Exception:  # a code dnspython has no name for
        return str(code)


class RegistryCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        core, llq, stun = self.registry.core, self.registry.llq, self.registry.stun
        responses = CounterMetricFamily("btmm_registry_responses",
                                        "DNS answers sent, by opcode (QUERY, UPDATE, ...) and "
                                        "rcode", labels=["opcode", "rcode"])
        for codes, n in sorted(core.responses.items()):
            responses.add_metric([_name(dns.opcode.to_text, codes >> 8),
                                  _name(dns.rcode.to_text, codes & 0xFF)], n)
        yield responses
        tsig = CounterMetricFamily("btmm_registry_tsig_errors",
                                   "Signed requests refused, by TSIG error", labels=["kind"])
        for kind, n in sorted(core.tsig_errors.items()):
            tsig.add_metric([kind], n)
        yield tsig
        over = CounterMetricFamily("btmm_registry_updates_over_limit",
                                   "Updates refused by the per-update and per-key limits")
        over.add_metric([], core.updates_over_limit)
        yield over
        expired = CounterMetricFamily("btmm_registry_lease_expiries",
                                      "RRsets removed because their update lease ran out")
        expired.add_metric([], core.leases_expired)
        yield expired
        groups = CounterMetricFamily("btmm_registry_group_commits",
                                     "Group commits: transactions shared by the updates that "
                                     "arrived together, and the updates in them",
                                     labels=["kind"])
        groups.add_metric(["transactions"], core.groups)
        groups.add_metric(["updates"], core.grouped_updates)
        yield groups
        zones = GaugeMetricFamily("btmm_registry_zones", "Zones served")
        zones.add_metric([], len(core.store.zones))
        yield zones
        active = GaugeMetricFamily("btmm_llq_active", "Long-lived queries established now")
        active.add_metric([], len(llq.llqs))
        yield active
        ops = CounterMetricFamily("btmm_llq_operations",
                                  "LLQ server events by kind (established, refreshes, events, "
                                  "acks, resends, expired, ...)", labels=["kind"])
        for kind, n in sorted(llq.stats.items()):
            ops.add_metric([kind], n)
        yield ops
        if stun is not None:
            st = CounterMetricFamily("btmm_stun_requests", "STUN datagrams by outcome",
                                     labels=["outcome"])
            for outcome, n in sorted(stun.responder.stats.as_dict().items()):
                st.add_metric([outcome], n)
            yield st
        turn = self.registry.turn
        if turn is not None:
            creds = CounterMetricFamily("btmm_turn_credentials",
                                        "TURN credential requests: offers issued, refusals by "
                                        "reason", labels=["outcome"])
            for outcome, n in sorted(turn.stats.items()):
                creds.add_metric([outcome], n)
            yield creds


def metrics_registry(registry: Registry) -> CollectorRegistry:
    """The collector registry ``btmm serve --metrics`` exposes (its own, not the library's
    global one, so that two servers in one process, as in the tests, do not mix)."""
    out = CollectorRegistry(auto_describe=False)
    commits = Histogram("btmm_registry_commit_seconds",
                        "Zone transactions, BEGIN to durable COMMIT (SQLite, synchronous=FULL)",
                        buckets=COMMIT_BUCKETS, registry=out)
    storage = registry.core.store.storage
    if isinstance(storage, SqliteStorage):
        storage.commit_observer = commits.observe
    out.register(RegistryCollector(registry))
    return out
