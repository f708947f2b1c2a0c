"""bench.scale at a size CI can afford (issue 16, "Scale"): every host learns every other, one
ping between two of them opens exactly that pair's tunnel (tunnels on demand), and the figures
the bench reports are there."""

from __future__ import annotations

import pytest

from bench.scale import measure

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
