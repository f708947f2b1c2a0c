"""An idle TCP/TLS connection a plug-in holds (a DNS Push session, LLQs over TCP) is looked at
again every ``HELD_RECHECK`` seconds, not every idle timeout (issue 18: 10,000 idle sessions
made ~1,000 timed-out waits a second); one nobody holds still ends at the idle timeout."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from registry_helpers import make_core

import btmm_core.registry.server as server_mod
from btmm_core.registry.handler import Transport
from btmm_core.registry.server import HELD_RECHECK, Listen, RegistryServer


class Holder:
    dso = False
    option_codes = ()

    def __init__(self, held: bool) -> None:
        self.held = held
        self.asked = 0

    def holds_connection(self, transport: Transport, peer: str) -> bool:
        self.asked += 1
        return self.held


def _waits(monkeypatch: pytest.MonkeyPatch, timeouts_before_data: int) -> list[float]:
    """aio.within in the driver, timing out ``timeouts_before_data`` times, then the
    prefix; returns the timeouts it was given."""
    seen: list[float] = []

    async def within(aw: Any, timeout: float) -> bytes:
        aw.close()  # the readexactly coroutine is not run
        seen.append(timeout)
        if len(seen) <= timeouts_before_data:
            raise TimeoutError
        return b"\x00\x0c"

    monkeypatch.setattr(server_mod, "within", within)
    return seen


@pytest.mark.parametrize("held", [True, False])
def test_held_connections_are_looked_at_every_held_recheck(
    monkeypatch: pytest.MonkeyPatch, held: bool
) -> None:
    core, _ = make_core()
    holder = Holder(held)
    core.plugins.append(holder)  # type: ignore[arg-type]
    seen = _waits(monkeypatch, 3)

    async def main() -> bytes:
        srv = RegistryServer(core, Listen("127.0.0.1", 0, idle_timeout=10.0))
        return await srv._next_prefix(asyncio.StreamReader(), Transport.TLS, "127.0.0.1#5")

    if held:
        assert asyncio.run(main()) == b"\x00\x0c"
        assert seen == [10.0, HELD_RECHECK, HELD_RECHECK, HELD_RECHECK]
        assert holder.asked == 3
    else:
        with pytest.raises(TimeoutError):
            asyncio.run(main())
        assert seen == [10.0]
