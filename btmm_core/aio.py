"""Awaiting with a deadline without losing a cancellation.

On Python 3.11, ``asyncio.wait_for`` hands back the awaited result when a cancellation of the
waiting task arrives in the same loop pass as that result, and the cancellation is gone
(python/cpython#86296; 3.12 rebuilt ``wait_for`` on ``asyncio.timeout``, GH-96764). A task
stopped that way carries on: a registry connection cancelled by the server's shutdown as a
message arrived went back to waiting up to a minute for the next one, and ``btmm serve``
outlived its SIGTERM by more than 15 s (seen in CI). ``within`` is built on
``asyncio.timeout``, whose exit tells its own cancellation from anyone else's
(``Task.uncancel``), so an outside cancellation always propagates.

The project's ruff settings ban ``asyncio.wait_for`` so that it does not creep back in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """Await ``aw``; TimeoutError after ``timeout`` seconds (None: no deadline).

    A cancellation of the calling task is never swallowed, even when ``aw`` finishes in the
    same pass of the event loop. As with ``wait_for``, a timeout cancels ``aw`` if it is a
    task or future it wraps.
    """
    async with asyncio.timeout(timeout):
        return await aw
