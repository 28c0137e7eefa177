"""Pipeline parallelism with micro-batches, one step at a time (--pipeline-batches 1,
services/worker/pipeline.py): a step's sequences split into P runs of about equal tokens, each
with its own attention metadata; T = 1 x P = 2 greedy tokens equal T = P = 1 and transformers with
8 requests in flight, chunked prefill and preemption; and the stages' own timestamps show stage 1
computing micro-batch 0 while stage 0 computes micro-batch 1. (Batches of different steps in
flight, the default: test_pipeline_batches.py.)"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from services.worker.layers.attention import AttentionMetadata
from services.worker.model_runner import leading_single_tokens
from services.worker.pipeline import micro_batches, split_sequences
from services.worker.request import SamplingParams
from tests.parallel.conftest import run_group
from tests.worker.worker_testlib import TINY, RefModel, prompts_of_lengths

LENGTHS = [1, 3, 7, 12, 17, 29, 40, 5]  # 8 requests in flight; the long ones are chunked (budget 16)
MAX_TOKENS = 10


def test_sequences_split_into_contiguous_runs_of_about_equal_tokens() -> None:
    assert split_sequences([0, 1, 2, 3, 4], 2) == [(0, 2), (2, 4)]  # four decodes
    assert split_sequences([0, 1, 2, 3, 19], 2) == [(0, 3), (3, 4)]  # three decodes + a 16-token chunk
    assert split_sequences([0, 16, 17, 18], 2) == [(0, 1), (1, 3)]
    assert split_sequences([0, 5], 4) == [(0, 1)]  # one sequence: one micro-batch
    assert split_sequences([0, 1, 2, 3], 3) == [(0, 1), (1, 2), (2, 3)]
    assert split_sequences([0, 10, 11, 12, 13], 3) == [(0, 1), (1, 2), (2, 4)]  # never an empty run


def test_micro_batch_metadata_is_the_step_sliced() -> None:
    cu = [0, 1, 2, 3, 11, 15]  # three decodes, then chunks of 8 and 4 tokens
    meta = AttentionMetadata(
        positions=torch.arange(15),
        slot_mapping=torch.arange(100, 115),
        block_tables=torch.arange(10, dtype=torch.int32).view(5, 2),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor([5, 6, 7, 8, 20], dtype=torch.int32),
        max_seqlen_q=8,
        cos_sin_cache=torch.zeros(4, 2),
        num_decode_rows=leading_single_tokens(cu),
    )
    first, second = micro_batches(meta, 2)
    assert (first.seq_start, first.seq_end, first.token_start, first.token_end) == (0, 4, 0, 11)
    assert first.meta.cu_seqlens_q.tolist() == [0, 1, 2, 3, 11] and first.meta.num_decode_rows == 3
    assert first.meta.max_seqlen_q == 8 and first.meta.block_tables.tolist() == meta.block_tables[:4].tolist()
    assert second.meta.cu_seqlens_q.tolist() == [0, 4] and second.meta.num_decode_rows == 0
    assert second.meta.positions.tolist() == list(range(11, 15))
    assert second.meta.slot_mapping.tolist() == list(range(111, 115))
    assert second.meta.seq_lens.tolist() == [20] and second.meta.max_seqlen_q == 4


def _options(ref: RefModel, kv_cache_memory: str, *extra: str) -> list[str]:
    return [
        "--model", str(ref.path), "--device", "cpu", "--cpu-threads", "1",
        "--kv-cache-memory", kv_cache_memory, "--max-num-batched-tokens", "16", "--max-model-len", "64",
        "--pipeline-parallel-size", "2", "--pipeline-batches", "1", *extra,
    ]  # fmt: skip


def test_p2_micro_batches_equal_t1_and_transformers_under_preemption(
    tp_refs: dict[str, RefModel], tmp_path: Path
) -> None:
    """A 10-block cache for 8 requests of up to 50 tokens (4 blocks each): sequences are preempted
    and recomputed, prompts chunked, and every step of two or more sequences runs as 2 micro-batches."""
    ref = tp_refs["llama_gqa"]  # 2 layers: one per stage; a stage's block is half the T = 1 block
    prompts = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=3)
    got = run_group(
        tmp_path, {"prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": 3}, *_options(ref, "40KiB")
    )
    single = ref.engine(kv_cache_memory="80KiB", max_num_batched_tokens=16, max_model_len=64)
    base = single.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=3))
    assert got["num_preemptions"] > 0 and single.scheduler.num_preemptions > 0
    assert got["used_blocks"] == 0
    for i, (prompt, result) in enumerate(zip(prompts, base, strict=True)):
        expected = ref.greedy(prompt, MAX_TOKENS)
        assert result.token_ids[0] == expected
        assert got["tokens"][i]["0"] == expected, f"prompt of {len(prompt)}"
        ours, theirs = got["logprobs"][i], [lp.logprob for lp in result.logprobs[0]]
        assert max((abs(a - b) for a, b in zip(ours, theirs, strict=True)), default=0.0) < 1e-4


def _trace(folder: Path) -> dict[tuple[int, int, str, int], dict[str, Any]]:
    """(stage, step, event, micro-batch) -> the record, from every rank's trace file."""
    records = {}
    for path in folder.glob("stage-trace-rank*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            records[(r["stage"], r["step"], r["event"], r["micro_batch"])] = r
    return records


def _wide_llama(path: Path) -> Path:
    """Two layers wide enough (hidden 512) that a micro-batch's layer takes milliseconds on the
    CPU, longer than handing a micro-batch to the next stage."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "hidden_size": 512, "intermediate_size": 2048}, num_hidden_layers=2)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


def test_stages_overlap_on_consecutive_micro_batches(tmp_path: Path) -> None:
    """Every step of several sequences runs as 2 micro-batches; stage 0 starts micro-batch 1 before
    micro-batch 0 came back from stage 1 (the schedule), and stage 1's interval on micro-batch 0
    and stage 0's on micro-batch 1 intersect on the host clock (the two processes computed at
    once) in most such steps."""
    model = _wide_llama(tmp_path / "model")
    prompts = prompts_of_lengths(LENGTHS, TINY["vocab_size"], seed=5)
    trace = tmp_path / "trace"
    options = ["--model", str(model), "--device", "cpu", "--cpu-threads", "1", "--kv-cache-memory", "4MiB"]
    options += [
        "--max-num-batched-tokens",
        "16",
        "--pipeline-parallel-size",
        "2",
        "--pipeline-batches",
        "1",
        "--pipeline-trace",
        str(trace),
    ]
    run_group(tmp_path, {"prompts": prompts, "max_tokens": 16}, *options)
    records = _trace(trace)
    steps: dict[int, set[int]] = defaultdict(set)
    for stage, step, event, mb in records:
        if stage == 0 and event == "layers":
            steps[step].add(mb)
    pipelined = [s for s, mbs in steps.items() if mbs == {0, 1}]
    assert len(pipelined) >= 10, dict(steps)  # 8 requests, 16 tokens each: most steps hold several
    overlapping = 0
    for step in pipelined:
        s0_mb1 = records[(0, step, "layers", 1)]
        s1_mb0 = records[(1, step, "layers", 0)]
        returned0 = records[(0, step, "returned", 0)]
        assert s0_mb1["start"] < returned0["end"]  # stage 0 did not wait for micro-batch 0 to return
        assert s1_mb0["end"] <= returned0["end"]  # (the clock is the same in both processes)
        if s1_mb0["start"] < s0_mb1["end"] and s0_mb1["start"] < s1_mb0["end"]:
            overlapping += 1
    print(f"{overlapping} of {len(pipelined)} pipelined steps overlapped")
    # (a step misses it when stage 1 wakes up late on a busy machine; most steps do not)
    assert overlapping >= max(1, len(pipelined) // 8), f"{overlapping} of {len(pipelined)} steps overlapped"
