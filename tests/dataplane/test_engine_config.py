"""Engine configuration and event semantics of both engines (peers, SA limits, the event queue,
roaming, exhaustion), on a real engine inside a throwaway namespace.

The engine runs in a child process inside the namespace (it creates a TUN device there and
talks to itself over the namespace's loopback only); the child reports what it observed as
JSON and this file checks it.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from btmm_core.dataplane import open_engine
from btmm_core.dataplane.api import MAX_MTU, Endpoint, EngineConfig
from btmm_core.errors import ConfigError, TunError
from btmm_core.lab.netns import Lab

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    r"""
    import json, select, socket, subprocess, sys, time
    sys.path.insert(0, sys.argv[1])
    from btmm_core.dataplane import open_engine, tx_codec
    from btmm_core.dataplane.api import (ControlPacket, EngineConfig, Endpoint, PeerRoamed,
                                         TxSaExhausted)

    kind = sys.argv[2]
    K = bytes(range(36))
    obs = {}

    def err(fn):
        try:
            fn()
        except Exception as exc:
            return type(exc).__name__
        return None

    def spis(inner):
        return [list(p.rx_spis) for p in eng.peers() if p.inner == inner]

    def wait(pred, what, timeout=5.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return True
            time.sleep(0.02)
        obs.setdefault("timeouts", []).append(what)
        return False

    def drops(c, name):
        return (c.drops or {}).get(name, 0)

    def readable():
        return bool(select.select([eng.fileno()], [], [], 0.2)[0])

    cfg = EngineConfig(tun_name="btcfg0", listen=Endpoint("127.0.0.1", 0), event_queue=4)
    eng = open_engine(cfg, kind=kind)
    port = eng.local_port
    obs["kind"] = eng.kind
    eng.add_peer("fd00::2")
    obs["add_twice"] = err(lambda: eng.add_peer("fd00::2"))
    obs["unknown_peer"] = err(lambda: eng.install_rx_sa("fd00::9", 0x900, K))
    for spi in (0x100, 0x101, 0x102):
        eng.install_rx_sa("fd00::2", spi, K)
    obs["after_three"] = spis("fd00::2")
    eng.add_peer("fd00::3")
    obs["spi_in_use"] = err(lambda: eng.install_rx_sa("fd00::3", 0x101, K))
    obs["spi_in_use_same_peer"] = err(lambda: eng.install_rx_sa("fd00::2", 0x102, K))
    obs["retired_oldest_is_free"] = err(lambda: eng.install_rx_sa("fd00::3", 0x100, K))
    obs["retire_unknown"] = err(lambda: eng.retire_rx_sa("fd00::2", 0x555))
    eng.retire_rx_sa("fd00::2", 0x101)
    obs["after_retire"] = spis("fd00::2")
    obs["bad_keymat"] = err(lambda: eng.install_tx_sa("fd00::2", 7, K[:35]))
    obs["bad_inner"] = err(lambda: eng.add_peer("not-an-address"))
    eng.remove_peer("fd00::2")
    obs["peers_after_remove"] = sorted(p.inner for p in eng.peers())
    obs["removed_spi_free"] = err(lambda: eng.install_rx_sa("fd00::3", 0x102, K))
    obs["rx_spis_c"] = spis("fd00::3")
    obs["keepalive_no_endpoint"] = err(lambda: eng.send_keepalive("fd00::3"))
    # Endpoints of either family, reported in one form; the same errors in both engines.
    for bad in (Endpoint("host.example", 1), Endpoint("192.0.2.1", 70000),
                Endpoint("fe80::1%lo", 1)):
        obs.setdefault("bad_endpoints", []).append(err(lambda: eng.update_peer("fd00::3", bad)))
    for ep in (Endpoint("2001:DB8:0::7", 9), Endpoint("::ffff:192.0.2.7", 9)):
        eng.update_peer("fd00::3", ep)
        obs.setdefault("endpoints", []).extend(str(p.endpoint) for p in eng.peers())
    eng.update_peer("fd00::3", None)

    eng.start()
    eng.start()  # idempotent
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    me = Endpoint("127.0.0.1", s.getsockname()[1])

    # Control messages: six into a queue of four.
    obs["readable_empty"] = readable()
    for i in range(6):
        s.sendto(b"\0\0\0\0" + bytes([i]) * 3, ("127.0.0.1", port))
    wait(lambda: eng.counters().control_in == 6, "control_in")
    obs["readable_full"] = readable()
    ev = eng.drain(limit=3)
    obs["drain3"] = [(type(e).__name__, e.payload.hex(), e.source == me) for e in ev]
    obs["readable_after_partial"] = readable()
    ev = eng.drain()
    obs["drain_rest"] = [e.payload.hex() for e in ev]
    obs["readable_after_drain"] = readable()
    c = eng.counters()
    obs["control"] = [c.control_in, drops(c, "control_overflow")]

    # Roaming: the first authentic packet of peer c gives it an endpoint.
    inner = bytes([0x60, 0, 0, 0, 0, 0, 59, 64]) + bytes.fromhex("fd00" + "00" * 13 + "03")
    inner += bytes.fromhex("fd00" + "00" * 13 + "01")
    tx = tx_codec(0x102, K, kind=kind)
    pkt = tx.seal(inner)
    s.sendto(pkt, ("127.0.0.1", port))
    wait(lambda: readable(), "roam event")
    obs["roam"] = [(type(e).__name__, e.inner, e.old, e.new == me) for e in eng.drain()]
    s.sendto(pkt, ("127.0.0.1", port))  # its replay: refused, no event
    wait(lambda: drops(eng.counters(), "replay") == 1, "replay")
    obs["roam_replay"] = [type(e).__name__ for e in eng.drain()]
    obs["endpoint_c"] = [p.endpoint == me for p in eng.peers() if p.inner == "fd00::3"]
    c = eng.counters()
    obs["in"] = [c.packets_in, c.bytes_in, drops(c, "replay")]
    obs["peer_in"] = [[p.counters.packets_in, drops(p.counters, "replay")]
                      for p in eng.peers() if p.inner == "fd00::3"]
    eng.send_keepalive("fd00::3")
    s.settimeout(2)
    obs["keepalive_bytes"] = s.recvfrom(100)[0].hex()

    # Exhaustion: outbound packets to c with a used-up SA give one event and a drop each.
    eng.install_tx_sa("fd00::3", 0x7777, K, 2**64)
    subprocess.run(["ip", "link", "set", "btcfg0", "up"], check=True)
    subprocess.run(["ip", "-6", "route", "add", "fd00::3/128", "dev", "btcfg0"], check=True)
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    for _ in range(3):
        u.sendto(b"x" * 10, ("fd00::3", 9))
    wait(lambda: drops(eng.counters(), "sa_exhausted") >= 3, "exhausted")
    wait(lambda: readable(), "exhausted event")
    obs["exhausted_events"] = [(type(e).__name__, e.inner, e.spi) for e in eng.drain()]
    obs["exhausted_drops"] = drops(eng.counters(), "sa_exhausted")
    eng.stop()
    eng.stop()  # idempotent
    print(json.dumps(obs))
    """
)


def run_in_namespace(kind: str) -> dict[str, Any]:
    with Lab("btcfg") as lab:
        ns = lab.ns("a")
        res = ns.run([sys.executable, "-c", _SCRIPT, str(REPO), kind], timeout=120)
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def test_engine_configuration_and_events(kind: str) -> None:
    obs = run_in_namespace(kind)
    assert obs.get("timeouts") is None, obs
    assert obs["kind"] == kind
    assert obs["add_twice"] == "DataPlaneError"
    assert obs["unknown_peer"] == "UnknownPeer"
    # At most two receive SAs: the third retires the oldest.
    assert obs["after_three"] == [[0x101, 0x102]]
    assert obs["spi_in_use"] == "DataPlaneError"
    assert obs["spi_in_use_same_peer"] == "DataPlaneError"
    assert obs["retired_oldest_is_free"] is None
    assert obs["retire_unknown"] == "DataPlaneError"
    assert obs["after_retire"] == [[0x102]]
    assert obs["bad_keymat"] == "ValueError"
    assert obs["bad_inner"] == "ConfigError"
    assert obs["peers_after_remove"] == ["fd00::3"]
    assert obs["removed_spi_free"] is None
    assert obs["rx_spis_c"] == [[0x100, 0x102]]
    assert obs["keepalive_no_endpoint"] == "DataPlaneError"
    assert obs["bad_endpoints"] == ["ValueError"] * 3
    assert obs["endpoints"] == ["[2001:db8::7]:9", "192.0.2.7:9"]
    # Event queue of four: six control messages, four queued in order, two counted overflows.
    assert obs["readable_empty"] is False
    assert obs["readable_full"] is True
    assert obs["drain3"] == [["ControlPacket", bytes([i]).hex() * 3, True] for i in range(3)]
    assert obs["readable_after_partial"] is True
    assert obs["drain_rest"] == ["030303"]
    assert obs["readable_after_drain"] is False
    assert obs["control"] == [6, 2]
    # Roaming to the first authentic packet's source; its replay moves nothing.
    assert obs["roam"] == [["PeerRoamed", "fd00::3", None, True]]
    assert obs["roam_replay"] == []
    assert obs["endpoint_c"] == [True]
    assert obs["in"] == [1, 40, 1]
    assert obs["peer_in"] == [[1, 1]]
    assert obs["keepalive_bytes"] == "ff"
    assert obs["exhausted_events"] == [["TxSaExhausted", "fd00::3", 0x7777]]
    assert obs["exhausted_drops"] == 3


def _config(**fields: Any) -> EngineConfig:
    return EngineConfig(**{"tun_name": "btbad0", "listen": Endpoint("127.0.0.1", 0), **fields})


@pytest.mark.parametrize(
    ("config", "error"),
    [
        (_config(mtu=1279), ConfigError),
        (_config(mtu=-1), ConfigError),
        (_config(mtu=MAX_MTU + 1), ConfigError),
        (_config(mtu=65535), ConfigError),
        (_config(event_queue=0), ConfigError),
        (_config(control_queue_bytes=-1), ConfigError),
        (_config(tun_name=None, tun_fd=None), ConfigError),
        (_config(listen=Endpoint("not-an-address", 0)), ConfigError),
        # Either family is taken (one dual-stack socket), a zone index is not.
        (_config(listen=Endpoint("fe80::1%lo", 0)), ConfigError),
        (_config(listen=Endpoint("127.0.0.1", 65536)), ConfigError),
        (_config(tun_name="x" * 20), TunError),
        (_config(tun_name=None, tun_fd=-1), TunError),
    ],
    ids=lambda v: None if isinstance(v, EngineConfig) else v.__name__,
)
def test_bad_config_refused_before_any_device(
    kind: str, config: EngineConfig, error: type[Exception]
) -> None:
    """Checked before a TUN device or socket exists, so this runs outside a namespace. Both
    engines raise exactly the same class for each bad setting."""
    with pytest.raises(error) as info:
        open_engine(config, kind=kind)
    assert type(info.value) is error, info.value
