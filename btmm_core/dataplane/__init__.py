"""The data plane: one interface (``api.Engine``), two engines, one selector.

``BTMM_DATAPLANE=fast|python|auto`` (or an explicit ``kind``) chooses the engine; ``auto``
takes the Rust engine when it is built and the pure-Python one otherwise. Both produce the
same wire format, so the two ends of a tunnel may use different engines.
"""

from __future__ import annotations

import os
from typing import Literal

from btmm_core.dataplane.api import Engine, EngineConfig, RxCodec, TxCodec
from btmm_core.errors import ConfigError, EngineUnavailable

EngineKind = Literal["fast", "python"]
KINDS: tuple[EngineKind, ...] = ("fast", "python")
ENV_VAR = "BTMM_DATAPLANE"


def fast_available() -> bool:
    """True when the Rust extension is built and importable."""
    try:
        from btmm_core import _fast  # noqa: F401
    except ImportError:
        return False
    return True


def available_kinds() -> list[EngineKind]:
    return [k for k in KINDS if k == "python" or fast_available()]


def resolve_kind(kind: str | None = None) -> EngineKind:
    """Turn ``fast``/``python``/``auto``/None (read ``BTMM_DATAPLANE``) into an engine kind."""
    choice = (kind or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice == "auto":
        return "fast" if fast_available() else "python"
    if choice == "python":
        return "python"
    if choice == "fast":
        if not fast_available():
            raise EngineUnavailable(
                "the fast (Rust) data plane is not built",
                hint="install with `pip install -e .` so maturin builds btmm_core._fast, "
                "or choose --dataplane python",
            )
        return "fast"
    raise ConfigError(
        f"unknown data plane {choice!r}", hint=f"{ENV_VAR} must be fast, python or auto"
    )


def open_engine(config: EngineConfig, kind: str | None = None) -> Engine:
    """Open (but do not start) an engine of the chosen kind."""
    if resolve_kind(kind) == "fast":
        from btmm_core.dataplane.fast import FastEngine

        return FastEngine(config)
    from btmm_core.dataplane.pyengine import PythonEngine

    return PythonEngine(config)


def tx_codec(spi: int, keymat: bytes, next_seq: int = 1, kind: str | None = None) -> TxCodec:
    """The bare outbound ESP codec of one SA."""
    if resolve_kind(kind) == "fast":
        from btmm_core import _fast

        return _fast.TxSa(spi, keymat, next_seq)
    from btmm_core.dataplane.esp import EspTxSa

    return EspTxSa(spi, keymat, next_seq)


def rx_codec(spi: int, keymat: bytes, kind: str | None = None) -> RxCodec:
    """The bare inbound ESP codec of one SA, with its replay window."""
    if resolve_kind(kind) == "fast":
        from btmm_core import _fast

        return _fast.RxSa(spi, keymat)
    from btmm_core.dataplane.esp import EspRxSa

    return EspRxSa(spi, keymat)
