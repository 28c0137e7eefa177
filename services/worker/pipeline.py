"""Pipeline parallelism: one step's batch as micro-batches flowing through the stages.

A step's sequences are split into up to P micro-batches (contiguous runs of sequences, about equal
in tokens; every rank splits the same step the same way). Each stage runs its layers on one
micro-batch after the other and sends each result on as soon as it is done, without waiting, so
stage k+1 computes micro-batch i while stage k computes micro-batch i+1:

    time ->        t0        t1        t2        t3
    stage 0      [mb 0]    [mb 1]              (norm)   <- receives mb 0, mb 1 back from stage 1
    stage 1                [mb 0]    [mb 1]

Stage 0 embeds each micro-batch's tokens; the last stage sends its outputs back to stage 0, which
applies the final norm to each and returns the step's hidden states in the batch's order (the LM
head and sampling follow on rank 0 as before). The micro-batches of one step share nothing but the
KV cache, where each writes its own sequences' slots. This fills the pipeline within a step: with
P micro-batches a stage idles (P - 1) / (2P - 1) of the step instead of (P - 1) / P.

Batches in flight (--pipeline-batches, by default P; vLLM's virtual engines, SGLang's
`event_loop_pp`): the engine keeps up to P batches of different steps, each of other requests, in
the pipeline (engine.py `_step_pipelined`), so it never drains between steps:

    time ->        t0          t1          t2
    stage 0      [batch A]   [batch B]   [batch A']    A' = A's requests' next step, scheduled
    stage 1                  [batch A]   [batch B]     once A came back and was sampled

Each batch is then one micro-batch. `start_stage` runs a stage's layers over a batch and sends it
on; its `StageForward.finish()` (stage 0: the batch back from the last stage, normed) comes once
the batches started after it are in the pipeline too.

`StageTrace` (--pipeline-trace DIR) records when each stage starts and ends each micro-batch, on
the host clock every process of a machine shares, so a test can see stages overlap.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from services.worker import parallel
from services.worker.layers.attention import AttentionMetadata
from services.worker.parallel import ShardLayout


@dataclass(frozen=True)
class MicroBatch:
    """Sequences [seq_start, seq_end) of a step, its tokens [token_start, token_end)."""

    seq_start: int
    seq_end: int
    token_start: int
    token_end: int
    meta: AttentionMetadata

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start


def split_sequences(cu_seqlens: list[int], num: int) -> list[tuple[int, int]]:
    """Up to `num` contiguous, non-empty runs [s0, s1) of the batch's sequences, cut where the
    running token count passes each equal share of the step's tokens."""
    num_seqs = len(cu_seqlens) - 1
    num = max(1, min(num, num_seqs))
    total = cu_seqlens[-1]
    cuts = [0]
    for k in range(1, num):
        # the first sequence end at or past k/num of the tokens, leaving every later run one sequence
        target = total * k / num
        s = cuts[-1] + 1
        while s < num_seqs - (num - k) and cu_seqlens[s] < target:
            s += 1
        cuts.append(s)
    cuts.append(num_seqs)
    return list(itertools.pairwise(cuts))


def micro_batches(meta: AttentionMetadata, num: int) -> list[MicroBatch]:
    """The step described by `meta` as up to `num` micro-batches, each with its own metadata."""
    cu = [int(x) for x in meta.cu_seqlens_q.tolist()]
    out = []
    for s0, s1 in split_sequences(cu, num):
        t0, t1 = cu[s0], cu[s1]
        part = replace(
            meta,
            positions=meta.positions[t0:t1],
            slot_mapping=meta.slot_mapping[t0:t1],
            block_tables=meta.block_tables[s0:s1],
            cu_seqlens_q=meta.cu_seqlens_q[s0 : s1 + 1] - t0,
            seq_lens=meta.seq_lens[s0:s1],
            max_seqlen_q=max(cu[i + 1] - cu[i] for i in range(s0, s1)),
            # the leading decodes [0, k) of the step: those of this run lead it too
            num_decode_rows=max(0, min(meta.num_decode_rows, s1) - s0),
        )
        out.append(MicroBatch(s0, s1, t0, t1, part))
    return out


