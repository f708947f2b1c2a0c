"""`bench.llq` on a live `btmm serve`, at a few watchers: every round of a run gets its events,
whatever the rounds before it left in the zone (issue 18: `--llqs 1000 10000 --updates 5`
delivered nothing to the second round)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from bench import REPO
from bench.llq import PARENT, run
from bench.serve import free_port, serving


def test_second_round_after_an_odd_number_of_updates_gets_every_event(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        BTMM_REGISTRY_DOMAIN=PARENT,
        BTMM_REGISTRY_STATE=str(tmp_path),
        PYTHONPATH=str(REPO),
    )
    port = free_port()
    key = tmp_path / "credentials" / "bob.key"
    with serving(env, port, ["--log-level", "warning"], tmp_path / "server.log", PARENT):
        # An odd number of updates, so the first round ends with the record it adds.
        first = asyncio.run(run(port, key, 3, 3))
        second = asyncio.run(run(port, key, 4, 3))
    assert first["updates_done"] == 3 and first["llqs_missing_an_event_after_60s"] == 0, first
    assert second["updates_done"] == 3 and second["llqs_missing_an_event_after_60s"] == 0, second
