"""Continuous batching: one background thread owns the engine; requests join the running batch between steps.

The server (asyncio) submits requests from any thread; events come back through per-request callbacks, which
the async helpers turn into ``asyncio.Queue`` items. A request that fails at prefill (bad prompt) fails alone:
the group is retried one by one so its neighbours are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ivl.inference.engine import DecodeBatch, Engine, GenerationRequest, GenerationResult, StepEvent

log = logging.getLogger(__name__)

EventSink = Callable[[StepEvent | BaseException], None]


class SchedulerBusy(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 429)."""


class SchedulerStopped(RuntimeError):
    """The scheduler is not running."""


@dataclass
class _Ticket:
    request: GenerationRequest
    sink: EventSink
    submitted: float


class Scheduler:
    """Groups concurrent requests into engine batches; at most ``engine.max_batch_size`` rows decode together.

    ``batch_window_s``: when the engine is idle, how long to wait for companions after the first request
    arrives (a few ms lets simultaneous clients share the first prefill).
    """

    def __init__(self, engine: Engine, *, batch_window_s: float = 0.005, max_queue: int = 256) -> None:
        self.engine = engine
        self.batch_window_s = batch_window_s
        self.max_queue = max_queue
        self._waiting: queue.Queue[_Ticket] = queue.Queue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._sinks: dict[str, EventSink] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.steps = 0  # decode steps run (for tests and metrics)
        self.max_rows_seen = 0

    # ------------------------------------------------------------------ control

    def start(self) -> Scheduler:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="ivl-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        """Queue a request; ``sink`` receives its StepEvents (from the scheduler thread) or an exception."""
        if not self.running:
            raise SchedulerStopped("the generation scheduler is not running")
        if self._waiting.qsize() >= self.max_queue:
            raise SchedulerBusy(f"{self._waiting.qsize()} requests are already waiting (limit {self.max_queue})")
        self._waiting.put(_Ticket(request, sink, time.monotonic()))

    def cancel(self, request_id: str) -> None:
        """Stop generating for ``request_id`` (e.g. the client went away); safe from any thread."""
        with self._lock:
            self._cancelled.add(request_id)

    # ------------------------------------------------------------------ async helpers

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Await the complete result of one request."""
        async for event in self.events(request):
            if event.result is not None:
                return event.result
        raise RuntimeError(f"request {request.request_id} ended without a result")  # pragma: no cover

    async def events(self, request: GenerationRequest) -> AsyncIterator[StepEvent]:
        """Async iterator over the StepEvents of one request; cancels it if the consumer stops early."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[StepEvent | BaseException] = asyncio.Queue()

        def sink(item: StepEvent | BaseException) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, item)

        self.submit(request, sink)
        finished = False
        try:
            while True:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.cancel(request.request_id)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        batch: DecodeBatch | None = None
        while not self._stop.is_set():
            try:
                running = len(batch) if batch is not None else 0
                free = self.engine.max_batch_size - running
                tickets = self._take(free, block=running == 0) if free > 0 else []
                if tickets:
                    batch = self._admit(batch, tickets)
                elif running:
                    self._apply_cancellations(batch)
                    self._dispatch(self.engine.step(batch))
                    self.steps += 1
                if batch is not None:
                    self.max_rows_seen = max(self.max_rows_seen, len(batch))
            except Exception as exc:  # a failing step must not kill the server: fail the batch and go on
                log.exception("generation step failed")
                if batch is not None:
                    for seq in batch.seqs:
                        self._fail(seq.request.request_id, exc)
                batch = None

    def _take(self, free: int, *, block: bool) -> list[_Ticket]:
        """Up to ``free`` waiting tickets; when idle, wait for one and then ``batch_window_s`` for companions."""
        tickets: list[_Ticket] = []
        try:
            if block:
                tickets.append(self._waiting.get(timeout=0.1))
                deadline = time.monotonic() + self.batch_window_s
                while len(tickets) < free:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    tickets.append(self._waiting.get(timeout=remaining))
            while len(tickets) < free:
                tickets.append(self._waiting.get_nowait())
        except queue.Empty:
            pass
        return tickets

    def _admit(self, batch: DecodeBatch | None, tickets: list[_Ticket]) -> DecodeBatch | None:
        """Prefill new tickets and merge them into the running batch (each failing request fails alone)."""
        admit = [t for t in tickets if not self._pop_cancelled(t.request.request_id)]
        for t in admit:
            with self._lock:
                self._sinks[t.request.request_id] = t.sink
        try:
            batch = self._prefill(batch, [t.request for t in admit])
        except Exception:
            for t in admit:
                try:
                    batch = self._prefill(batch, [t.request])
                except Exception as exc:
                    self._fail(t.request.request_id, exc)
        return batch

    def _prefill(self, batch: DecodeBatch | None, requests: list[GenerationRequest]) -> DecodeBatch | None:
        if not requests:
            return batch
        if batch is None or not len(batch):
            batch, events = self.engine.prefill(requests)
        else:
            events = self.engine.join(batch, requests)
        self._dispatch(events)
        return batch

    def _pop_cancelled(self, request_id: str) -> bool:
        with self._lock:
            if request_id in self._cancelled:
                self._cancelled.discard(request_id)
                return True
            return False

    def _apply_cancellations(self, batch: DecodeBatch) -> None:
        with self._lock:
            if not self._cancelled:
                return
            cancelled, self._cancelled = self._cancelled, set()
        live = {s.request.request_id for s in batch.seqs}
        for rid in cancelled & live:
            self.engine.cancel(batch, rid)
        with self._lock:  # keep ids of requests not yet admitted
            self._cancelled |= cancelled - live

    def _dispatch(self, events: list[StepEvent]) -> None:
        for ev in events:
            with self._lock:
                sink = self._sinks.get(ev.request_id)
                if ev.finish_reason is not None:
                    self._sinks.pop(ev.request_id, None)
            if sink is not None:
                sink(ev)

    def _fail(self, request_id: str, exc: BaseException) -> None:
        with self._lock:
            sink = self._sinks.pop(request_id, None)
        if sink is not None:
            sink(exc)
