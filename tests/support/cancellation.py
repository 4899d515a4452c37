"""Cancel a background task at the moment Python 3.11's ``asyncio.wait_for`` loses a cancellation.

``wait_for`` (3.11) runs the awaited coroutine as a child task and waits on a future of its own; a
cancel that reaches the caller after the child has finished but before the caller has resumed is
swallowed: ``wait_for`` returns the child's result, the caller runs on, and only
``Task.cancelling()`` (left above zero) still shows the request. redis-py's asyncio client writes
every command through such a ``wait_for``. ``ChildTaskWatch`` calls an action in the first done
callback of the n-th task a watched task starts, which is exactly that moment: whatever the action
cancels there is cancelled while the caller has not yet seen its child finish. On 3.12 and later
``wait_for`` starts no child task, so fewer moments come round (and none is lost there).
``stops_that_hang`` stops background loops that way, each at another moment.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

MOMENTS_WAIT_S = 5.0


@dataclass
class _Armed:
    children_left: int
    action: Callable[[], object]


class ChildTaskWatch:
    """Installed as the running loop's task factory by ``install``; ``remove`` puts the previous one back."""

    def __init__(self) -> None:
        self._armed: dict[asyncio.Task, _Armed] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._previous = None
        self.fired = 0
        """Actions called so far."""

    def install(self) -> ChildTaskWatch:
        self._loop = asyncio.get_running_loop()
        self._previous = self._loop.get_task_factory()
        self._loop.set_task_factory(self._create)
        return self

    def remove(self) -> None:
        assert self._loop is not None
        self._loop.set_task_factory(self._previous)
        self._armed.clear()

    def when_child_done(self, parent: asyncio.Task, n: int, action: Callable[[], object]) -> None:
        """Call ``action`` as the ``n``-th task that ``parent`` starts from now on finishes, before anyone
        awaiting that task is told."""
        self._armed[parent] = _Armed(n, action)

    def _create(self, loop: asyncio.AbstractEventLoop, coro, **kwargs) -> asyncio.Future:
        if self._previous is not None:
            task = self._previous(loop, coro, **kwargs)
        else:
            task = asyncio.Task(coro, loop=loop, **kwargs)
        parent = asyncio.current_task(loop)
        armed = self._armed.get(parent) if parent is not None else None
        if armed is not None:
            armed.children_left -= 1
            if armed.children_left == 0:
                del self._armed[parent]
                task.add_done_callback(lambda _: self._fire(armed.action))  # first: before wait_for's own
        return task

    def _fire(self, action: Callable[[], object]) -> None:
        self.fired += 1
        action()


async def stops_that_hang(loops: Sequence[tuple[asyncio.Task, Callable[[], Awaitable[None]]]], timeout_s: float = 5.0) -> list[int]:
    """Call the n-th ``(task, stop)`` pair's ``stop`` (n = 1, 2, ...) as the n-th task that its running
    ``task`` starts from now on finishes; the n whose stop did not return within ``timeout_s``.

    ``stop`` must cancel ``task``. Fails when, on 3.11, a moment did not come round within
    ``MOMENTS_WAIT_S`` (the loops no longer start tasks: the test no longer reaches what it is about).
    Whatever is left at the end is cancelled until it is gone.
    """
    watch = ChildTaskWatch().install()
    stops: dict[int, asyncio.Future] = {}
    try:
        def stop_now(n: int) -> None:
            if n not in stops:
                stops[n] = asyncio.ensure_future(loops[n - 1][1]())

        for n, (task, _) in enumerate(loops, start=1):
            watch.when_child_done(task, n, lambda n=n: stop_now(n))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MOMENTS_WAIT_S
        while len(stops) < len(loops) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if sys.version_info < (3, 12):  # wait_for starts a task per Redis write: every moment comes round
            assert watch.fired == len(loops), f"only {watch.fired} of {len(loops)} stops came at their moment"
        for n in range(1, len(loops) + 1):  # 3.12+: the moments that did not come round
            stop_now(n)
        _, hung = await asyncio.wait(stops.values(), timeout=timeout_s)
        return [n for n, future in sorted(stops.items()) if future in hung]
    finally:
        watch.remove()
        for leftover in [*(task for task, _ in loops), *stops.values()]:
            while not leftover.done():
                leftover.cancel()
                await asyncio.wait([leftover], timeout=0.5)
