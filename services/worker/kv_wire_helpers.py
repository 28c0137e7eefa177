"""The worker's side of its wire helper processes (`--kv-wire-helpers N`; the helper itself is
kv_wire_helper.py): a parallel gRPC fetch's further streams (kv_streams.py) go through them, so
that grpcio's copies and framing of one fetch run in N + 1 processes a side instead of one.

    prefill worker P: FetchKV's first stream names the helpers' addresses (KVChunk.stream_addresses);
      a further stream that reaches a helper comes here as a join (`ServeStream`): the worker
      checks it as it checks its own further streams, reads each chunk into a slot of that
      helper's serve ring (`ServeStream.read_into`) and hands the slot over; the helper frees it.
    decode worker D: each further stream is read by a helper (`WireHelpers.read`), which copies
      each chunk's data into a slot of its receive ring; the worker writes the chunk into its
      cache from there and frees the slot (`kv_wire.WireChunk.release`) once the write is done.

Every slot is accounted for: a slot goes back when its chunk was sent (P) or written (D), when
the stream ended first, and when a read into it was abandoned (only once the copy into it ended).
A helper that exits fails the streams it carried (the decode worker computes the prompt itself,
as for any failed fetch; the prefill worker's handle goes back) and later fetches use the others,
or the worker's own streams when none is left.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import subprocess
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import torch

import services
from services.common import metrics
from services.common.tls import TlsFiles
from services.worker import kv_wire
from services.worker.kv_transfer import KVChunkData
from services.worker.kv_wire_helper import frame, read_message, ring_offset
from tandem.v1 import worker_pb2

log = logging.getLogger(__name__)

# Slots per ring: the chunks a stream reads ahead (kv_transfer.READ_AHEAD) plus the one being
# sent and one more; on the decode side the writes in flight take turns over them.
RING_SLOTS = 4
# Threads that read chunks into serve slots (the device-to-host copies), for all helpers.
READ_THREADS = 4
# Seconds a helper has to start and report its port.
START_TIMEOUT_S = 30.0
# --kv-wire-helpers -1 (auto): at most this many (round 19 measured 3 a side at 2.5x one process)
AUTO_MAX = 3


def auto_count(role: str, device_type: str, num_cpus: int) -> int:
    """--kv-wire-helpers -1: helpers for a prefill or decode worker on a GPU, one per 4 cores
    beyond the first 4, at most AUTO_MAX (none on 4 cores or fewer, where they would only take
    turns with the worker); none for other roles and on the CPU (--kv-wire-helpers N sets any
    worker's)."""
    if role not in ("prefill", "decode") or device_type != "cuda":
        return 0
    return max(0, min(AUTO_MAX, (num_cpus - 4) // 4))


def available_cpus() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # (not on Linux)
        return os.cpu_count() or 1


class WireStreamError(Exception):
    """A further stream read through a helper ended with a gRPC status from the peer
    (`from_peer`), or the helper went."""

    def __init__(self, code: str, details: str, from_peer: bool = True) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.from_peer = from_peer


def slot_bytes_for(chunk_bytes: int, layer_block_bytes: int) -> int:
    """A slot holds the biggest chunk `kv_transfer.chunk_plan` cuts for `chunk_bytes` (one block
    of one layer when that is bigger), rounded up to 4 KiB."""
    size = max(chunk_bytes, layer_block_bytes)
    return -(-size // 4096) * 4096


@dataclasses.dataclass
class _Helper:
    index: int
    process: subprocess.Popen[bytes]
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    address: str  # where peers reach its further streams
    memory: shared_memory.SharedMemory
    serve_ring: torch.Tensor  # uint8 [RING_SLOTS * slot_bytes], written by the worker
    serve_free: asyncio.Queue[int]
    serving: dict[int, asyncio.Task[None]] = dataclasses.field(default_factory=dict)  # by the helper's fid
    reading: dict[int, asyncio.Queue[tuple[Any, ...]]] = dataclasses.field(default_factory=dict)
    alive: bool = True
    receive_held: int = 0  # receive slots holding a chunk not yet written (tests, leaks)
    control: asyncio.Task[None] | None = None
    pinned: bool = False

    def post(self, message: tuple[Any, ...]) -> None:
        """Send a control message (small: the transport buffers it; no wait)."""
        if self.alive and not self.writer.is_closing():
            self.writer.write(frame(message))

    def receive_view(self, slot: int, nbytes: int, slot_bytes: int) -> memoryview:
        start = ring_offset(1, slot, RING_SLOTS, slot_bytes)
        return self.memory.buf[start : start + nbytes]  # type: ignore[index]


class _SlotRelease:
    """A received chunk's slot: freed once (the decode worker's write of it is done)."""

    def __init__(self, helper: _Helper, slot: int) -> None:
        self.helper, self.slot = helper, slot
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.helper.receive_held -= 1
            self.helper.post(("freed", self.slot))


class ServeStream:
    """P: one further stream of a parallel fetch that a helper serves. The worker's coroutine
    (`WorkerServicer.serve_helper_stream`) reads chunks with `read_into`, then `chunk` / `keepalive`
    each and `end`s it, or `abort`s it with a status; `close` (always, last) frees what is left."""

    def __init__(
        self, helper: _Helper, fid: int, slot_bytes: int, executor: concurrent.futures.Executor
    ) -> None:
        self.helper, self.fid, self.slot_bytes = helper, fid, slot_bytes
        self.executor = executor
        self.held: set[int] = set()  # read, not yet handed to the helper
        self.closed = False
        # A stream's reads take slots in its order: its oldest read always has one (or is next
        # in line), so streams sharing a ring cannot each hold slots their oldest read waits for.
        self._in_order = asyncio.Lock()

    async def read_into(self, read: Callable[[torch.Tensor], KVChunkData]) -> KVChunkData:
        """Run `read(out)` (a device-to-host copy into `out`, a uint8 slot) on a reader thread;
        the chunk it returns names its slot."""
        loop = asyncio.get_running_loop()
        async with self._in_order:
            slot = await self.helper.serve_free.get()
        landed: asyncio.Future[KVChunkData] = loop.create_future()
        start = slot * self.slot_bytes
        work = self.executor.submit(read, self.helper.serve_ring[start : start + self.slot_bytes])
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(self._landed, slot, work, landed))
        chunk = await landed
        return dataclasses.replace(chunk, slot=slot)

    def _landed(
        self, slot: int, work: concurrent.futures.Future[KVChunkData], landed: asyncio.Future[KVChunkData]
    ) -> None:
        # The copy into the slot is over: the slot is the chunk's, or free again if nobody waits.
        if landed.cancelled() or self.closed or work.exception() is not None:
            self._free(slot)
            if not landed.done():
                exc = work.exception()
                landed.set_exception(exc if exc is not None else RuntimeError("the stream closed"))
            return
        self.held.add(slot)
        landed.set_result(work.result())

    def _free(self, slot: int) -> None:
        self.helper.serve_free.put_nowait(slot)

    def chunk(self, chunk: KVChunkData) -> None:
        assert chunk.slot >= 0
        self.held.discard(chunk.slot)
        head = worker_pb2.KVChunk(
            layer_start=chunk.layer_start,
            layer_end=chunk.layer_end,
            block_start=chunk.block_start,
            block_end=chunk.block_end,
        )
        tail = worker_pb2.KVChunk(dtype=chunk.dtype, shape=chunk.shape)
        self.helper.post(
            (
                "chunk",
                self.fid,
                chunk.slot,
                len(chunk.data),
                head.SerializeToString(),
                tail.SerializeToString(),
            )
        )

    def keepalive(self) -> None:
        self.helper.post(("keepalive", self.fid))

    def end(self) -> None:
        self.helper.post(("end", self.fid))

    def abort(self, code: str, details: str) -> None:
        self.helper.post(("abort", self.fid, code, details))

    def close(self) -> None:
        self.closed = True
        for slot in self.held:  # read but never handed over (the stream stopped first)
            self._free(slot)
        self.held.clear()


OnJoin = Callable[[bytes, ServeStream], Awaitable[None]]


class WireHelpers:
    """The worker's helper processes. `start` them once the server is bound; `close` at exit."""

    def __init__(self, helpers: list[_Helper], slot_bytes: int, on_join: OnJoin) -> None:
        self.helpers = helpers
        self.slot_bytes = slot_bytes
        self.on_join = on_join
        self.executor = concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix="kv-wire-read")
        self._fids = itertools.count(1)
        self.num_served = 0  # further streams the helpers served for this worker (tests, logs)
        self.num_read = 0  # and read for it
        for helper in helpers:
            helper.control = asyncio.ensure_future(self._control(helper))
        metrics.gauge(metrics.KV_WIRE_HELPERS).set(len(helpers))

    @classmethod
    async def start(
        cls,
        count: int,
        slot_bytes: int,
        bind_host: str,
        advertise_host: str,
        tls: TlsFiles | None,
        on_join: OnJoin,
        pin: bool = False,
        timeout_s: float = 60.0,
    ) -> WireHelpers:
        """Spawn `count` helpers serving on `bind_host` (free ports), reached at `advertise_host`;
        `pin`: register their rings with CUDA (page-locked, for fast device copies)."""
        helpers = []
        try:
            for index in range(count):
                helpers.append(
                    await _spawn(index, slot_bytes, bind_host, advertise_host, tls, pin, timeout_s)
                )
        except BaseException:
            for helper in helpers:
                await _stop(helper)
                _release_memory(helper)
            raise
        return cls(helpers, slot_bytes, on_join)

    def live(self) -> list[_Helper]:
        return [helper for helper in self.helpers if helper.alive]

    def stream_addresses(self, streams: int) -> list[str]:
        """P: where a fetch's further streams 1 .. streams - 1 go (round robin over live helpers)."""
        live = self.live()
        return [live[(index - 1) % len(live)].address for index in range(1, streams)] if live else []

    async def read(
        self, index: int, address: str, request: worker_pb2.FetchKVRequest
    ) -> AsyncGenerator[kv_wire.WireChunk, None]:
        """D: further stream `index` of a fetch from `address`, read by a helper: its chunks, each
        data a view of a receive slot, freed by the chunk's `release`."""
        live = self.live()
        if not live:
            raise WireStreamError("UNAVAILABLE", "no wire helper is running", from_peer=False)
        helper = live[(index - 1) % len(live)]
        fid = next(self._fids)
        self.num_read += 1
        metrics.counter(metrics.KV_WIRE_HELPER_STREAMS).labels(direction="read").inc()
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        helper.reading[fid] = queue
        helper.post(("read", fid, address, request.SerializeToString()))
        finished = False
        try:
            while True:
                message = await queue.get()
                kind = message[0]
                if kind == "got":
                    _, _, slot, nbytes, header = message
                    view = helper.receive_view(slot, nbytes, self.slot_bytes)
                    helper.receive_held += 1
                    yield kv_wire.WireChunk(
                        worker_pb2.KVChunk.FromString(header), view, _SlotRelease(helper, slot)
                    )
                elif kind == "raw":
                    yield kv_wire.decode_chunk(message[2])
                elif kind == "done":
                    finished = True
                    return
                elif kind == "gone":
                    finished = True
                    raise WireStreamError("UNAVAILABLE", "the KV wire helper exited", from_peer=False)
                else:  # ("failed", fid, code, details)
                    finished = True
                    raise WireStreamError(message[2], message[3])
        finally:
            helper.reading.pop(fid, None)
            if not finished:
                helper.post(("stop", fid))
            while not queue.empty():  # chunks that came after the reader stopped
                message = queue.get_nowait()
                if message[0] == "got":
                    helper.post(("freed", message[2]))

    async def _control(self, helper: _Helper) -> None:
        """One helper's messages, until it exits."""
        while (message := await read_message(helper.reader)) is not None:
            kind = message[0]
            if kind == "join":
                _, fid, request = message
                stream = ServeStream(helper, fid, self.slot_bytes, self.executor)
                self.num_served += 1
                metrics.counter(metrics.KV_WIRE_HELPER_STREAMS).labels(direction="served").inc()
                helper.serving[fid] = asyncio.ensure_future(self._serve(helper, fid, request, stream))
            elif kind == "free":
                helper.serve_free.put_nowait(message[1])
            elif kind == "cancel":
                task = helper.serving.get(message[1])
                if task is not None:
                    task.cancel()
            else:  # ("got" | "raw" | "done" | "failed", fid, ...): a read stream's
                queue = helper.reading.get(message[1])
                if queue is not None:
                    queue.put_nowait(message)
                elif kind == "got":
                    helper.post(("freed", message[2]))
        if helper.alive:
            log.error(
                "KV wire helper %d (pid %d) went (its control connection closed); its streams failed, "
                "later fetches use the others",
                helper.index,
                helper.process.pid,
            )
        helper.alive = False
        metrics.gauge(metrics.KV_WIRE_HELPERS).set(len(self.live()))
        for task in helper.serving.values():
            task.cancel()
        for queue in helper.reading.values():
            queue.put_nowait(("gone", 0))

    async def _serve(self, helper: _Helper, fid: int, request: bytes, stream: ServeStream) -> None:
        try:
            await self.on_join(request, stream)
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # (a bug: the reader gets a status, the worker goes on)
            log.exception("KV wire helper stream failed")
            stream.abort("INTERNAL", f"the prefill worker failed to serve the stream: {exc}")
        finally:
            stream.close()
            helper.serving.pop(fid, None)

    async def close(self) -> None:
        for helper in self.helpers:
            helper.alive = False
            for task in helper.serving.values():
                task.cancel()
            await _stop(helper)
            if helper.control is not None:
                helper.control.cancel()
        self.executor.shutdown(wait=True)
        for helper in self.helpers:
            _release_memory(helper)


async def _spawn(
    index: int,
    slot_bytes: int,
    bind_host: str,
    advertise_host: str,
    tls: TlsFiles | None,
    pin: bool,
    timeout_s: float,
) -> _Helper:
    memory = shared_memory.SharedMemory(create=True, size=2 * RING_SLOTS * slot_bytes)
    ours, theirs = socket.socketpair()
    args = [sys.executable, "-m", "services.worker.kv_wire_helper", "--control-fd", str(theirs.fileno())]
    args += ["--shm", memory.name, "--slots", str(RING_SLOTS), "--slot-bytes", str(slot_bytes)]
    args += ["--bind", bind_host, "--timeout", str(timeout_s)]
    if tls is not None:
        args += ["--tls-cert", tls.cert, "--tls-key", tls.key, "--tls-ca", tls.ca]
    root = str(Path(services.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
    }
    process = subprocess.Popen(args, pass_fds=(theirs.fileno(),), env=env)
    theirs.close()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    try:
        ready = await asyncio.wait_for(read_message(reader), START_TIMEOUT_S)
    except TimeoutError:
        ready = None
    if ready is None or ready[0] != "ready":
        process.kill()
        memory.close()
        memory.unlink()
        raise RuntimeError(f"KV wire helper {index} did not start (exit code {process.poll()})")
    ring = torch.frombuffer(memory.buf, dtype=torch.uint8)  # type: ignore[arg-type]
    helper = _Helper(
        index,
        process,
        reader,
        writer,
        f"{advertise_host}:{ready[1]}",
        memory,
        ring[: RING_SLOTS * slot_bytes],
        asyncio.Queue(),
    )
    for slot in range(RING_SLOTS):
        helper.serve_free.put_nowait(slot)
    if pin and torch.cuda.is_available():
        result = torch.cuda.cudart().cudaHostRegister(ring.data_ptr(), ring.numel(), 0)
        helper.pinned = getattr(result, "value", result) == 0
        if not helper.pinned:
            log.warning(
                "KV wire helper %d: its rings could not be page-locked; device copies are slower", index
            )
    return helper


async def _stop(helper: _Helper) -> None:
    helper.writer.close()  # the helper exits when its control connection closes
    with contextlib.suppress(ConnectionError):
        await helper.writer.wait_closed()
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, helper.process.wait), 5)
    except TimeoutError:
        helper.process.kill()
        await loop.run_in_executor(None, helper.process.wait)


def _release_memory(helper: _Helper) -> None:
    if helper.pinned:
        torch.cuda.cudart().cudaHostUnregister(helper.serve_ring.data_ptr())
    with contextlib.suppress(BufferError):  # (views of it still held: the mapping goes at exit)
        helper.memory.close()
    helper.memory.unlink()


def split_host(address: str) -> str | None:
    """The host of a host:port address (None for unix: addresses, which helpers do not serve)."""
    if address.startswith("unix:"):
        return None
    host = address.rpartition(":")[0]
    return host or None
