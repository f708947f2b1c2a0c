"""The LLQ server's send window (``LLQConfig.max_unacked``): a burst of events to many LLQs
goes out at the rate it is acknowledged, a silent client stops holding back the others after
its event's first wait, and nothing is lost or sent twice on the way."""

from __future__ import annotations

import os
import subprocess
import sys

import dns.flags
import dns.message
from llq_helpers import Lab, sign_ack, state_dir, update
from test_llq_stream_sansio import change, establish

from btmm_core.dns.llq_option import LLQOpcode, LLQOption, find_llq
from btmm_core.llq.server import LLQConfig
from btmm_core.registry.handler import Transport
from btmm_core.registry.plugin import Outgoing


def acknowledge(lab: Lab, out: Outgoing) -> None:
    ev = dns.message.from_wire(out.wire, keyring=False)
    (opt,) = find_llq(ev.options)
    ack = dns.message.Message(id=ev.id)
    ack.flags = dns.flags.QR
    ack.question = ev.question
    ack.use_edns(0, 0, 1232, options=[LLQOption(LLQOpcode.EVENT, 0, opt.llq_id, opt.lease)])
    lab.send(
        sign_ack(ack, lab.accounts["bob"].key, int(lab.now), out.wire),
        lab.now,
        out.transport,
        out.peer,
    )


def test_burst_goes_out_as_it_is_acknowledged() -> None:
    lab = Lab.make(LLQConfig(max_unacked=2))
    peers = [f"127.0.0.1#{43000 + i}" for i in range(5)]
    for i, peer in enumerate(peers):
        establish(lab, Transport.UDP, peer, 100 + 10 * i)
    change(lab, update("laptop", "AAAA", add=("fd00::1",)))
    first = lab.run_server()
    assert len(first) == 2
    delivered = list(first)
    while len(delivered) < 5:
        acknowledge(lab, delivered[-1] if len(delivered) > 2 else first.pop())
        delivered += lab.run_server()
    assert sorted(o.peer for o in delivered) == peers  # each LLQ got its event exactly once
    assert lab.llq.stats["events"] == 5 and lab.llq.stats["resends"] == 0


def test_silent_clients_stop_holding_the_window_after_the_first_wait() -> None:
    lab = Lab.make(LLQConfig(max_unacked=2))
    peers = [f"127.0.0.1#{44000 + i}" for i in range(4)]
    for i, peer in enumerate(peers):
        establish(lab, Transport.UDP, peer, 200 + 10 * i)
    change(lab, update("laptop", "AAAA", add=("fd00::1",)))
    assert len(lab.run_server()) == 2  # nobody acknowledges these
    assert not lab.run_server(lab.now + 1.9)
    out = lab.run_server(lab.now + 2.01)
    # The two resends, and the two waiting LLQs' first transmissions.
    assert sorted(o.peer for o in out) == sorted(peers)
    assert lab.llq.stats["resends"] == 2 and lab.llq.stats["events"] == 4


def test_unlimited_window_sends_the_whole_burst() -> None:
    lab = Lab.make(LLQConfig(max_unacked=0))
    for i in range(5):
        establish(lab, Transport.UDP, f"127.0.0.1#{45000 + i}", 300 + 10 * i)
    change(lab, update("laptop", "AAAA", add=("fd00::1",)))
    assert len(lab.run_server()) == 5


def test_serve_takes_the_window_size_and_refuses_a_negative_one() -> None:
    with state_dir("btmm-llq-window-") as state:
        env = {"BTMM_REGISTRY_DOMAIN": "members.example.", "BTMM_REGISTRY_STATE": str(state)}
        r = subprocess.run(
            [sys.executable, "-m", "btmm_core", "serve", "--llq-max-unacked", "-1"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert r.returncode == 2 and "max_unacked" in r.stderr, r.stderr
