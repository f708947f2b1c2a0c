"""btmm_core.aio.within: a deadline that never eats a cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from btmm_core.aio import within


async def _cancelled_as_it_finishes(
    awaiting: Callable[[asyncio.Future[int]], Awaitable[Any]],
) -> str:
    """Cancel a task in the same loop pass in which what it awaits finishes; say how it ended."""
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def body() -> str:
        await awaiting(fut)
        return "carried on"

    task = asyncio.create_task(body())
    await asyncio.sleep(0)  # the body now waits on fut
    fut.set_result(1)
    task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


def test_a_cancel_that_meets_the_result_is_not_lost() -> None:
    """asyncio.wait_for on Python 3.11 returns "carried on" here (python/cpython#86296)."""
    assert asyncio.run(_cancelled_as_it_finishes(lambda f: within(f, 10))) == "cancelled"


def test_result_and_timeout() -> None:
    async def main() -> None:
        assert await within(asyncio.sleep(0, result="r"), 1) == "r"
        assert await within(asyncio.sleep(0, result="r"), None) == "r"
        started = asyncio.Event()

        async def slow() -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.ensure_future(slow())
        with pytest.raises(TimeoutError):
            await within(task, 0.05)
        assert started.is_set() and task.cancelled()  # a timed-out task is cancelled, as wait_for

    asyncio.run(main())


def test_a_timeout_in_a_finally_after_a_cancel_is_a_timeout() -> None:
    """Cleanup that waits with a deadline inside a cancelled task gets TimeoutError (which it
    can suppress), not a second CancelledError."""

    async def main() -> str:
        seen: list[str] = []

        async def body() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                try:
                    await within(asyncio.Event().wait(), 0.05)
                except TimeoutError:
                    seen.append("timeout")

        task = asyncio.create_task(body())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ",".join(seen)

    assert asyncio.run(main()) == "timeout"
