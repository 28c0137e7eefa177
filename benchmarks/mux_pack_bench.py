"""The event-loop cost of one engine step's outputs on a GenerateMany stream, with single-token
chunks packed (GenerateManyResponse.token_sessions / token_ids) and without. CPU only, no network:
the real code on both sides, driven directly. Forms:

- packed: the caller set accepts_packed_tokens (the gateway does);
- answers: it did not (an older caller): every chunk a session answer, after the check that
  found it could not go packed;
- before: every chunk a session answer as `take` sent it before packing existed
  (`SessionContext.emit` of `fill_output_pb`, no check).

Sides:

- worker: S sessions of a real services/worker/generate_mux.GenerateMux each get one mid-stream
  output of one token through rpc.py's `emit_output` (what the engine step's callback, `take`,
  runs per session after its checks), then the writer's `_take_pending` makes the message;
  `serialize` is its SerializeToString (grpc's write does that).
- gateway: that message parsed (FromString, as grpc does) and handed to S sessions of a real
  gateway/generate_mux.GenerateMux (`_receive`), each chunk then converted as clients.py's
  `generate` does (`_generate_chunk` for a protobuf chunk; a packed token is one already).

    python benchmarks/mux_pack_bench.py --out benchmarks/results/mux_pack.json

Prints a table (microseconds, median of --repeats timings of --calls steps) and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import platform
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.host_timing import median_us
from gateway.clients import _generate_chunk
from gateway.downstream import GenerateChunk
from gateway.generate_mux import GenerateMux as GatewayMux
from gateway.session_mux import MuxCounts
from services.worker.generate_mux import GenerateMux as WorkerMux
from services.worker.generate_mux import SessionContext
from services.worker.outputs import ChoiceOutput, RequestOutput
from services.worker.rpc import emit_output, fill_output_pb
from tandem.v1 import worker_pb2

SESSIONS = (1, 8, 64)
FORMS = ("before", "answers", "packed")


async def _worker_mux(num_sessions: int, packed: bool) -> tuple[WorkerMux, list[SessionContext], Any]:
    """A worker mux whose sessions 1..num_sessions are open (their bodies parked, as a session's
    task is while the step's callback sends its chunks); their contexts, in session order."""
    contexts: list[SessionContext] = []
    forever = asyncio.Event()

    async def generate(
        request: worker_pb2.GenerateRequest, context: SessionContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        contexts.append(context)
        await forever.wait()
        yield worker_pb2.GenerateResponse()

    async def write(message: worker_pb2.GenerateManyResponse) -> None:
        pass

    async def requests() -> AsyncIterator[worker_pb2.GenerateManyRequest]:
        starts = [
            worker_pb2.GenerateSessionRequest(
                session_id=sid,
                start=worker_pb2.GenerateSessionStart(
                    request=worker_pb2.GenerateRequest(request_id=f"chat-{sid:032x}", prompt_token_ids=[1])
                ),
            )
            for sid in range(1, num_sessions + 1)
        ]
        yield worker_pb2.GenerateManyRequest(requests=starts, accepts_packed_tokens=packed)
        await forever.wait()

    mux = WorkerMux(generate, write)
    reader = asyncio.create_task(mux._read(requests()))
    while len(contexts) < num_sessions:
        await asyncio.sleep(0)
    return mux, contexts, reader


class _Call:
    """A GenerateMany call that takes what is written and answers nothing until it is cancelled
    (`_receive` is driven directly)."""

    def __init__(self) -> None:
        self._cancelled = asyncio.Event()

    async def write(self, message: Any) -> None:
        pass

    async def done_writing(self) -> None:
        pass

    def cancel(self) -> None:
        self._cancelled.set()

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> Any:
        await self._cancelled.wait()
        raise StopAsyncIteration


class _Stub:
    def GenerateMany(self) -> _Call:
        return _Call()


async def _case(num_sessions: int, form: str, calls: int, repeats: int) -> dict[str, Any]:
    packed = form == "packed"
    mux, contexts, reader = await _worker_mux(num_sessions, packed)
    outputs = [
        RequestOutput(f"chat-{sid:032x}", (ChoiceOutput(0, (100 + sid,), None),))
        for sid in range(1, num_sessions + 1)
    ]

    def worker_step() -> worker_pb2.GenerateManyResponse:
        if form == "before":
            for context, out in zip(contexts, outputs, strict=True):
                context.emit(functools.partial(fill_output_pb, out=out))
        else:
            for context, out in zip(contexts, outputs, strict=True):
                emit_output(context, out, 0)
        return mux._take_pending()

    message = worker_step()
    assert len(message.token_ids) == (num_sessions if packed else 0)
    data = message.SerializeToString()

    gateway = GatewayMux(_Stub(), MuxCounts())  # type: ignore[arg-type]
    items: list[Any] = []
    for _ in range(num_sessions):  # session ids 1..num_sessions, as the worker's
        gateway.open(worker_pb2.GenerateRequest(first_choice_index=0), None).forward(items.append)

    def gateway_step() -> list[GenerateChunk]:
        gateway._receive(worker_pb2.GenerateManyResponse.FromString(data))
        chunks = [r if isinstance(r, GenerateChunk) else _generate_chunk(r) for r in items]
        items.clear()
        return chunks

    chunks = gateway_step()
    assert [c.choices[0].token_ids for c in chunks] == [(100 + sid,) for sid in range(1, num_sessions + 1)]
    worker_us = median_us(worker_step, calls, repeats)
    serialize_us = median_us(message.SerializeToString, calls, repeats)
    gateway_us = median_us(gateway_step, calls, repeats)
    reader.cancel()
    mux.close()
    await gateway.close()
    return {
        "sessions": num_sessions,
        "form": form,
        "worker_us_per_step": round(worker_us, 2),
        "worker_us_per_session": round(worker_us / num_sessions, 3),
        "serialize_us_per_step": round(serialize_us, 2),
        "message_bytes": len(data),
        "gateway_us_per_step": round(gateway_us, 2),
        "gateway_us_per_session": round(gateway_us / num_sessions, 3),
    }


async def run(calls: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for num_sessions in SESSIONS:
        for form in FORMS:
            rows.append(await _case(num_sessions, form, calls, repeats))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/mux_pack.json"))
    args = ap.parse_args()
    # (closing the stand-in streams fails their sessions, as meant: no warning for it)
    logging.getLogger("gateway.session_mux").setLevel(logging.ERROR)
    rows = asyncio.run(run(args.calls, args.repeats))
    head = (
        "S",
        "form",
        "worker us/step",
        "us/session",
        "serialize us",
        "bytes",
        "gateway us/step",
        "us/session",
    )
    print(
        f"{head[0]:>3} {head[1]:<8} {head[2]:>15} {head[3]:>11} {head[4]:>13} {head[5]:>6} {head[6]:>16} {head[7]:>11}"
    )
    for r in rows:
        print(
            f"{r['sessions']:>3} {r['form']:<8} {r['worker_us_per_step']:>15.2f} {r['worker_us_per_session']:>11.3f}"
            f" {r['serialize_us_per_step']:>13.2f} {r['message_bytes']:>6} {r['gateway_us_per_step']:>16.2f}"
            f" {r['gateway_us_per_session']:>11.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "machine": platform.processor() or platform.machine()}
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
