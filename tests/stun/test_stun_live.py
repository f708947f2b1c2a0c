"""The real ``btmm serve`` with its STUN responder on loopback: good, malformed and oversized
requests from one socket; ``btmm netcheck --stun`` against both ports; the ``_stun._udp`` SRV
(dig and dnspython); the counters it logs when it stops."""

from __future__ import annotations

import json
import re
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rdatatype
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "registry"))
from registry_helpers import LiveRegistry, free_port, live_registry, state_dir

from btmm_core.stun.message import (
    MAGIC_COOKIE,
    ErrorCode,
    MessageClass,
    TransportAddress,
    binding_request,
    parse,
)


@pytest.fixture(scope="module")
def reg() -> Iterator[tuple[LiveRegistry, int, int]]:
    p1, p2 = free_port(), free_port()
    with (
        state_dir("btmm-stun-") as state,
        live_registry(state, "--stun-port", str(p1), "--stun-alt-port", str(p2)) as r,
    ):
        yield r, p1, p2


def _recv_until(sock: socket.socket, txid: bytes, deadline: float) -> list[bytes]:
    """Every datagram up to and including the one answering ``txid``."""
    got: list[bytes] = []
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65535)
        except TimeoutError:
            raise AssertionError(f"no answer to {txid.hex()}; got {len(got)} others") from None
        got.append(data)
        if data[8:20] == txid:
            return got


def _ask(sock: socket.socket, port: int, txid: bytes, timeout: float = 10.0) -> list[bytes]:
    """Send a Binding request (again every 0.5 s: the responder may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        sock.sendto(binding_request(txid), ("127.0.0.1", port))
        try:
            return _recv_until(sock, txid, min(deadline, time.monotonic() + 0.5))
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def test_keeps_answering_good_requests_among_hostile_ones(
    reg: tuple[LiveRegistry, int, int],
) -> None:
    _, port, _ = reg
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        me = TransportAddress("127.0.0.1", s.getsockname()[1])
        _ask(s, port, b"warm" * 3)
        bad_body = struct.pack("!HH", 0x0020, 3) + b"\0" * 4  # XOR-MAPPED-ADDRESS of 3 bytes
        malformed = struct.pack("!HHI", 1, len(bad_body), MAGIC_COOKIE) + b"bad!" * 3 + bad_body
        big_body = struct.pack("!HH", 0x8030, 1400) + b"\0" * 1400
        oversized = struct.pack("!HHI", 1, len(big_body), MAGIC_COOKIE) + b"big!" * 3 + big_body
        unknown = binding_request(b"unk!" * 3, fingerprint=False)
        unknown = unknown[:2] + b"\x00\x08" + unknown[4:] + b"\x00\x24\x00\x04prio"
        for i in range(20):
            txid = b"good" + struct.pack("!Q", i)
            for hostile in (malformed, oversized, b"\x00" * 60000, b"\xff", unknown,
                            binding_request(b"fp!!" * 3)[:-1] + b"\x00"):
                s.sendto(hostile, ("127.0.0.1", port))
            s.sendto(binding_request(txid), ("127.0.0.1", port))
            answers = {a[8:20]: parse(a) for a in _recv_until(s, txid, time.monotonic() + 10)}
            assert answers[txid].cls is MessageClass.SUCCESS
            assert answers[txid].xor_mapped == me
            # a 400 for the malformed one and a 420 for the unknown attribute, at most once
            # each (UDP on loopback keeps their order, so both came before the good answer)
            bad, unk = answers[b"bad!" * 3], answers[b"unk!" * 3]
            assert bad.error is not None and bad.error.code == ErrorCode.BAD_REQUEST
            assert unk.error is not None and unk.error.code == ErrorCode.UNKNOWN_ATTRIBUTE
            assert unk.unknown_attributes == (0x0024,)
            assert b"big!" * 3 not in answers and b"fp!!" * 3 not in answers
            assert len(answers) == 3


def test_netcheck_sees_one_mapping_from_both_ports(reg: tuple[LiveRegistry, int, int]) -> None:
    r, p1, p2 = reg
    out = subprocess.run(
        [sys.executable, "-m", "btmm_core", "netcheck", "--stun", f"127.0.0.1:{p1},{p2}",
         "--stun-only", "--json"],
        env=r.env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    stun = json.loads(out.stdout)["stun"]
    assert stun["mapping"] == "endpoint-independent"
    local = stun["local"].replace("0.0.0.0", "127.0.0.1")
    assert [s["server"] for s in stun["servers"]] == [f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"]
    assert [s["reflexive"] for s in stun["servers"]] == [local, local]
    text = subprocess.run(
        [sys.executable, "-m", "btmm_core", "netcheck", "--stun", f"127.0.0.1:{p1}",
         "--stun-only"], env=r.env, capture_output=True, text=True, timeout=60, check=False)
    assert text.returncode == 0, text.stderr
    assert re.search(rf"stun server: +127\.0\.0\.1:{p1} -> reflexive 127\.0\.0\.1:\d+", text.stdout)
    assert "stun mapping:   unknown (needs answers from two server addresses" in text.stdout


def test_stun_srv_is_served_without_a_key(reg: tuple[LiveRegistry, int, int]) -> None:
    r, p1, _ = reg
    q = dns.message.make_query("_stun._udp.bob.members.example.", dns.rdatatype.SRV)
    a = dns.query.udp(q, "127.0.0.1", port=r.port, timeout=5)
    srv = a.find_rrset(a.answer, q.question[0].name, q.question[0].rdclass, dns.rdatatype.SRV)
    assert [(x.priority, x.weight, x.port, x.target.to_text()) for x in srv] == [
        (0, 0, p1, "ns.members.example.")
    ]
    dig = subprocess.run(["dig", "+short", "-p", str(r.port), "@127.0.0.1",
                          "_stun._udp.alice.members.example.", "SRV"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert dig.stdout.split() == ["0", "0", str(p1), "ns.members.example."], dig.stdout


def test_counters_are_logged_on_stop() -> None:
    p1 = free_port()
    with state_dir("btmm-stun-") as state, live_registry(state, "--stun-port", str(p1)) as r:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            _ask(s, p1, b"one!" * 3)
            s.sendto(b"\x00" * 2000, ("127.0.0.1", p1))
            _ask(s, p1, b"two!" * 3)
        assert "stun ready" in r.log()
        assert r.stop() == 0
        line = next(x for x in r.log().splitlines() if "stun stopped" in x)
        answered = re.search(r"answered=(\d+)", line)
        assert answered and int(answered.group(1)) >= 2 and "oversized=1" in line, line
