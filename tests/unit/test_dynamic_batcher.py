"""DynamicBatcher without a model: batching under a token budget, cancelled requests skipped,
a failing forward fails only its batch, a full queue answers ServerBusy."""

from __future__ import annotations

import asyncio
import threading

import pytest

from opdplus.rollout.openai_protocol import PromptScores
from opdplus.rollout.server import DynamicBatcher, ServerBusy


class RecordingScorer:
    """Scores prompt p as [-len(p)] * (len(p) - 1); optionally blocks until released."""

    def __init__(self, block: bool = False, fail_on: int | None = None):
        self.calls: list[list[list[int]]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        if not block:
            self.release.set()
        self.fail_on = fail_on

    def __call__(self, prompts: list[list[int]], top_k: int, samplings: list) -> list[PromptScores]:
        self.calls.append(prompts)
        self.started.set()
        self.release.wait(timeout=10)
        if self.fail_on is not None and any(self.fail_on in p for p in prompts):
            raise RuntimeError("out of memory")
        return [PromptScores([-float(len(p))] * (len(p) - 1), [1] * (len(p) - 1), [], []) for p in prompts]


def run(coro):
    return asyncio.run(coro)


def test_waiting_requests_are_batched_under_the_token_budget() -> None:
    async def main():
        scorer = RecordingScorer(block=True)
        batcher = DynamicBatcher(scorer, max_batch_tokens=12, max_batch_rows=8)
        batcher.start()
        first = asyncio.ensure_future(batcher.score([[1, 1]], 0))
        await asyncio.to_thread(scorer.started.wait, 10)  # the worker is busy with `first`
        waiting = [asyncio.ensure_future(batcher.score([[2] * n], 0)) for n in (3, 3, 3, 3, 5)]
        await asyncio.sleep(0.05)
        scorer.release.set()
        results = await asyncio.gather(first, *waiting)
        await batcher.stop()
        return scorer, results, batcher.stats

    scorer, results, stats = run(main())
    assert [len(c) for c in scorer.calls] == [1, 4, 1]  # 4 rows x 3 tokens = 12 fits; the 5-token prompt waits
    assert [r[0].token_logprobs for r in results] == [[-2.0], *[[-3.0] * 2] * 4, [-5.0] * 4]
    assert stats.batches == 3 and stats.rows == 6 and stats.max_batch_rows == 4


def test_cancelled_requests_are_not_scored() -> None:
    async def main():
        scorer = RecordingScorer(block=True)
        batcher = DynamicBatcher(scorer)
        batcher.start()
        first = asyncio.ensure_future(batcher.score([[1, 1]], 0))
        await asyncio.to_thread(scorer.started.wait, 10)
        gone = asyncio.ensure_future(batcher.score([[7, 7, 7]], 0))
        kept = asyncio.ensure_future(batcher.score([[8, 8]], 0))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client disconnected while queued
        scorer.release.set()
        await asyncio.gather(first, kept)
        await batcher.stop()
        return scorer

    scorer = run(main())
    assert scorer.calls == [[[1, 1]], [[8, 8]]]


def test_a_failing_forward_fails_its_batch_only() -> None:
    async def main():
        scorer = RecordingScorer(fail_on=9)
        batcher = DynamicBatcher(scorer)
        batcher.start()
        with pytest.raises(RuntimeError, match="scoring failed: out of memory"):
            await batcher.score([[9, 9]], 0)
        ok = await batcher.score([[1, 1, 1]], 0)
        alive = batcher.alive
        await batcher.stop()
        return ok, alive, batcher.stats.failed_batches

    ok, alive, failed = run(main())
    assert ok[0].token_logprobs == [-3.0, -3.0] and alive and failed == 1


def test_a_full_queue_answers_busy() -> None:
    async def main():
        scorer = RecordingScorer(block=True)
        batcher = DynamicBatcher(scorer, max_queued_tokens=10)
        batcher.start()
        first = asyncio.ensure_future(batcher.score([[1] * 4], 0))
        await asyncio.to_thread(scorer.started.wait, 10)
        queued = asyncio.ensure_future(batcher.score([[1] * 8], 0))
        await asyncio.sleep(0.01)
        with pytest.raises(ServerBusy, match="8 tokens are queued already"):
            await batcher.score([[1] * 3], 0)
        scorer.release.set()
        await asyncio.gather(first, queued)
        await batcher.stop()

    run(main())
