"""The host KV tier (--kv-offload-memory) in a T = 2 and a T = 2 x P = 2 group: every rank keeps
its own shard of the evicted blocks in host memory and reloads it when rank 0's prefix lookup hits
the host, and swaps its shard of a preempted sequence out and in, all in rank 0's order
(kv_offload.py, tp_group.py). A prefix evicted to the host comes back as a host hit, the greedy
tokens equal T = 1's (the same host-tier decisions, counter for counter) and transformers', and no
device block or host slot is left held. And the host copies reach the ranks ahead of a block
copy and a KV read too, not only with a forward (tp_host_kv.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from services.worker.engine import GenerateResult
from services.worker.model_config import load_model_config
from services.worker.parallel import ParallelState, shard_layout
from services.worker.request import SamplingParams
from tests.parallel.conftest import GroupRun, start_script
from tests.parallel.tp_generate import host_tier_counters
from tests.worker.worker_testlib import RefModel, prompts_of_lengths

MAX_TOKENS = 8
DEVICE_BLOCKS = 9  # one 128-token sequence (8 blocks of 16) and one more
HOST_BLOCKS = 32
MODEL = "llama_three_layers"  # P = 2: stages of 2 and 1 layers, so the ranks' shards differ


def _rounds(vocab_size: int) -> list[list[list[int]]]:
    """A 70-token conversation so far; four unrelated prompts at once, which push it out of the
    device cache into the host tier and preempt each other (5 blocks each: swapped to the host);
    then the conversation's next turn, whose 4 full history blocks come back from the host."""
    history, *others = prompts_of_lengths([70, 60, 60, 60, 60], vocab_size, seed=3)
    turn = [*history, *prompts_of_lengths([12], vocab_size, seed=4)[0][1:]]
    return [[history], others, [turn]]


def _block_bytes(ref: RefModel, tp: int, pp: int) -> int:
    """Bytes of one block of rank 0's shard (its KV heads, its stage's layers), fp32."""
    cfg = load_model_config(str(ref.path))
    layout = shard_layout(cfg, ParallelState(tp, 0, pp, 0))
    layers = layout.layer_end - layout.layer_start
    return layers * 2 * 16 * layout.num_kv_heads * cfg.head_dim * 4


# T = 1's results and host-tier counters (both groups compare with the same run)
_BASELINE: dict[str, Any] = {}


def _baseline(
    ref: RefModel, rounds: list[list[list[int]]]
) -> tuple[list[GenerateResult], dict[str, int] | None]:
    if not _BASELINE:
        per_block = _block_bytes(ref, 1, 1)
        engine = ref.engine(
            kv_cache_memory=f"{per_block * DEVICE_BLOCKS}B",
            kv_offload_memory=f"{per_block * HOST_BLOCKS}B",
            max_model_len=128,
        )
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        results = [
            r for k, prompts in enumerate(rounds) for r in engine.generate(prompts, params, f"round{k}")
        ]
        assert engine.block_manager.num_used_blocks == 0
        _BASELINE.update(results=results, counters=host_tier_counters(engine))
    return _BASELINE["results"], _BASELINE["counters"]


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (2, 2)])
def test_group_reloads_evicted_prefixes_from_the_host(
    tp_refs: dict[str, RefModel], tp: int, pp: int, tmp_path: Path
) -> None:
    ref = tp_refs[MODEL]
    rounds = _rounds(ref.vocab_size)
    per_block = _block_bytes(ref, tp, pp)
    options = ["--model", str(ref.path), "--device", "cpu", "--cpu-threads", "1", "--max-model-len", "128"]
    options += ["--kv-cache-memory", f"{per_block * DEVICE_BLOCKS}B"]
    options += ["--kv-offload-memory", f"{per_block * HOST_BLOCKS}B"]
    options += ["--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp)]
    group = GroupRun(tmp_path, {"rounds": rounds, "max_tokens": MAX_TOKENS}, *options)
    # T = 1 and transformers while the group runs
    base, base_counters = _baseline(ref, rounds)
    prompts = [prompt for prompts in rounds for prompt in prompts]
    expected = [ref.greedy(prompt, MAX_TOKENS) for prompt in prompts]
    got = group.result()

    counters = got["host_tier"]
    assert counters is not None and base_counters is not None
    # the history went to the host and came back: its 4 full blocks, reloaded on every rank
    assert counters["saved"] > 0 and counters["loaded"] >= 4 and got["cached_tokens"][-1] == 64
    assert counters["swapped_out"] > 0  # the four at once preempted each other (swapped shards)
    assert counters == base_counters  # the same decisions as T = 1 (same block counts)
    for i, (prompt, result) in enumerate(zip(prompts, base, strict=True)):
        assert result.token_ids[0] == expected[i]  # T = 1
        assert got["tokens"][i]["0"] == expected[i], f"T={tp} P={pp}: prompt {i} of {len(prompt)}"
    assert got["used_blocks"] == 0 and counters["held"] == 0


def test_host_copies_reach_the_ranks_before_a_block_copy_and_a_kv_read(
    tp_refs: dict[str, RefModel], tmp_path: Path
) -> None:
    """tests/parallel/tp_host_kv.py: in a T = 2 group, a prefix block evicted to the host and at
    once overwritten by a block copy, then reloaded from the host, reads back (every rank's heads,
    through ReadKV) as it was written: the pending host copies went ahead of the CopyBlocks and the
    ReadKV commands, in rank 0's order."""
    ref = tp_refs["llama_gqa"]
    out = tmp_path / "out.json"
    options = ["--model", str(ref.path), "--device", "cpu", "--cpu-threads", "1", "--max-model-len", "32"]
    options += ["--kv-cache-memory", "1MiB", "--tensor-parallel-size", "2"]
    log = tmp_path / "group.log"
    proc = start_script("tp_host_kv.py", [str(out), "--", *options], log)
    try:
        proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
    assert json.loads(out.read_text()) == {"hits": 2, "saved": 2, "loaded": 2, "equal": True}
