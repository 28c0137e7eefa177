"""The bridge between asyncio (the gRPC servicer) and the engine thread.

The engine thread owns every torch call. The event loop talks to it only through a thread-safe
command queue (add, abort) and receives each request's outputs on an asyncio.Queue, filled with
`loop.call_soon_threadsafe`, one item per engine step that touched the request. The thread
sleeps on the command queue while there is no work, so an idle worker uses no CPU.

After a step the engine thread goes on to the next one at once, holding the GIL for its Python
work, and the event loop, woken for the outputs, waits for the GIL meanwhile. With
TANDEM_ENGINE_HANDOFF > 0 the engine thread waits (that long at most) until the loop has taken
the step's outputs, so they go out before the next step's host work instead of in its gaps.

Admission: a burst of requests arrives in the worker as GenerateMany messages of many sessions,
each of which the event loop reads, checks and submits in turn. If the engine thread steps as soon
as the first is submitted, the rest are admitted only in the loop's turns at the GIL between the
engine thread's steps, and the first request runs alone meanwhile. So the loop declares each
session it reads (`expect`) and the engine thread, before its next step, waits until every declared
session's request is submitted or its session has ended (TANDEM_ADMISSION_WAIT at most, and once
per batch of declarations: a session that takes long, e.g. compiling its grammar, holds no later
step). Off unless TANDEM_ADMISSION_WAIT is set (docs/worker.md says why).

A stream may have a `Sink`: called on the event loop with each output before it is queued, it may
take the output itself (True) instead, so the task reading the queue is not woken for it (the
GenerateMany sessions' mid-stream chunks: rpc.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from services.common import switches
from services.worker.engine import Engine
from services.worker.outputs import RequestOutput
from services.worker.request import EngineRequest
from services.worker.tp_group import group_failed

log = logging.getLogger(__name__)

T = TypeVar("T")
# On the event loop, each output of a stream before it is queued: True if it took the output.
Sink = Callable[[RequestOutput], bool]


@dataclass(frozen=True)
class LoadSnapshot:
    num_running: int = 0
    num_waiting: int = 0
    num_kv_blocks_used: int = 0
    num_kv_blocks_total: int = 0
    prefix_cache_hit_rate: float = 0.0
    num_waiting_tokens: int = 0
    num_preemptions: int = 0
    num_swapped_out: int = 0
    num_swapped_in: int = 0


class _Stream:
    def __init__(self, loop: asyncio.AbstractEventLoop, sink: Sink | None) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.sink = sink

    def put(self, item: RequestOutput | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # RuntimeError: the loop is closed, nobody listens
            self.loop.call_soon_threadsafe(self.deliver, item)

    def deliver(self, item: RequestOutput | BaseException) -> None:
        """On the event loop: to the sink, or (not taken) onto the queue."""
        if self.sink is None or isinstance(item, BaseException) or not self.sink(item):
            self.queue.put_nowait(item)


def _admitted_already() -> None:
    """What `expect` returns when the engine thread waits for no admission."""


def _put_all(deliveries: list[tuple[_Stream, RequestOutput]], taken: threading.Event | None = None) -> None:
    for stream, out in deliveries:
        stream.deliver(out)
    if taken is not None:  # (TANDEM_ENGINE_HANDOFF: the engine thread waits for this)
        taken.set()


class AsyncEngine:
    def __init__(
        self, engine: Engine, handoff: float | None = None, admission_wait: float | None = None
    ) -> None:
        self.engine = engine
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}  # engine thread only
        self._stop = threading.Event()
        # request id -> time.monotonic() of the step that first scheduled it (queue wait ends);
        # written by the engine thread, popped by the rpc when the request ends (telemetry).
        self.scheduled_at: dict[str, float] = {}
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        # seconds the engine thread waits for the loop to take a step's outputs (0: none;
        # default TANDEM_ENGINE_HANDOFF)
        self._handoff = switches.ENGINE_HANDOFF.value if handoff is None else handoff
        # Admission (above): sessions declared and not yet admitted, how many were ever declared,
        # and how many of those the engine thread has already waited for
        self._admission_wait = switches.ADMISSION_WAIT.value if admission_wait is None else admission_wait
        self._arrivals = threading.Condition()
        self._arriving = 0
        self._declared = 0
        self._waited_for = 0
        self.load = self._snapshot()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)

    # ---- called from the event loop ------------------------------------------------------------
    def submit(
        self,
        req: EngineRequest,
        add: Callable[[EngineRequest], object] | None = None,
        sink: Sink | None = None,
    ) -> asyncio.Queue[RequestOutput | BaseException]:
        """Queue `req` (through `add`, default `engine.add_request`, on the engine thread); its
        outputs (or an exception) arrive on the returned queue, those `sink` takes excepted."""
        stream = _Stream(asyncio.get_running_loop(), sink)
        add_fn = add or self.engine.add_request

        def add_request() -> None:
            try:
                add_fn(req)
            except Exception as exc:  # invalid (e.g. duplicate id): tell the caller, keep serving
                stream.put(exc)
                return
            self._streams[req.request_id] = stream

        self._commands.put(add_request)
        return stream.queue

    async def abort(self, request_ids: list[str]) -> int:
        """Abort requests; returns how many were live. Their streams get a final abort output."""
        done: concurrent.futures.Future[int] = concurrent.futures.Future()

        def run() -> None:
            count = 0
            for rid in request_ids:
                out = self.engine.abort(rid)
                if out is not None:
                    count += 1
                    self._deliver(out)
            done.set_result(count)

        self._commands.put(run)
        return await asyncio.wrap_future(done)

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run `fn` on the engine thread (after the commands queued before it); await its result."""
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            # A caller that stopped waiting (its task cancelled) cancels `done` meanwhile, and
            # setting a cancelled future raises: that must not end the engine thread.
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                try:
                    result = fn()
                except Exception as exc:
                    done.set_exception(exc)
                else:
                    done.set_result(result)

        self._commands.put(run)
        return asyncio.wrap_future(done)

    def expect(self) -> Callable[[], None]:
        """Declare a session read whose request is yet to be submitted; the engine thread's next
        step waits (Admission above) until the returned function has been called (once the request
        is submitted, or its session ended without one; calls after the first do nothing). With
        no wait (TANDEM_ADMISSION_WAIT=0, the default) nothing is counted: a no-op comes back."""
        if self._admission_wait <= 0:
            return _admitted_already
        with self._arrivals:
            self._arriving += 1
            self._declared += 1
        done = False

        def admitted() -> None:
            nonlocal done
            if done:
                return
            done = True
            with self._arrivals:
                self._arriving -= 1
                if self._arriving == 0:
                    self._arrivals.notify_all()

        return admitted

    def abort_nowait(self, request_id: str) -> None:
        """Abort without waiting (a cancelled stream); the stream is dropped at once."""

        def run() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

        self._commands.put(run)

    # ---- the engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        self.engine.bind_device()
        while not self._stop.is_set():
            self._drain_commands(block=not self.engine.has_unfinished())
            if self._await_admissions():
                self._drain_commands(block=False)
            if self._stop.is_set():
                break
            if self.engine.has_unfinished():
                step_start = time.monotonic()
                try:
                    outputs = self.engine.step()
                except Exception as exc:  # a bug or device error: fail the live requests, keep serving
                    if self.engine.driver is not None:  # unless a collective failed: the group is broken
                        group_failed(exc)
                    log.exception("engine step failed; aborting %d requests", len(self.engine.requests))
                    self._fail_all(exc)
                    outputs = []
                self._note_scheduled(step_start, outputs)
                self._deliver_step(outputs)
            self.load = self._snapshot()

    def _await_admissions(self) -> bool:
        """Wait (TANDEM_ADMISSION_WAIT at most) until every declared session is admitted, unless
        this thread already waited for each declared so far; whether it waited."""
        if self._admission_wait <= 0 or self._arriving == 0 or self._waited_for == self._declared:
            return False
        with self._arrivals:
            self._waited_for = self._declared
            self._arrivals.wait_for(lambda: self._arriving == 0, timeout=self._admission_wait)
        return True

    def _note_scheduled(self, step_start: float, outputs: list[RequestOutput]) -> None:
        """Remember when each request was first scheduled (its prompt-cache lookup is done then)."""
        for rid, request in self.engine.requests.items():
            if request.num_cached_prompt_tokens is not None and rid not in self.scheduled_at:
                self.scheduled_at[rid] = step_start
        for out in outputs:  # scheduled and finished within this one step
            if out.finished and out.request_id not in self.scheduled_at:
                self.scheduled_at[out.request_id] = step_start

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            command()
            for out in self.engine.take_outputs():  # (a fetched request's early first token)
                self._deliver(out)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to the event loop in one call: one wake-up of the loop per
        step, not one per request (each `call_soon_threadsafe` takes the loop's lock and writes
        its self-pipe, time the engine thread would otherwise spend on every request)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for out in outputs:
            stream = (
                self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
            )
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, deliveries in by_loop.items():  # one loop (the rpc server's), but be general
            taken = threading.Event() if self._handoff else None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(_put_all, deliveries, taken)
                if taken is not None:
                    taken.wait(self._handoff)

    def _deliver(self, out: RequestOutput) -> None:
        stream = (
            self._streams.pop(out.request_id, None) if out.finished else self._streams.get(out.request_id)
        )
        if stream is not None:
            stream.put(out)

    def _fail_all(self, exc: Exception) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
            stream = self._streams.pop(rid, None)
            if stream is not None:
                stream.put(RuntimeError(f"engine step failed: {exc}"))

    def _snapshot(self) -> LoadSnapshot:
        e = self.engine
        return LoadSnapshot(
            num_running=e.num_running,
            num_waiting=e.num_waiting,
            num_kv_blocks_used=e.block_manager.num_used_blocks,
            num_kv_blocks_total=e.block_manager.num_blocks,
            prefix_cache_hit_rate=e.block_manager.hit_rate,
            num_waiting_tokens=e.scheduler.num_waiting_tokens,
            num_preemptions=e.scheduler.num_preemptions,
            num_swapped_out=e.block_manager.num_swapped_out,
            num_swapped_in=e.block_manager.num_swapped_in,
        )
