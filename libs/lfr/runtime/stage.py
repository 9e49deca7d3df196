"""A pipeline stage: a bounded queue that drops the oldest item when full, stale-item dropping by capture
time, and batches handed to a processing coroutine. Every drop is counted. Live beats complete."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from lfr.runtime import metrics
from lfr.runtime.logs import get_logger

T = TypeVar("T")

# Share of the freshness budget (LFR_FRESHNESS_MS) by which each stage must have finished with a message. A
# stage starts on a message only if its age, plus the rest of the batch in progress, plus its own predicted
# processing time (the stage's recent cost per unit of weight, e.g. per face, times the weight of the batch
# it joins) fits in its share, and drops (and counts) what cannot, so whatever is still unmatched when the
# budget runs out has been disposed of.
BUDGET_SHARE = {"detect": 0.4, "embed": 0.65, "match": 0.8}
REAP_INTERVAL_S = 0.05
# The prediction learns only from batches it lets through: after one slow batch (a cold start, a CPU stall) it
# would drop every item for ever. So when nothing has been processed for PROBE_AFTER_S, an item still inside
# its budget by age alone goes through as a probe, and its batch's cost replaces the estimate.
PROBE_AFTER_S = 1.0


class Stage(Generic[T]):
    def __init__(self, service: str, name: str, maxsize: int, batch: int,
                 process: Callable[[list[T]], Awaitable[None]], age_ms: Callable[[T], float], budget_ms: float,
                 on_drop: Callable[[T, str], None] | None = None, weight: Callable[[T], int] | None = None):
        """batch: the most items per batch, or with `weight`, the most total weight (e.g. faces, not frames)
        per batch; one item always makes a batch."""
        self.service, self.name = service, name
        self.queue: deque[T] = deque()
        self.maxsize, self.batch = maxsize, batch
        self.process, self.age_ms, self.budget_ms = process, age_ms, budget_ms
        self.on_drop = on_drop
        self.weight = weight
        self._event = asyncio.Event()
        self._stopped = False
        self.busy = False
        self.log = get_logger(stage=name)
        self._depth = metrics.QUEUE_DEPTH.labels(service, name)
        self.batch_ms = 0.0  # moving average of a batch's processing time
        self.unit_ms = 0.0  # moving average of processing time per unit of weight (per item without `weight`)
        self._busy_end = 0.0  # when the batch in progress is expected to finish (monotonic seconds)
        self._last_done = time.monotonic()  # when a batch last finished (or the stage started)

    def _w(self, item: T) -> int:
        return self.weight(item) if self.weight else 1

    def _late(self, item: T, ahead: int = 0) -> bool:
        """True if the item cannot be finished within its budget any more, joining a batch that already holds
        `ahead` units of weight (and after the batch in progress, if any)."""
        wait_ms = max(0.0, self._busy_end - time.monotonic()) * 1000 if self.busy else 0.0
        return self.age_ms(item) + wait_ms + self.unit_ms * (ahead + self._w(item)) > self.budget_ms

    def _drop(self, item: T, reason: str) -> None:
        metrics.DROPPED.labels(self.service, self.name, reason).inc()
        if self.on_drop:
            self.on_drop(item, reason)

    def offer(self, item: T) -> None:
        if self._stopped:
            self._drop(item, "stopping")
            return
        if len(self.queue) >= self.maxsize:
            self._drop(self.queue.popleft(), "queue_full")
        self.queue.append(item)
        self._depth.set(len(self.queue))
        self._event.set()

    def stop(self) -> None:
        self._stopped = True
        self._event.set()

    @property
    def idle(self) -> bool:
        return not self.queue and not self.busy

    def reap(self) -> None:
        """Drop queued items that have outlived the budget (the queue is in arrival order)."""
        probe_due = not self.busy and time.monotonic() - self._last_done > PROBE_AFTER_S
        while self.queue and self._late(self.queue[0]):
            if probe_due and self.age_ms(self.queue[0]) < self.budget_ms:
                break  # the worker takes it as a probe
            self._drop(self.queue.popleft(), "stale")
        self._depth.set(len(self.queue))

    async def _reaper(self) -> None:
        # Runs beside the worker, so a slow batch never keeps stale items alive past their budget.
        while not self._stopped:
            self.reap()
            await asyncio.sleep(REAP_INTERVAL_S)

    async def run(self) -> None:
        reaper = asyncio.create_task(self._reaper(), name=f"{self.name}-reaper")
        try:
            await self._work()
        finally:
            reaper.cancel()

    async def _work(self) -> None:
        while True:
            if not self.queue:
                if self._stopped:
                    return
                self._event.clear()
                await self._event.wait()
                continue
            batch: list[T] = []
            total = 0
            while self.queue and total < self.batch:
                if batch and self.weight and total + self.weight(self.queue[0]) > self.batch:
                    break
                item = self.queue.popleft()
                probe = (not batch and time.monotonic() - self._last_done > PROBE_AFTER_S
                         and self.age_ms(item) < self.budget_ms)
                if self._late(item, total) and not probe:
                    self._drop(item, "stale")
                else:
                    batch.append(item)
                    total += self._w(item)
                    if probe and self._late(item, 0):
                        break  # a probe goes alone
            self._depth.set(len(self.queue))
            if not batch:
                continue
            probing = time.monotonic() - self._last_done > PROBE_AFTER_S
            self.busy = True
            t0 = time.perf_counter()
            self._busy_end = time.monotonic() + self.unit_ms * total / 1000
            try:
                await self.process(batch)
                metrics.PROCESSED.labels(self.service, self.name).inc(len(batch))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                for item in batch:
                    self._drop(item, "error")
                self.log.error("stage.failed", error=type(exc).__name__, detail=str(exc)[:200], exc_info=True)
            finally:
                self.busy = False
                elapsed = time.perf_counter() - t0
                self.batch_ms = 0.7 * self.batch_ms + 0.3 * elapsed * 1000 if self.batch_ms else elapsed * 1000
                unit = elapsed * 1000 / max(1, total)
                self.unit_ms = 0.7 * self.unit_ms + 0.3 * unit if self.unit_ms and not probing else unit
                self._last_done = time.monotonic()
                metrics.LATENCY.labels(self.service, self.name).observe(elapsed)

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting, then wait (bounded) for queued work to finish."""
        self.stop()
        deadline = time.monotonic() + timeout_s
        while not self.idle and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
