"""bench.scale at a size CI can afford (issue 16, "Scale"): every host learns every other, one
ping between two of them opens exactly that pair's tunnel (tunnels on demand), and the figures
the bench reports are there."""

from __future__ import annotations

import json

import pytest

from bench.scale import build, measure
from btmm_core.lab.netns import Lab

pytestmark = pytest.mark.netns


def test_four_hosts_know_each_other_and_only_the_pair_that_talks_holds_a_tunnel() -> None:
    result = measure(4, settle=2.0, window=3.0, timeout=120.0)
    assert result["hosts"] == 4 and result["cold_start_hosts"] == 3
    assert result["know_all_s"] > 0 and result["join_s"] > 0
    assert result["ping_answered"]
    assert result["tunnels_up"] == {"desktop": 1, "laptop": 1}
    assert 0 < result["rss_mib_median"] <= result["rss_mib_max"]
    assert result["registry_rss_mib"] > 0
    assert result["idle_cpu_pct_max"] >= result["idle_cpu_pct_median"] >= 0


def test_the_lab_internet_neighbours_are_pinned() -> None:
    """Every host plugged into the lab internet, and the registry's bridge, hold a permanent
    ARP entry for each of the others (the kernel's one table for all namespaces overflows
    past about 30 hosts otherwise)."""
    with Lab("btmmx") as lab:
        world = build(lab, 3)
        expected = {"203.0.113.1", "203.0.113.21", "203.0.113.22", "203.0.113.23"}
        for ns, own in [(world.inet, "203.0.113.1"),
                        *((h.ns, f"203.0.113.{20 + i}") for i, h in
                          enumerate(world.hosts.values(), start=1))]:
            rows = json.loads(ns.run(["ip", "-j", "-4", "neigh", "show", "nud",
                                      "permanent"]).stdout)
            assert {r["dst"] for r in rows} >= expected - {own}, ns.name
