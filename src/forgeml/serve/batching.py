"""Micro-batching: concurrent requests are answered by one model call instead of one call each.

A model call on 32 short texts costs little more than on one, so a server that scores requests one at a
time spends most of its CPU on per-call overhead and on threads fighting over the cores. Here every
request puts its records on a queue; one worker takes what is waiting (up to `max_batch` records, waiting
at most `max_wait_ms` for more after the first), scores it in one call on a single inference thread, and
hands each request its answers. Under load the queue fills while a batch is scored, so batches grow with
the load and nothing waits longer than one batch. When more than `max_batch` records are waiting, the
worker takes several batches' worth and the model scores them sorted by length, so short texts are not
padded to the length of long ones.

With `workers` > 1, that many batches are scored at once, each on its own inference thread: for a
model that runs single-threaded per call (an ONNX session with one intra-op thread), one batch per
core keeps every core on useful work, where splitting each small matrix multiply across cores costs
more in synchronisation than it gains.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

_STOP: Any = object()  # queued by `stop`: everything before it is answered, then the worker ends
# How many batches' worth of waiting records one model call may take (sorted by length inside it).
BACKLOG_BATCHES = 4


@dataclass
class _Pending:
    records: list[Any]
    context: Any
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Coalesces concurrent `submit` calls into calls of `handle`.

    `handle(records, contexts)` gets the records of several requests in one list, plus each request's
    `context` (what the caller passed along, e.g. its request id), and returns one answer per record.
    If a combined call raises, each request is retried alone, so one bad request fails only itself.
    With `background`, the inference threads run at the lowest CPU priority (for work nobody waits for).
    """

    def __init__(
        self,
        handle: Callable[[list[Any], list[tuple[Any, int]]], list[Any]],
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        on_batch: Callable[[int], None] | None = None,
        workers: int = 1,
        background: bool = False,
    ):
        if max_batch < 1 or max_wait_ms < 0 or workers < 1:
            raise ValueError(
                f"max_batch and workers must be >= 1 and max_wait_ms >= 0, not {max_batch}, {workers}, {max_wait_ms}"
            )
        self.handle, self.max_batch, self.max_wait = handle, max_batch, max_wait_ms / 1000
        self.on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._carried: deque[_Pending] = deque()  # taken from the queue but left for the next batch
        self._workers: list[asyncio.Task] = []
        self._stopping = False
        # One inference thread per worker: with one worker the model's own threads use the cores, and two
        # calls at once would fight over them.
        self.workers = workers
        self._executor = ThreadPoolExecutor(
            max_workers=workers,
            thread_name_prefix="forgeml-background" if background else "forgeml-inference",
            initializer=lowest_priority if background else None,
        )

    async def start(self) -> None:
        self._queue, self._stopping = asyncio.Queue(), False
        self._workers = [asyncio.create_task(self._run(), name=f"forgeml-batcher-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        """Answer everything already submitted, then stop."""
        if not self._workers or self._queue is None:
            return
        self._stopping = True
        self._queue.put_nowait(_STOP)  # behind everything submitted so far; each worker passes it on
        await asyncio.gather(*self._workers)
        self._executor.shutdown(wait=True)
        self._workers = []

    async def submit(self, records: list[Any], context: Any = None) -> list[Any]:
        """The answers for `records`, computed together with whatever else is waiting."""
        if self._queue is None or not self._workers or any(w.done() for w in self._workers) or self._stopping:
            raise RuntimeError("the batcher is not running")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(records, context, future))
        return await future

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet taken into a model call."""
        return self._backlog() if self._queue is not None else 0

    async def run_alone(self, function: Callable[..., Any], *args: Any) -> Any:
        """`function(*args)` on the inference thread, between batches (e.g. an explanation)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping or self._carried:
            batch, stop = await self._collect()
            stopping = stopping or stop
            if batch:
                if self.on_batch:
                    self.on_batch(sum(len(item.records) for item in batch))
                await self._answer(loop, batch)
        assert self._queue is not None
        self._queue.put_nowait(_STOP)  # for the next worker: nothing submitted is left behind it

    async def _collect(self) -> tuple[list[_Pending], bool]:
        """The next batch: everything waiting (several batches' worth at most), else what arrives in time;
        and whether `stop` was called behind it."""
        assert self._queue is not None
        first = self._carried.popleft() if self._carried else await self._queue.get()
        if first is _STOP:
            return [], True
        batch, size = [first], len(first.records)
        limit = self.max_batch * (BACKLOG_BATCHES if self._backlog() >= self.max_batch else 1)
        deadline = time.monotonic() + self.max_wait
        while size < limit:
            if self._carried:
                item = self._carried.popleft()
            elif not self._queue.empty():
                item = self._queue.get_nowait()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if item is _STOP:
                return batch, True
            if size + len(item.records) > limit:
                self._carried.appendleft(item)  # too big for this batch: first in the next
                break
            batch.append(item)
            size += len(item.records)
        return batch, False

    def _backlog(self) -> int:
        assert self._queue is not None
        return self._queue.qsize() + len(self._carried)

    async def _answer(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        try:
            answers = await loop.run_in_executor(self._executor, self._call, batch)
        except Exception as error:  # one request's records broke the call: find it by answering each alone
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(error)
                return
            for item in batch:
                await self._answer(loop, [item])
            return
        start = 0
        for item in batch:
            if not item.future.done():  # the client may have gone away
                item.future.set_result(answers[start : start + len(item.records)])
            start += len(item.records)

    def _call(self, batch: list[_Pending]) -> list[Any]:
        records = [record for item in batch for record in item.records]
        contexts = [(item.context, len(item.records)) for item in batch]
        answers = self.handle(records, contexts)
        if len(answers) != len(records):
            raise RuntimeError(f"the model gave {len(answers)} answers for {len(records)} records")
        return answers


def lowest_priority() -> None:
    """Run this inference thread at the lowest CPU priority (Linux threads have their own nice value): work
    nobody waits for, such as shadow scoring, takes only the CPU time the answers being waited for leave."""
    import contextlib
    import os
    import threading

    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: normal priority then
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
