"""A wire helper process: moves a parallel gRPC KV fetch's further streams through grpcio in a
process of its own, so that one fetch's bytes cross grpcio in several processes a side (one
grpcio process per side has a ceiling that several processes a side go past: docs/disaggregation.md).

    prefill worker P                P's helper                   D's helper              decode worker D
    reads a chunk into a slot  ──▶  FetchKV(stream_index i):  ── KVChunk bytes ──▶  copies the data  ──▶  writes it
    of its serve ring               the slot spliced into the                       into a slot of its     into the cache,
                               ◀──  wire bytes, slot freed                          receive ring           slot freed  ──▶

It holds no model and no torch: a grpc.aio server for the further streams P serves, grpc.aio
channels for the streams D reads, two rings of fixed-size slots in shared memory (the serve ring
written by its worker, the receive ring by the helper; the reader frees a slot with a message),
and a control connection to its worker (a socket pair; the helper exits when it closes). The
worker keeps every decision (which fetch, which blocks, whether a chunk fits its reservation):
the helper only relays bytes and reports how a stream ended.

Control messages, each a pickled tuple behind a 4-byte length (`frame` / `read_message`):
    helper -> worker   ("ready", port)                       serving on `port`
                       ("join", fid, request)                P: a further stream came (serialized
                                                             FetchKVRequest; fid named by the helper)
                       ("free", slot)                        P: a serve slot was sent
                       ("cancel", fid)                       P: the stream ended on the reader's side
                       ("got", fid, slot, nbytes, header)    D: a chunk's data in a receive slot,
                                                             its other fields as a KVChunk
                       ("raw", fid, raw)                     D: a message without data
                       ("done", fid) / ("failed", fid, code, details)   D: the stream ended
    worker -> helper   ("chunk", fid, slot, nbytes, head, tail)  P: send the slot's bytes as a KVChunk
                       ("keepalive", fid) / ("end", fid) / ("abort", fid, code, details)
                       ("read", fid, address, request)       D: open a stream (fid named by the worker)
                       ("stop", fid)                         D: close it
                       ("freed", slot)                       D: a receive slot was written
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import pickle
import socket
import struct
import sys
from collections.abc import AsyncIterator
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import grpc

from services.common.channels import make_channel
from services.common.server import GRPC_OPTIONS
from services.common.tls import TlsFiles
from services.worker import kv_wire
from tandem.v1 import worker_pb2

log = logging.getLogger("tandem.worker.wire_helper")

FETCH_KV_METHOD = "/tandem.v1.Worker/FetchKV"
SERVICE_NAME = "tandem.v1.Worker"
KEEP_ALIVE_BYTES = worker_pb2.KVChunk().SerializeToString()
_LENGTH = struct.Struct(">I")


# ---- shared by the worker's side (kv_wire_helpers.py) --------------------------------------------


def frame(message: tuple[Any, ...]) -> bytes:
    """A control message's bytes on the connection."""
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(body)) + body


