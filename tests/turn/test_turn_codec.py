"""ChannelData framing (RFC 8656 section 12.4/12.5), TURN REST credentials and the offer's TXT
form (stun/turn.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from btmm_core.errors import MalformedMessage
from btmm_core.stun.turn import (
    TurnOffer,
    decode_channel_data,
    encode_channel_data,
    is_channel_data,
    rest_password,
    rest_username,
    split_server,
)


@pytest.mark.parametrize("size", [0, 1, 3, 4, 5, 1400])
def test_channel_data_round_trip_and_padding(size: int) -> None:
    data = bytes(range(256)) * 6
    data = data[:size]
    plain = encode_channel_data(0x4001, data)
    assert plain[:4] == bytes([0x40, 0x01, size >> 8, size & 0xFF]) and len(plain) == 4 + size
    padded = encode_channel_data(0x4001, data, pad=True)
    assert len(padded) % 4 == 0 and padded[:len(plain)] == plain
    assert is_channel_data(plain)
    # Over UDP padding is optional and ignored; over a stream it is required.
    assert decode_channel_data(plain) == (0x4001, data)
    assert decode_channel_data(padded) == (0x4001, data)
    assert decode_channel_data(padded, stream=True) == (0x4001, data)
    if size % 4:
        with pytest.raises(MalformedMessage):
            decode_channel_data(plain, stream=True)


@pytest.mark.parametrize("wire", [
    b"", b"\x40\x00\x00", b"\x40\x00\x00\x05abcd",  # short, claims more than follows
    b"\x3f\xff\x00\x00", b"\x50\x00\x00\x00", b"\x7f\xff\x00\x00",  # reserved channels
])
def test_malformed_channel_data_is_refused(wire: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_channel_data(wire)


def test_encode_refuses_a_bad_channel() -> None:
    for channel in (0x3FFF, 0x5000):
        with pytest.raises(ValueError):
            encode_channel_data(channel, b"x")


def test_stun_and_channel_data_are_told_apart() -> None:
    assert not is_channel_data(b"\x00\x01\x00\x00")
    assert not is_channel_data(b"\x80") and not is_channel_data(b"")
    assert is_channel_data(b"\x4f\xff")


def test_rest_credentials_are_what_coturn_computes() -> None:
    # coturn (use-auth-secret): password = base64(HMAC-SHA1(static-auth-secret, username)).
    username = rest_username("alice", 1_800_000_000)
    assert username == "1800000000:alice"
    want = base64.b64encode(hmac.new(b"secret", username.encode(), hashlib.sha1).digest())
    assert rest_password(b"secret", username) == want.decode()
    with pytest.raises(ValueError):
        rest_username("a:b", 1)


def test_offer_txt_round_trip() -> None:
    offer = TurnOffer.make("turn.example", 3478, b"k", "laptop.alice", 1_800_000_000)
    assert TurnOffer.from_txt(offer.to_txt()) == offer
    assert all(len(s.encode()) < 255 for s in offer.to_txt())
    v6 = TurnOffer.make("2001:db8::1", 3479, b"k", "x", 5)
    assert TurnOffer.from_txt(v6.to_txt()) == v6 and v6.expired(5) and not v6.expired(4)
    for bad in ([], ["v=turn2"], ["v=turn1", "server=h:1"],
                ["v=turn1", "server=h:x", "username=u", "password=p", "expires=1"],
                ["v=turn1", "server=h:1", "username=u", "username=v", "password=p",
                 "expires=1"],
                ["v=turn1", "nofield"]):
        with pytest.raises(MalformedMessage):
            TurnOffer.from_txt(bad)


def test_split_server() -> None:
    assert split_server("turn.example") == ("turn.example", 3478)
    assert split_server("192.0.2.1:5349") == ("192.0.2.1", 5349)
    assert split_server("[2001:db8::1]:3479") == ("2001:db8::1", 3479)
    for bad in ("", ":1", "h:0", "[2001:db8::1", "h:70000"):
        with pytest.raises(ValueError):
            split_server(bad)
