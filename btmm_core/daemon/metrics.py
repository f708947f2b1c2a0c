"""``btmm up --metrics ADDR``: what the daemon's Prometheus metrics are, read at scrape time.

A collector over the daemon's live state (the engine's counters, each peer's session and
path manager), called on the event loop by ``metrics/exporter.py``. Every series of a peer is
labelled with its host label (``peer="desktop"``) and goes when the peer goes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from btmm_core.daemon.pathset import tunnel_state

if TYPE_CHECKING:
    from btmm_core.daemon.host import Daemon


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        packets = CounterMetricFamily("btmm_peer_packets", "Inner packets through the tunnel "
                                      "(in: authenticated and delivered; out: sealed and sent)",
                                      labels=["peer", "direction"])
        octets = CounterMetricFamily("btmm_peer_bytes", "Inner bytes through the tunnel",
                                     labels=["peer", "direction"])
        drops = CounterMetricFamily("btmm_peer_drops", "Packets of a peer dropped, by reason",
                                    labels=["peer", "reason"])
        handshakes = CounterMetricFamily("btmm_peer_handshakes",
                                         "Completed handshakes (the first and every rekey)",
                                         labels=["peer"])
        rekeys = CounterMetricFamily("btmm_peer_rekeys", "Completed handshakes that replaced "
                                     "the keys in use", labels=["peer"])
        retries = CounterMetricFamily("btmm_peer_handshake_retries",
                                      "Initiations sent again for want of an answer",
                                      labels=["peer"])
        failures = CounterMetricFamily("btmm_peer_handshake_failures",
                                       "Handshakes given up or refused", labels=["peer"])
        changes = CounterMetricFamily("btmm_peer_path_changes",
                                      "Times the tunnel was pointed at a path (the first "
                                      "included)", labels=["peer"])
        up = GaugeMetricFamily("btmm_peer_tunnel_up",
                               "1 while the tunnel has keys and its path answers",
                               labels=["peer"])
        opens = CounterMetricFamily("btmm_peer_tunnel_opens",
                                    "On-demand tunnel openings (a packet or a name lookup "
                                    "wanted the peer)", labels=["peer"])
        closes = CounterMetricFamily("btmm_peer_tunnel_closes",
                                     "On-demand tunnels closed when idle", labels=["peer"])
        rejects = CounterMetricFamily("btmm_peer_tunnel_rejects",
                                      "On-demand openings given up (held packets answered "
                                      "ICMPv6 unreachable)", labels=["peer"])
        rtt = GaugeMetricFamily("btmm_peer_path_rtt_seconds",
                                "Round trip of the path's last answered probe",
                                labels=["peer"])
        infos = {} if d.engine is None else {p.inner: p for p in d.engine.peers()}
        mono = asyncio.get_running_loop().time()
        for peer in d.peers.values():
            name = peer.records.host
            inner = str(peer.records.ula)
            info = infos.get(inner)
            if info is not None:
                c = info.counters
                packets.add_metric([name, "in"], c.packets_in)
                packets.add_metric([name, "out"], c.packets_out)
                octets.add_metric([name, "in"], c.bytes_in)
                octets.add_metric([name, "out"], c.bytes_out)
                for reason, n in sorted((c.drops or {}).items()):
                    drops.add_metric([name, reason], n)
            session = None if d.kx is None else d.kx.by_inner.get(inner)
            # completed, in either role (the session counts only the initiations it sent)
            handshakes.add_metric([name], peer.handshakes)
            if session is not None:
                rekeys.add_metric([name], session.rekeys)
                retries.add_metric([name], session.retries)
                failures.add_metric([name], session.failures)
            changes.add_metric([name], d.path_changes.get(inner, 0))
            state = tunnel_state(info is not None and info.tx_spi is not None,
                                 d.paths.state(inner))
            up.add_metric([name], 1.0 if state == "up" else 0.0)
            n_opens, n_closes, n_rejects = d.ondemand.counts(inner)
            opens.add_metric([name], n_opens)
            closes.add_metric([name], n_closes)
            rejects.add_metric([name], n_rejects)
            ms = d.paths.status(inner, mono).get("rtt_ms")
            if isinstance(ms, (int, float)):
                rtt.add_metric([name], ms / 1000)
        yield from (packets, octets, drops, handshakes, rekeys, retries, failures, changes, up,
                    opens, closes, rejects, rtt)
        peers = GaugeMetricFamily("btmm_peers", "Verified peers followed")
        peers.add_metric([], len(d.peers))
        yield peers
        if d.engine is not None:
            total = d.engine.counters()
            engine_drops = CounterMetricFamily(
                "btmm_engine_drops", "Every packet the engine dropped, by reason (the peers' "
                "and those of no peer: unknown SPI, no route, malformed)", labels=["reason"])
            for reason, n in sorted((total.drops or {}).items()):
                engine_drops.add_metric([reason], n)
            yield engine_drops
            keepalives = CounterMetricFamily("btmm_engine_keepalives_received",
                                             "NAT keepalives received")
            keepalives.add_metric([], total.keepalives_in)
            yield keepalives
        probe_drops = CounterMetricFamily("btmm_path_probe_drops",
                                          "Path probe messages dropped before any peer's "
                                          "manager saw them", labels=["reason"])
        for reason, n in sorted(d.paths.drops.items()):
            probe_drops.add_metric([reason], n)
        yield probe_drops
        if d.control is not None:
            requests = CounterMetricFamily("btmm_control_requests",
                                           "Control socket requests answered, and refused by "
                                           "error code", labels=["result"])
            requests.add_metric(["ok"], d.control.requests)
            for code, n in sorted(d.control.errors.items()):
                requests.add_metric([code], n)
            yield requests
