"""The micro-batcher on its own: concurrent requests share model calls, each gets its own answers, one bad
request fails alone, and stopping answers everything already submitted."""

from __future__ import annotations

import asyncio
import threading

import pytest

from forgeml.serve.batching import MicroBatcher


class Model:
    """Answers each record with its upper-case form; refuses 'bad'. Records each call it gets."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[list[str]] = []
        self.contexts: list[list[tuple[object, int]]] = []
        self.gate = gate

    def __call__(self, records: list[str], contexts: list[tuple[object, int]]) -> list[str]:
        if self.gate is not None:
            self.gate.wait(timeout=30)  # holds the first call so the others queue up behind it
            self.gate = None
        self.calls.append(list(records))
        self.contexts.append(contexts)
        if "bad" in records:
            raise ValueError("a bad record")
        return [record.upper() for record in records]


def test_concurrent_requests_share_model_calls_and_get_their_own_answers() -> None:
    gate = threading.Event()
    model = Model(gate)
    sizes: list[int] = []
    requests = [[f"r{i}-a", f"r{i}-b"] for i in range(40)]

    async def scenario() -> list[list[str]]:
        batcher = MicroBatcher(model, max_batch=16, max_wait_ms=50, on_batch=sizes.append)
        await batcher.start()
        first = asyncio.create_task(batcher.submit(requests[0], "id-0"))
        await asyncio.sleep(0)  # let the first request reach the (held) model
        rest = [asyncio.create_task(batcher.submit(r, f"id-{i}")) for i, r in enumerate(requests[1:], 1)]
        gate.set()
        answers = await asyncio.gather(first, *rest)
        await batcher.stop()
        return answers

    answers = asyncio.run(scenario())
    assert answers == [[record.upper() for record in request] for request in requests]
    assert sum(sizes) == 80 and len(model.calls) < 10  # 40 requests, a few model calls
    # a backlog is taken several batches at a time (the model sorts it by length inside)
    assert max(sizes) > 16 and max(sizes) <= 16 * 4
    assert all(size % 2 == 0 for size in sizes)  # a request's records are never split across calls
    contexts = [context for call in model.contexts for context in call]
    assert sorted(contexts, key=lambda c: int(c[0][3:])) == [(f"id-{i}", 2) for i in range(40)]


def test_a_lone_request_is_answered_after_at_most_max_wait() -> None:
    model = Model()

    async def scenario() -> list[str]:
        batcher = MicroBatcher(model, max_batch=32, max_wait_ms=1)
        await batcher.start()
        answer = await asyncio.wait_for(batcher.submit(["alone"]), timeout=10)
        await batcher.stop()
        return answer

    assert asyncio.run(scenario()) == ["ALONE"]


def test_a_bad_request_fails_alone() -> None:
    gate = threading.Event()
    model = Model(gate)

    async def scenario() -> list[object]:
        batcher = MicroBatcher(model, max_batch=64, max_wait_ms=20)
        await batcher.start()
        held = asyncio.create_task(batcher.submit(["first"]))
        await asyncio.sleep(0)
        queued = [asyncio.create_task(batcher.submit(r)) for r in (["good", "fine"], ["bad"], ["ok"])]
        gate.set()
        answers = await asyncio.gather(held, *queued, return_exceptions=True)
        await batcher.stop()
        return answers

    first, good, bad, ok = asyncio.run(scenario())
    assert first == ["FIRST"] and good == ["GOOD", "FINE"] and ok == ["OK"]
    assert isinstance(bad, ValueError) and "bad record" in str(bad)


def test_stop_answers_everything_submitted_and_refuses_more() -> None:
    model = Model()

    async def scenario() -> tuple[list[list[str]], MicroBatcher]:
        batcher = MicroBatcher(model, max_batch=4, max_wait_ms=200)
        await batcher.start()
        pending = [asyncio.create_task(batcher.submit([f"x{i}", f"y{i}", f"z{i}"])) for i in range(10)]
        await asyncio.sleep(0)  # all ten are queued
        await batcher.stop()  # long before 200 ms per batch would have passed ten times
        assert all(task.done() for task in pending)
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.submit(["late"])
        return [task.result() for task in pending], batcher

    answers, _ = asyncio.run(scenario())
    assert answers == [[f"X{i}", f"Y{i}", f"Z{i}"] for i in range(10)]


@pytest.mark.parametrize(("max_batch", "max_wait_ms"), [(0, 5), (8, -1)])
def test_bad_settings_are_refused(max_batch: int, max_wait_ms: float) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(Model(), max_batch, max_wait_ms)


def test_several_workers_score_batches_at_once_and_stop_answers_everything() -> None:
    """Two workers: two model calls overlap (each waits until the other has started), and `stop` still
    answers every request submitted before it."""
    both_started = threading.Barrier(2, timeout=30)
    calls: list[list[str]] = []

    def model(records: list[str], contexts: list[tuple[object, int]]) -> list[str]:
        if len(calls) < 2:
            calls.append(list(records))
            both_started.wait()  # breaks (and fails the test) unless a second call runs meanwhile
        return [record.upper() for record in records]

    async def scenario() -> list[list[str]]:
        batcher = MicroBatcher(model, max_batch=2, max_wait_ms=0, workers=2)
        await batcher.start()
        pending = [asyncio.create_task(batcher.submit([f"r{i}"], i)) for i in range(20)]
        await asyncio.sleep(0)
        await batcher.stop()
        return await asyncio.gather(*pending)

    assert asyncio.run(scenario()) == [[f"R{i}"] for i in range(20)]
    assert len(calls) == 2


def test_a_micro_batch_of_scattered_lengths_is_split_to_bound_padding() -> None:
    import numpy as np

    from forgeml.evaluate.outputs import _batches

    lengths = np.array([60, 10, 58, 12, 11, 30, 59])
    order = np.argsort(-lengths, kind="stable")
    batches = _batches(order, lengths, batch_size=32, max_padding=0.25)
    assert sorted(row for batch in batches for row in batch) == list(range(7))
    for batch in batches:  # each padded to its longest row, with at most a quarter of its tokens padding
        padded = lengths[batch].max() * len(batch)
        assert padded - lengths[batch].sum() <= 0.25 * padded
    assert [sorted(lengths[b].tolist()) for b in batches] == [[30, 58, 59, 60], [10, 11, 12]]
    assert _batches(order, lengths, batch_size=4, max_padding=None) == [order[:4].tolist(), order[4:].tolist()]


def test_background_batcher_runs_its_calls_at_the_lowest_priority() -> None:
    import os

    priorities: list[int] = []

    def handle(records: list, contexts: list) -> list:
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return records

    async def scenario() -> None:
        for background in (True, False):
            batcher = MicroBatcher(handle, background=background)
            await batcher.start()
            assert await batcher.submit([1, 2]) == [1, 2]
            await batcher.stop()

    asyncio.run(scenario())
    assert priorities[0] == 19 and priorities[1] < 19
