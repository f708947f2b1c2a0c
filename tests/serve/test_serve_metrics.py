"""``btmm serve --metrics``: the real server on loopback, scraped after real traffic (a query,
a signed update with a short lease, a request with a wrong signature): answers by opcode and
rcode, TSIG errors by kind, the commit latency histogram, the lease expiry, LLQ and STUN
counters. And a non-loopback address is refused before anything starts."""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.update
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from registry_helpers import PARENT, free_port, live_registry, state_dir

from btmm_core.cli import btmm
from btmm_core.dns.edns import UpdateLeaseOption
from btmm_core.dns.keyfile import read_key

BOB = "bob.members.example."


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _until(url: str, name: str, want: float, timeout: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            m = _scrape(url)
            if m.get(name, 0) >= want:
                return m
        except OSError:
            m = {}
        assert time.monotonic() < deadline, f"{name} not >= {want} within {timeout} s: {m}"
        time.sleep(0.1)


def test_scraped_after_real_traffic() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with state_dir("btmm-metrics-") as state, live_registry(
        state, "--metrics", f"127.0.0.1:{port}", "--lease-min", "1", users=(("bob", False),)
    ) as reg:
        _until(url, "btmm_llq_active", 0)  # the endpoint answers
        q = dns.message.make_query(PARENT, dns.rdatatype.SOA)
        assert dns.query.udp(q, "127.0.0.1", port=reg.port, timeout=5).rcode() == 0
        key = read_key(reg.keyfile("bob"))
        u = dns.update.UpdateMessage(BOB)
        u.replace("short", 60, "AAAA", "fd00::42")
        u.use_edns(0, 0, 1232, options=[UpdateLeaseOption(1)])
        u.use_tsig(dns.tsig.Key(key.name, key.secret, key.algorithm))
        assert dns.query.udp(u, "127.0.0.1", port=reg.port, timeout=5).rcode() == 0
        bad = dns.update.UpdateMessage(BOB)
        bad.add("evil", 60, "A", "192.0.2.1")
        bad.use_tsig(dns.tsig.Key(key.name, b"\x00" * 32, key.algorithm))
        try:
            dns.query.udp(bad, "127.0.0.1", port=reg.port, timeout=5)
            raise AssertionError("a wrong signature was accepted")
        except dns.tsig.PeerBadSignature:
            pass
        # the 1 s lease runs out; the registry's next timer pass removes the RRset
        m = _until(url, "btmm_registry_lease_expiries_total", 1)
        assert m['btmm_registry_responses_total{opcode="QUERY",rcode="NOERROR"}'] >= 1
        assert m['btmm_registry_responses_total{opcode="UPDATE",rcode="NOERROR"}'] == 1
        assert m['btmm_registry_responses_total{opcode="UPDATE",rcode="NOTAUTH"}'] == 1
        assert m['btmm_registry_tsig_errors_total{kind="BADSIG"}'] == 1
        assert m["btmm_registry_commit_seconds_count"] >= 1
        assert m["btmm_registry_commit_seconds_sum"] > 0
        assert m['btmm_registry_commit_seconds_bucket{le="+Inf"}'] >= 1
        assert m["btmm_registry_zones"] == 2
        # the one update went through a group commit of its own
        assert m['btmm_registry_group_commits_total{kind="transactions"}'] == 1
        assert m['btmm_registry_group_commits_total{kind="updates"}'] == 1
        assert m["btmm_llq_active"] == 0
        assert m["btmm_registry_updates_over_limit_total"] == 0
        assert not [k for k in m if k.startswith("btmm_stun")]  # --no-stun
        # BADVERS is an extended rcode: counted by its own name, not as NOERROR
        v1 = dns.message.make_query(PARENT, dns.rdatatype.SOA, use_edns=1)
        assert dns.query.udp(v1, "127.0.0.1", port=reg.port, timeout=5).rcode() == \
            dns.rcode.BADVERS
        m = _until(url, 'btmm_registry_responses_total{opcode="QUERY",rcode="BADVERS"}', 1)


def test_a_non_loopback_address_is_refused() -> None:
    result = CliRunner().invoke(btmm, ["serve", "--domain", "members.example", "--metrics",
                                       "0.0.0.0:9430"])
    assert result.exit_code == 2
    assert "0.0.0.0 is not a loopback address" in result.output
    assert "SSH tunnel" in result.output
