"""The pure-Python engine's UDP batching: GSO runs out (``UDP_SEGMENT``), GRO reads in
(``UDP_GRO``), and the fallback when the kernel refuses a GSO send (udp(7)).

Sans-I/O first (how datagrams are grouped and split), then real sockets on loopback, then a
refusal in a namespace of the test's own whose loopback MTU is too small for the segments.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest
from e2e_helpers import REPO

from btmm_core.dataplane.api import MAX_UDP_PAYLOAD, Endpoint
from btmm_core.dataplane.pyengine import (
    GSO_MAX_SEGMENTS,
    UDP_GRO,
    UdpBatchSender,
    _enabled,
    gso_runs,
    receive_batch,
    split_gro,
)
from btmm_core.lab.netns import Lab

A, B = Endpoint("192.0.2.1", 4500), Endpoint("192.0.2.2", 4500)


def _d(sizes: list[int], dest: Endpoint = A) -> list[tuple[bytes, Endpoint]]:
    return [(bytes(n), dest) for n in sizes]


def test_runs_of_equal_sizes_with_a_shorter_tail() -> None:
    assert gso_runs(_d([100, 100, 100, 60])) == [(0, 4)]
    # A longer datagram or any after a shorter one starts a new run.
    assert gso_runs(_d([100, 100, 120, 120, 50, 50])) == [(0, 2), (2, 5), (5, 6)]
    assert gso_runs(_d([100])) == [(0, 1)]
    assert gso_runs([]) == []


def test_runs_break_on_destination_count_and_total_size() -> None:
    assert gso_runs(_d([100, 100]) + _d([100, 100], B)) == [(0, 2), (2, 4)]
    n = GSO_MAX_SEGMENTS + 3
    assert gso_runs(_d([10] * n)) == [(0, GSO_MAX_SEGMENTS), (GSO_MAX_SEGMENTS, n)]
    big = MAX_UDP_PAYLOAD // 3 + 1  # three of them exceed one datagram's payload
    assert gso_runs(_d([big] * 3)) == [(0, 2), (2, 3)]


def test_split_gro() -> None:
    data = bytes(range(250))
    assert split_gro(data, 100) == [data[:100], data[100:200], data[200:]]
    assert split_gro(data, 0) == [data]
    assert split_gro(data, 250) == [data]


def _pair(gro: bool) -> tuple[socket.socket, socket.socket, Endpoint]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    if gro:
        rx.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    tx.setblocking(False)
    return rx, tx, Endpoint("127.0.0.1", rx.getsockname()[1])


def _receive(rx: socket.socket, want: int) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(got) < want and time.monotonic() < deadline:
        got.extend(d for d, _ in receive_batch(rx, 64))
        time.sleep(0.01)
    return got


def test_gso_send_and_gro_read_give_back_the_same_datagrams() -> None:
    for gro in (True, False):
        rx, tx, dest = _pair(gro)
        with rx, tx:
            datagrams = [bytes([i]) * 1000 for i in range(10)] + [b"\xee" * 300]
            sender = UdpBatchSender(tx)
            assert sender.send([(d, dest) for d in datagrams]) == [True] * 11
            # Loopback takes UDP GSO on any kernel since 4.18: one send for the whole run.
            assert (sender.gso, sender.gso_sends, sender.gso_refused) == (True, 1, 0)
            assert _receive(rx, 11) == datagrams, f"gro={gro}"


def test_without_gso_every_datagram_is_sent_alone() -> None:
    rx, tx, dest = _pair(True)
    with rx, tx:
        datagrams = [bytes([i]) * 500 for i in range(5)]
        sender = UdpBatchSender(tx, gso=False)
        assert sender.send([(d, dest) for d in datagrams]) == [True] * 5
        assert sender.gso_sends == 0
        assert _receive(rx, 5) == datagrams


_REFUSED = """
import json, socket, time
from btmm_core.dataplane.api import Endpoint
from btmm_core.dataplane.pyengine import UdpBatchSender, receive_batch
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); rx.bind(("127.0.0.1", 0))
rx.setblocking(False)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); tx.bind(("127.0.0.1", 0))
tx.setblocking(False)
dest = Endpoint("127.0.0.1", rx.getsockname()[1])
datagrams = [bytes([i]) * 2000 for i in range(4)]
sender = UdpBatchSender(tx)
sent = sender.send([(d, dest) for d in datagrams])
got, deadline = [], time.monotonic() + 5
while len(got) < 4 and time.monotonic() < deadline:
    got.extend(d for d, _ in receive_batch(rx, 64))
    time.sleep(0.01)
print(json.dumps({"sent": sent, "gso": sender.gso, "refused": sender.gso_refused,
                  "gso_sends": sender.gso_sends, "same": got == datagrams}))
"""


def test_gso_refused_by_the_route_falls_back_to_single_datagrams() -> None:
    with Lab() as lab:
        ns = lab.ns("gso")
        # Segments above the path MTU: the kernel refuses the GSO send (EMSGSIZE), while
        # plain datagrams of that size are fragmented and still arrive.
        ns.run(["ip", "link", "set", "lo", "mtu", "1400"])
        ns.run(["ip", "link", "set", "lo", "up"])
        result = ns.run(["env", f"PYTHONPATH={REPO}", sys.executable, "-c", _REFUSED], timeout=60)
    report = json.loads(result.stdout)
    assert report == {
        "sent": [True] * 4,
        "gso": True,  # EMSGSIZE concerns that run only: GSO stays on for the next ones
        "refused": 1,
        "gso_sends": 0,
        "same": True,
    }, report


def test_gro_reads_are_real_batches_on_loopback() -> None:
    # The point of UDP_GRO: a GSO run comes back in one read, with its segment size.
    rx, tx, dest = _pair(True)
    with rx, tx:
        datagrams = [bytes([i]) * 700 for i in range(8)]
        UdpBatchSender(tx).send([(d, dest) for d in datagrams])
        deadline = time.monotonic() + 5
        reads: list[int] = []
        while sum(reads) < 8 * 700 and time.monotonic() < deadline:
            try:
                data, anc, _, _ = rx.recvmsg(65535, socket.CMSG_SPACE(4))
            except BlockingIOError:
                time.sleep(0.01)
                continue
            reads.append(len(data))
            assert anc and anc[0][:2] == (socket.SOL_UDP, UDP_GRO), anc
        assert reads == [8 * 700], reads


def test_batching_switches_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BTMM_UDP_GSO", raising=False)
    monkeypatch.setenv("BTMM_UDP_GRO", "0")
    assert _enabled("BTMM_UDP_GSO") is True
    assert _enabled("BTMM_UDP_GRO") is False
