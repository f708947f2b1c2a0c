"""The engine selector: ``BTMM_DATAPLANE`` / an explicit kind -> fast or python."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

import btmm_core.dataplane as dataplane
from btmm_core.dataplane import ENV_VAR, open_engine, resolve_kind, rx_codec, tx_codec
from btmm_core.dataplane.api import Endpoint, EngineConfig, RxCodec, TxCodec
from btmm_core.errors import ConfigError, DataPlaneError, EngineUnavailable

KEYMAT = bytes(range(0x40, 0x40 + 36))
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("python", "python"),
        ("PYTHON", "python"),
        (" python\n", "python"),
        ("fast", "fast"),
        ("Fast", "fast"),
        ("auto", "fast"),
        ("AUTO", "fast"),
        ("", "fast"),
    ],
)
def test_env_values(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    """With the extension built (as in CI), auto and an empty value mean the fast engine."""
    monkeypatch.setenv(ENV_VAR, value)
    assert resolve_kind() == expected
    assert resolve_kind(None) == expected


def test_unset_means_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_kind() == "fast"


@pytest.mark.parametrize("value", ["rust", "pyhton", "fast,python", "0", "none", "fast python"])
def test_bad_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(ENV_VAR, value)
    with pytest.raises(ConfigError) as err:
        resolve_kind()
    assert ENV_VAR in str(err.value)  # the message says where the bad value came from
    with pytest.raises(ConfigError):
        resolve_kind(value)


def test_explicit_kind_wins_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "fast")
    assert resolve_kind("python") == "python"
    monkeypatch.setenv(ENV_VAR, "python")
    assert resolve_kind("fast") == "fast"
    monkeypatch.setenv(ENV_VAR, "bogus")
    assert resolve_kind("python") == "python"


def test_without_extension_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the extension is missing, auto takes python and an explicit fast says how to get
    it. (The selector's only view of the extension is ``fast_available``.)"""
    monkeypatch.setattr(dataplane, "fast_available", lambda: False)
    monkeypatch.setenv(ENV_VAR, "auto")
    assert resolve_kind() == "python"
    assert dataplane.available_kinds() == ["python"]
    with pytest.raises(EngineUnavailable) as err:
        resolve_kind("fast")
    assert isinstance(err.value, DataPlaneError) and not isinstance(err.value, ConfigError)
    assert err.value.hint and "pip install" in err.value.hint


def test_extension_is_built() -> None:
    """CI builds the Rust extension; a missing one is a failure, not a skip."""
    assert dataplane.fast_available()
    assert dataplane.available_kinds() == ["fast", "python"]


def test_codec_types(kind: str) -> None:
    tx = tx_codec(5, KEYMAT, 3, kind=kind)
    rx = rx_codec(5, KEYMAT, kind=kind)
    assert isinstance(tx, TxCodec) and isinstance(rx, RxCodec)
    assert tx.spi == 5 and rx.spi == 5 and tx.next_seq == 3
    module = type(tx).__module__
    assert module.startswith("btmm_core._fast" if kind == "fast" else "btmm_core.dataplane.esp")


def test_codec_kind_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "python")
    assert type(tx_codec(5, KEYMAT)).__module__ == "btmm_core.dataplane.esp"
    assert type(rx_codec(5, KEYMAT)).__module__ == "btmm_core.dataplane.esp"


_OPEN_ENGINE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from btmm_core.dataplane import open_engine
    from btmm_core.dataplane.api import Engine, EngineConfig, Endpoint
    out = {}
    for kind in ("python", "fast"):
        try:
            eng = open_engine(EngineConfig(tun_name="btsel0", listen=Endpoint("127.0.0.1", 0)),
                              kind=kind)
        except Exception as exc:
            out[kind] = {"error": repr(exc)}
            continue
        with eng:
            out[kind] = {"kind": eng.kind, "is_engine": isinstance(eng, Engine),
                         "cls": type(eng).__name__, "tun": eng.tun_name,
                         "port": eng.local_port}
    print(json.dumps(out))
    """
)


@pytest.mark.netns
def test_open_engine_types() -> None:
    """open_engine gives an ``Engine`` of the chosen kind (inside a throwaway namespace, since it
    creates a TUN device)."""
    from btmm_core.lab.netns import Lab

    with Lab("btsel") as lab:
        ns = lab.ns("a")
        res = ns.run([sys.executable, "-c", _OPEN_ENGINE, str(REPO)], timeout=60)
    out = json.loads(res.stdout)
    assert out["python"] == {
        "kind": "python",
        "is_engine": True,
        "cls": "PythonEngine",
        "tun": "btsel0",
        "port": out["python"]["port"],
    }
    assert 0 < out["python"]["port"] < 65536
    assert out["fast"].get("kind") == "fast", out["fast"]
    assert out["fast"]["is_engine"] and out["fast"]["tun"] == "btsel0"


def test_open_engine_bad_kind_before_any_io() -> None:
    with pytest.raises(ConfigError):
        open_engine(EngineConfig(tun_name="never0", listen=Endpoint("127.0.0.1", 0)), kind="x")
