"""Change notification for long jobs: waiters wake when a migration changes."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict


class ChangeBus:
    def __init__(self) -> None:
        self._versions: dict[str, int] = defaultdict(int)
        self._cond = asyncio.Condition()

    async def changed(self, key: str) -> None:
        async with self._cond:
            self._versions[key] += 1
            self._cond.notify_all()

    def version(self, key: str) -> int:
        return self._versions[key]

    async def wait(self, key: str, seen: int, timeout_s: float) -> int:
        """Return the key's version once it differs from `seen`, or after timeout_s."""
        async with self._cond:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._cond.wait_for(lambda: self._versions[key] != seen), timeout_s)
            return self._versions[key]
