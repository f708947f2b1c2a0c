"""Shared fixtures. Keep this small: feature-specific fixtures live next to their tests."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# The namespace helpers of the data-plane tests (tests/dataplane/e2e_helpers.py) also serve the
# key-exchange and benchmark tests: `from e2e_helpers import ...` works in every directory.
sys.path.insert(0, str(Path(__file__).resolve().parent / "dataplane"))

from btmm_core.dataplane import KINDS, rx_codec, tx_codec
from btmm_core.dataplane.api import RxCodec, TxCodec

#: a fixed keying material (AES-256 key + salt) so that failures are reproducible
KEYMAT = bytes(range(0x40, 0x40 + 36))

CodecPair = Callable[..., tuple[TxCodec, RxCodec]]


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Each data plane kind in turn. "fast" is never skipped: without the built extension the
    test fails, because CI builds it."""
    return str(request.param)


@pytest.fixture
def keymat() -> bytes:
    return KEYMAT


@pytest.fixture
def codec_pair(kind: str) -> CodecPair:
    """Make a (tx, rx) codec pair of this test's kind for one SA."""

    def make(
        spi: int = 0x1234, keymat: bytes = KEYMAT, next_seq: int = 1
    ) -> tuple[TxCodec, RxCodec]:
        return tx_codec(spi, keymat, next_seq, kind=kind), rx_codec(spi, keymat, kind=kind)

    return make