class StageTrace:
    """Appends one JSON line per micro-batch to DIR/stage-trace-rank{R}.jsonl: the forward's
    number on this rank, the micro-batch, the stage, and time.monotonic() at its start and end."""

    def __init__(self, folder: str, rank: int, stage: int) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.path = os.path.join(folder, f"stage-trace-rank{rank}.jsonl")
        self.rank, self.stage = rank, stage
        self.step = -1

    def next_step(self) -> None:
        self.step += 1

    def record(self, micro_batch: int, event: str, start: float, end: float, step: int | None = None) -> None:
        """`step`: the forward's number when it is not the latest started (a batch in flight)."""
        line = {
            "rank": self.rank,
            "stage": self.stage,
            "step": self.step if step is None else step,
            "micro_batch": micro_batch,
            "event": event,
            "start": start,
            "end": end,
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


Layers = Callable[[torch.Tensor, torch.Tensor | None, AttentionMetadata], tuple[torch.Tensor, torch.Tensor]]


class StageForward:
    """This stage's part of one batch, started: its layers ran over each micro-batch and the
    results are on their way to the next stage. `finish()` waits for those sends and, on stage 0,
    receives the batch back from the last stage and returns its normed hidden states [T, hidden]
    (the other stages return an empty tensor). Between the two, this stage may start the next
    batch (batches in flight, `start_stage`)."""

    def __init__(
        self,
        parts: list[MicroBatch],
        sends: list[parallel.PendingSend],
        layout: ShardLayout,
        hidden_like: torch.Tensor,
        final_norm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        tag: int,
        trace: StageTrace | None,
    ) -> None:
        self.parts, self.sends, self.layout = parts, sends, layout
        self.hidden_like, self.final_norm, self.tag, self.trace = hidden_like, final_norm, tag, trace
        self.step = trace.step if trace is not None else -1

    def finish(self) -> torch.Tensor:
        width = self.hidden_like.shape[0]
        if not self.layout.first_stage:
            for send in self.sends:
                send.wait()
            return self.hidden_like.new_empty(0, width)
        last = self.layout.pp_size - 1
        normed = []
        for i, mb in enumerate(self.parts):
            like = self.hidden_like.new_empty(mb.num_tokens, width)
            start = time.monotonic()
            hidden, residual = parallel.recv_from_stage(last, like, like, tag=self.tag + i)
            if self.trace is not None:  # when this micro-batch came back through every stage
                self.trace.record(i, "returned", start, time.monotonic(), step=self.step)
            normed.append(self.final_norm(hidden, residual))
        for send in self.sends:
            send.wait()
        return normed[0] if len(normed) == 1 else torch.cat(normed)


def start_stage(
    layout: ShardLayout,
    input_ids: torch.Tensor,  # [T] the batch's tokens
    meta: AttentionMetadata,
    hidden_like: torch.Tensor,  # a [hidden] tensor of the activations' dtype and device
    embed: Callable[[torch.Tensor], torch.Tensor],
    layers: Layers,  # this stage's layers: (hidden, residual, meta) -> (hidden, residual)
    final_norm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    trace: StageTrace | None = None,
    select_rows: Callable[[int, int], None] | None = None,
    batch: int = 0,
    in_flight: int = 1,
) -> StageForward:
    """This stage's layers over one batch's micro-batches, in order, between a receive from the
    stage before (stage 0: the embedding) and a send to the stage after (the last stage: back to
    stage 0); nothing waits for a send. `select_rows(t0, t1)`, when given, is called before a
    micro-batch's layers with its token range (the LoRA mapping follows the micro-batch's rows).

    `in_flight`: how many batches of different steps the group keeps in the pipeline at once
    (--pipeline-batches). With one, the batch is split into P micro-batches that fill the pipeline
    within the step; with more, each batch is one micro-batch (the other batches fill the
    pipeline), and `batch` (this rank's count of batches started, the same on every rank) keeps
    the messages of the batches in flight apart by tag."""
    stage, num_stages = layout.pp_rank, layout.pp_size
    parts = micro_batches(meta, num_stages if in_flight == 1 else 1)
    tag = (batch % in_flight) * num_stages
    sends: list[parallel.PendingSend] = []
    if trace is not None:
        trace.next_step()
    for i, mb in enumerate(parts):
        if stage == 0:
            hidden, residual = embed(input_ids[mb.token_start : mb.token_end]), None
        else:
            like = hidden_like.new_empty(mb.num_tokens, hidden_like.shape[0])
            hidden, residual = parallel.recv_from_stage(stage - 1, like, like, tag=tag + i)
        if select_rows is not None:
            select_rows(mb.token_start, mb.token_end)
        start = time.monotonic()
        hidden, residual = layers(hidden, residual, mb.meta)
        end = time.monotonic()
        # not waited for: this stage goes on with the next micro-batch (or batch) while the next
        # stage computes this one
        sends += parallel.isend_to_stage((stage + 1) % num_stages, hidden, residual, tag=tag + i)
        if trace is not None:
            trace.record(i, "layers", start, end)
    return StageForward(parts, sends, layout, hidden_like, final_norm, tag, trace)