async def read_message(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next control message; None when the other side closed the connection."""
    try:
        size = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))[0]
        message = pickle.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    assert isinstance(message, tuple)
    return message


def ring_offset(ring: int, slot: int, slots: int, slot_bytes: int) -> int:
    """Byte offset of `slot` of ring 0 (serve) or 1 (receive) in a helper's shared memory."""
    return (ring * slots + slot) * slot_bytes


# ---- the helper process ----------------------------------------------------------------------


class Helper:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        memory: memoryview,
        slots: int,
        slot_bytes: int,
        credentials: grpc.ChannelCredentials | None,
        timeout_s: float,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.memory, self.slots, self.slot_bytes = memory, slots, slot_bytes
        self.credentials = credentials
        self.timeout_s = timeout_s
        self._fids = itertools.count(1)
        self.serving: dict[int, asyncio.Queue[tuple[Any, ...]]] = {}
        self.reading: dict[int, asyncio.Task[None]] = {}
        self.free_slots: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(slots):
            self.free_slots.put_nowait(slot)
        self.channels: dict[str, grpc.aio.Channel] = {}

    def view(self, ring: int, slot: int, nbytes: int) -> memoryview:
        start = ring_offset(ring, slot, self.slots, self.slot_bytes)
        return self.memory[start : start + nbytes]

    def send(self, message: tuple[Any, ...]) -> None:
        """A control message to the worker, written at once (small; the worker always reads):
        no await between taking a slot and reporting it, so a cancelled read leaks none."""
        if not self.writer.is_closing():
            self.writer.write(frame(message))

    # P: the further streams this helper serves
    async def fetch_kv(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        if not worker_pb2.FetchKVRequest.FromString(request).stream_index:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "stream_index: this address serves only a parallel fetch's further streams (>= 1); "
                "open the fetch on the worker's own address",
            )
        fid = next(self._fids)
        queue: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.serving[fid] = queue
        ended = False
        try:
            self.send(("join", fid, request))
            while True:
                message = await queue.get()
                kind = message[0]
                if kind == "chunk":
                    _, _, slot, nbytes, head, tail = message
                    raw = kv_wire.encode_parts(head, tail, self.view(0, slot, nbytes))
                    self.send(("free", slot))
                    yield raw
                elif kind == "keepalive":
                    yield KEEP_ALIVE_BYTES
                elif kind == "end":
                    ended = True
                    return
                else:  # ("abort", fid, code, details)
                    ended = True
                    await context.abort(getattr(grpc.StatusCode, message[2]), message[3])
        finally:
            del self.serving[fid]
            while not queue.empty():  # chunks never sent: their slots go back
                message = queue.get_nowait()
                if message[0] == "chunk":
                    self.send(("free", message[2]))
            if not ended:
                self.send(("cancel", fid))

    # D: the further streams this helper reads
    async def read(self, fid: int, address: str, request: bytes) -> None:
        channel = self.channels.get(address)
        if channel is None:  # (a connection of its own per prefill worker)
            channel = make_channel(address, self.credentials, options=[("grpc.use_local_subchannel_pool", 1)])
            self.channels[address] = channel
        call = channel.unary_stream(FETCH_KV_METHOD)(request, timeout=self.timeout_s)
        try:
            async for raw in call:
                assert isinstance(raw, bytes)
                wire = kv_wire.decode_chunk(raw)
                nbytes = len(wire.data)
                if not nbytes:
                    self.send(("raw", fid, raw))
                    continue
                if nbytes > self.slot_bytes:
                    self.send(
                        (
                            "failed",
                            fid,
                            "INVALID_ARGUMENT",
                            f"a {nbytes}-byte chunk exceeds the helper's slots",
                        )
                    )
                    return
                slot = await self.free_slots.get()
                self.view(1, slot, nbytes)[:] = wire.data
                self.send(("got", fid, slot, nbytes, wire.header.SerializeToString()))
            self.send(("done", fid))
        except grpc.aio.AioRpcError as exc:
            self.send(("failed", fid, exc.code().name, exc.details() or ""))
        finally:
            call.cancel()
            self.reading.pop(fid, None)

    async def control(self) -> None:
        """The worker's messages, until it closes the connection."""
        while (message := await read_message(self.reader)) is not None:
            kind = message[0]
            if kind in ("chunk", "keepalive", "end", "abort"):
                queue = self.serving.get(message[1])
                if queue is not None:
                    queue.put_nowait(message)
                elif kind == "chunk":  # the stream went meanwhile: its slot goes back unsent
                    self.send(("free", message[2]))
            elif kind == "read":
                _, fid, address, request = message
                self.reading[fid] = asyncio.ensure_future(self.read(fid, address, request))
            elif kind == "stop":
                task = self.reading.pop(message[1], None)
                if task is not None:
                    task.cancel()
            elif kind == "freed":
                self.free_slots.put_nowait(message[1])


async def _serve(args: argparse.Namespace) -> None:
    sock = socket.socket(fileno=args.control_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    memory = shared_memory.SharedMemory(name=args.shm)
    # The worker owns the segment: it unlinks it; this process must not on exit.
    resource_tracker.unregister(memory._name, "shared_memory")  # type: ignore[attr-defined]
    tls = TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_ca)
    buffer = memory.buf
    assert buffer is not None
    helper = Helper(
        reader,
        writer,
        buffer,
        args.slots,
        args.slot_bytes,
        tls.channel_credentials() if tls is not None else None,
        args.timeout,
    )
    server = grpc.aio.server(options=list(GRPC_OPTIONS))
    handler = grpc.unary_stream_rpc_method_handler(helper.fetch_kv)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"FetchKV": handler}),)
    )
    address = f"{args.bind}:0"
    port = (
        server.add_secure_port(address, tls.server_credentials())
        if tls
        else server.add_insecure_port(address)
    )
    await server.start()
    try:
        helper.send(("ready", port))
        await helper.control()  # returns when the worker goes
    finally:
        for task in list(helper.reading.values()):
            task.cancel()
        await server.stop(0)
        for channel in helper.channels.values():
            await channel.close()
        del helper
        with contextlib.suppress(BufferError):  # (a view still held: the process ends anyway)
            memory.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem worker's wire helper", description=__doc__)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--shm", required=True)
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--slot-bytes", type=int, required=True)
    parser.add_argument("--bind", required=True, help="host to serve further streams on (a free port)")
    parser.add_argument("--timeout", type=float, default=60.0, help="a read stream's deadline, seconds")
    parser.add_argument("--tls-cert", default="")
    parser.add_argument("--tls-key", default="")
    parser.add_argument("--tls-ca", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
