"""Anti-replay of both codecs: RFC 4303 §3.4.3 with extended sequence numbers (Appendix A),
window W = 4096, the window moving only after the ICV checks out.

A consequence of Appendix A worth knowing when reading these tests: a packet whose low 32 bits
fall behind the window is inferred into the NEXT 2**32 block, so it fails the ICV (reason AUTH)
rather than the replay check. Only duplicates inside the window, and sequence number 0, are
refused as REPLAY.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from codec_helpers import KEYMAT, drop_reason, esp_plaintext, seal_by_hand, top
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btmm_core.dataplane import rx_codec
from btmm_core.dataplane.api import DropReason, RxCodec
from btmm_core.dataplane.esp import infer_seq

W = 4096
SPI = 0x0BAD_CAFE


def seal(seq: int, inner: bytes = b"", *, forge: bool = False) -> bytes:
    """A packet of this SA with sequence number ``seq``; ``forge`` flips a bit of the ICV."""
    return seal_by_hand(seq, esp_plaintext(inner), SPI, forge=forge)


@pytest.fixture
def rx(kind: str) -> RxCodec:
    return rx_codec(SPI, KEYMAT, kind=kind)


def test_in_order_delivery_then_every_replay_order_refused(rx: RxCodec) -> None:
    packets = [seal(s, bytes([s % 256])) for s in range(1, 201)]
    assert [drop_reason(rx, p) for p in packets] == [None] * 200
    assert top(rx) == 200
    shuffled = packets[:]
    random.Random(4303).shuffle(shuffled)
    for order in (packets, packets[::-1], shuffled):
        assert {drop_reason(rx, p) for p in order} == {DropReason.REPLAY}
    assert top(rx) == 200


def test_reordered_inside_window_accepted_exactly_once(rx: RxCodec) -> None:
    seqs = list(range(1, 3 * W))
    rng = random.Random(6479)
    # Local reordering: shuffle blocks of 64, so every packet arrives well inside the window.
    order: list[int] = []
    for i in range(0, len(seqs), 64):
        chunk = seqs[i : i + 64]
        rng.shuffle(chunk)
        order += chunk
    assert sorted(order) == seqs
    accepted = [s for s in order if drop_reason(rx, seal(s)) is None]
    assert sorted(accepted) == seqs
    assert top(rx) == 3 * W - 1
    for s in rng.sample(seqs[-W + 1 :], 200):
        assert drop_reason(rx, seal(s)) is DropReason.REPLAY


def test_window_edge(rx: RxCodec) -> None:
    high = 10 * W
    assert drop_reason(rx, seal(high)) is None
    # W - 1 behind the highest: the oldest number the window still holds.
    assert drop_reason(rx, seal(high - W + 1)) is None
    assert drop_reason(rx, seal(high - W + 1)) is DropReason.REPLAY
    # W behind: outside the window. Appendix A infers it into the next 2**32 block, where the
    # ICV cannot match.
    assert drop_reason(rx, seal(high - W)) is DropReason.AUTH
    assert drop_reason(rx, seal(1)) is DropReason.AUTH
    assert top(rx) == high
    # The edge moves with top.
    assert drop_reason(rx, seal(high + 1)) is None
    assert drop_reason(rx, seal(high - W + 2)) is None
    assert drop_reason(rx, seal(high - W + 1)) is DropReason.AUTH


def test_big_jump_clears_the_window(rx: RxCodec) -> None:
    assert drop_reason(rx, seal(5)) is None
    assert drop_reason(rx, seal(5 + 2 * W)) is None
    for s in range(5 + W + 1, 5 + 2 * W):
        assert drop_reason(rx, seal(s)) is None, s
    assert drop_reason(rx, seal(5 + W)) is DropReason.AUTH


def test_sequence_zero_refused(rx: RxCodec) -> None:
    assert drop_reason(rx, seal(0)) is DropReason.REPLAY
    assert top(rx) == 0


def test_forged_huge_seq_does_not_move_top(rx: RxCodec) -> None:
    for s in range(1, 11):
        assert drop_reason(rx, seal(s)) is None
    for forged_seq in (0xFFFFFFFF, 0xFFFFF000, 2**31, 11 + W):
        assert drop_reason(rx, seal(forged_seq, forge=True)) is DropReason.AUTH
        assert top(rx) == 10
    # The window did not move: packets just above 10 still open, in order and out of order.
    assert drop_reason(rx, seal(13)) is None
    assert drop_reason(rx, seal(11)) is None
    assert drop_reason(rx, seal(12)) is None
    assert top(rx) == 13


def test_forged_duplicate_is_replay_before_auth(rx: RxCodec) -> None:
    """The replay check runs first and changes nothing; a forged copy of a seen number is a
    replay, a forged new number is an AUTH failure, and the genuine packet still opens."""
    assert drop_reason(rx, seal(7)) is None
    assert drop_reason(rx, seal(7, forge=True)) is DropReason.REPLAY
    assert drop_reason(rx, seal(6, forge=True)) is DropReason.AUTH
    assert drop_reason(rx, seal(6)) is None


# --- infer_seq (the Python function; the Rust one is exercised through the codec above) ---


def model_infer(top_seq: int, seq_lo: int) -> int:
    """Appendix A restated: the number with these low 32 bits in the 2**32-wide range that
    starts at the bottom of the window (at 0 while the window still reaches below 0)."""
    bottom = max(0, top_seq - W + 1)
    return bottom + (seq_lo - bottom) % 2**32


@pytest.mark.parametrize(
    ("top_seq", "seq_lo", "expected"),
    [
        (0, 1, 1),
        (0, 0xFFFFFFFF, 0xFFFFFFFF),
        (10, 5, 5),
        (W - 2, 0xFFFFFFFF, 0xFFFFFFFF),  # th = 0: nothing below block 0
        (2**32 + 5, 0xFFFFFFF0, 0xFFFFFFF0),  # just behind, in the previous block
        (2**32 + 5, 6, 2**32 + 6),
        (2**32 + 5, 0xFFFFF000, 2**32 + 0xFFFFF000),  # behind the window: ahead of top
        (2**32 - 1, 0, 2**32),
        (2**32 - 1, 2**32 - W, 2**32 - W),
        (2**32 - 1, 2**32 - W - 1, 2 * 2**32 - W - 1),
        (W - 1, 0, 0),  # tl = W - 1: window [0, W - 1] inside block 0 (0 is then refused)
        (W - 1, 1, 1),
    ],
)
def test_infer_seq_table(top_seq: int, seq_lo: int, expected: int) -> None:
    assert infer_seq(top_seq, seq_lo) == expected
    assert model_infer(top_seq, seq_lo) == expected


@settings(max_examples=2000, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_infer_seq_matches_model(top_seq: int, seq_lo: int) -> None:
    assert infer_seq(top_seq, seq_lo) == model_infer(top_seq, seq_lo)


# --- property test: the codec against a model of seen numbers and top ---


@dataclass
class Model:
    top: int = 0
    seen: set[int] = field(default_factory=set)

    def deliver(self, true_seq: int, forged: bool) -> DropReason | None:
        seq = model_infer(self.top, true_seq % 2**32)
        if seq == 0 or seq > 2**64 - 1:
            return DropReason.REPLAY
        if seq <= self.top and (self.top - seq >= W or seq in self.seen):
            return DropReason.REPLAY
        if forged or seq != true_seq:
            return DropReason.AUTH
        self.seen.add(seq)
        self.top = max(self.top, seq)
        return None


# The receiver learns the high half only by accepting packets, so a start far up the sequence
# space costs one packet per 2**32: these stay near the first few block boundaries.
starts = st.sampled_from([0, 2**32 - 2 * W, 2**32 - 3, 3 * 2**32 + 100])
deliveries = st.lists(
    st.tuples(
        st.one_of(
            st.integers(0, 3 * W),  # mostly near the start: reorders, duplicates, window edges
            st.integers(0, 2**33),  # sometimes far ahead (misinferred -> AUTH, or big jumps)
        ),
        st.booleans() | st.just(False),  # forged ICV, less often than not
    ),
    min_size=1,
    max_size=60,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(start=starts, items=deliveries, replays=st.lists(st.integers(0, 59), max_size=20))
def test_window_matches_model(
    kind: str, start: int, items: list[tuple[int, bool]], replays: list[int]
) -> None:
    rx = rx_codec(SPI, KEYMAT, kind=kind)
    model = Model()
    # Walk both to ``start`` through authentic packets in steps the inference can follow.
    s = 0
    while s < start:
        s = min(s + 2**32 - 2 * W, start)
        assert model.deliver(s, False) is None
        assert drop_reason(rx, seal(s)) is None
    sequence = [(start + off, forged) for off, forged in items if start + off <= 2**64 - 1]
    # Replay some of the packets already in the list, after the list.
    sequence += [sequence[i] for i in replays if i < len(sequence)]
    for true_seq, forged in sequence:
        expected = model.deliver(true_seq, forged)
        assert drop_reason(rx, seal(true_seq, forge=forged)) is expected, (true_seq, forged)
        assert top(rx) == model.top
