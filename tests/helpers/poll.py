"""Waiting for state that another task or process changes, when there is no event to await.

Everything that can be awaited is awaited (events, conditions, futures). What is left -
counters behind an admin API, a child process warming up, a server's status table - is
polled here, in one place, with a deadline: the interval only spaces the checks, and
the deadline turns a hang into a failure that says what was awaited.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def poll(check: Callable[[], T | Awaitable[T]], *, timeout: float = 5.0, interval: float = 0.02,
               what: str = "") -> T:
    """Call ``check`` (sync or async) until it returns a truthy value; return that value.

    Raises TimeoutError naming ``what`` after ``timeout`` seconds.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() > deadline:
            raise TimeoutError(f"not reached in {timeout}s: {what or check!r}")
        await asyncio.sleep(interval)
