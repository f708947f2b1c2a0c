"""The control queue of both engines is bounded in bytes (issue 11, item 8).

Control messages (UDP payloads after four zero bytes) are unauthenticated: an engine must not
hold 4096 x 64 KiB of them for the control plane. A message longer than MAX_CONTROL_MESSAGE is
dropped as ``control_oversize``; queued messages hold at most ``control_queue_bytes``, past
that ``control_overflow``. Same rules and counter names in both engines.

The engine runs in a child process inside a throwaway namespace and talks to itself over the
namespace's loopback; the child reports what it saw as JSON.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from btmm_core.dataplane import open_engine
from btmm_core.dataplane.api import (
    DEFAULT_CONTROL_QUEUE_BYTES,
    MAX_CONTROL_MESSAGE,
    Endpoint,
    EngineConfig,
)
from btmm_core.errors import ConfigError
from btmm_core.lab.netns import Lab

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = textwrap.dedent(
    r"""
    import json, socket, sys, time
    sys.path.insert(0, sys.argv[1])
    from btmm_core.dataplane import open_engine
    from btmm_core.dataplane.api import MAX_CONTROL_MESSAGE as MAX, EngineConfig, Endpoint

    kind = sys.argv[2]
    obs = {}

    def wait(pred, what, timeout=10.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if pred():
                return
            time.sleep(0.01)
        obs.setdefault("timeouts", []).append(what)

    def drops(name):
        return (eng.counters().drops or {}).get(name, 0)

    cfg = EngineConfig(tun_name="btcq0", listen=Endpoint("127.0.0.1", 0), event_queue=4096,
                       control_queue_bytes=4 * MAX)
    eng = open_engine(cfg, kind=kind)
    eng.start()
    to = ("127.0.0.1", eng.local_port)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))

    def msg(fill, size):
        return b"\0\0\0\0" + bytes([fill]) * size

    s.sendto(msg(9, MAX + 1), to)  # one byte too long
    for i in range(5):  # five of the largest allowed into room for four
        s.sendto(msg(i, MAX), to)
    wait(lambda: eng.counters().control_in == 6, "first six")
    obs["first"] = [eng.counters().control_in, drops("control_oversize"),
                    drops("control_overflow")]
    obs["queued"] = [[e.payload[0], len(e.payload)] for e in eng.drain(100)]
    # Draining gave the room back; small messages are counted by their size.
    for i in range(4):
        s.sendto(msg(20 + i, MAX), to)
    for i in range(3):
        s.sendto(msg(30 + i, 100), to)
    wait(lambda: eng.counters().control_in == 13, "second seven")
    obs["second"] = [[e.payload[0], len(e.payload)] for e in eng.drain(100)]
    obs["drops"] = [drops("control_oversize"), drops("control_overflow")]
    eng.stop()
    print(json.dumps(obs))
    """
)


@pytest.mark.netns
def test_control_queue_is_bounded_in_bytes_and_oversize_messages_are_dropped(kind: str) -> None:
    with Lab("btcq") as lab:
        res = lab.ns("a").run([sys.executable, "-c", _SCRIPT, str(REPO), kind], timeout=120)
    obs: dict[str, Any] = json.loads(res.stdout)
    assert obs.get("timeouts") is None, obs
    # control_in counts every control datagram; the oversize one and the fifth are dropped.
    assert obs["first"] == [6, 1, 1]
    assert obs["queued"] == [[i, MAX_CONTROL_MESSAGE] for i in range(4)]
    # Four full-size messages fill the room again; the three small ones then overflow.
    assert obs["second"] == [[20 + i, MAX_CONTROL_MESSAGE] for i in range(4)]
    assert obs["drops"] == [1, 4]


def test_default_bound_is_four_mib() -> None:
    assert EngineConfig().control_queue_bytes == DEFAULT_CONTROL_QUEUE_BYTES == 4 << 20
    assert MAX_CONTROL_MESSAGE == 1024


def test_control_queue_smaller_than_one_message_is_refused(kind: str) -> None:
    cfg = EngineConfig(
        tun_name="btbad1",
        listen=Endpoint("127.0.0.1", 0),
        control_queue_bytes=MAX_CONTROL_MESSAGE - 1,
    )
    with pytest.raises(ConfigError) as info:
        open_engine(cfg, kind=kind)
    assert type(info.value) is ConfigError
