"""CUDA graphs of speculative decoding's forwards (services/worker/speculative/verify_graph.py), the
parts that run on the CPU: the ladder of (batch, query rows) sizes, the choice of a graph for a
step, the packing of a step into the graphs' fixed buffers with its padding, and — through
uncaptured runners, which compute the very padded inputs a graph reads with an eager forward —
greedy output token-identical to decoding without speculation for every proposer, with the
verification, the draft model's catch-up and the EAGLE head's forwards all on the padded path.
The capture itself is checked on a GPU: tests/worker/test_speculative_gpu.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_speculative import assert_same, requests, small_engine
from worker_testlib import RefModel, run_to_completion

from services.worker.engine import Engine
from services.worker.speculative.verify_graph import (
    VERIFY_GRAPH_MAX_SEQS,
    PackLayout,
    VerifyGraphRunner,
    pack_step,
    pick_graph,
    query_rows_ladder,
    verify_graph_sizes,
)


def test_query_rows_cover_every_draft_length() -> None:
    assert query_rows_ladder(1) == [2]
    assert query_rows_ladder(4) == [2, 3, 5]
    assert query_rows_ladder(6) == [2, 3, 5, 7]
    assert query_rows_ladder(16) == [2, 3, 5, 9, 17]
    for max_k in range(1, 17):  # every K the adaptive rule may choose has a graph
        ladder = query_rows_ladder(max_k)
        assert max(ladder) == max_k + 1
        assert all(any(q >= k + 1 for q in ladder) for k in range(1, max_k + 1))


def test_graph_sizes_and_the_choice_of_a_graph() -> None:
    sizes = verify_graph_sizes(max_num_seqs=256, max_k=4, max_num_tokens=2048)
    assert {bs for bs, _ in sizes} == {1, 2, 4, 8, 16, 24, 32}
    assert max(bs for bs, _ in sizes) == VERIFY_GRAPH_MAX_SEQS
    assert {q for _, q in sizes} == {2, 3, 5}
    assert verify_graph_sizes(3, 2, 0) == [(1, 2), (1, 3), (2, 2), (2, 3), (3, 2), (3, 3)]
    # at most max_num_tokens rows a graph (a step never has more tokens)
    assert all(bs * q <= 20 for bs, q in verify_graph_sizes(64, 4, 20))
    assert verify_graph_sizes(8, 0, 100) == []
    # the fewest rows that hold the step
    assert pick_graph(sizes, 1, 5) == (1, 5)
    assert pick_graph(sizes, 3, 4) == (4, 5)  # K = 3 pads up to the K = 4 graph
    assert pick_graph(sizes, 3, 2) == (4, 2)
    assert pick_graph(sizes, 9, 3) == (16, 3)
    assert pick_graph(sizes, 33, 2) is None  # larger batches run eagerly
    assert pick_graph(sizes, 2, 6) is None  # more rows than any K
    assert pick_graph([(4, 2), (2, 3)], 2, 2) == (2, 3)  # 6 rows beat 8


def test_pack_step_pads_rows_and_sequences() -> None:
    layout = PackLayout(max_tokens=20, max_seqs=4, max_blocks=3)
    stage = torch.full((layout.length,), 99, dtype=torch.int32)
    # two sequences: a drafted one (1 + 3 rows) and a plain decode (1 row), into graph (4, 5)
    tables = torch.tensor([[7, 8], [9, 0]], dtype=torch.int32)
    end = pack_step(
        stage,
        layout,
        4,
        5,
        [11, 12, 13, 14, 15],
        [30, 31, 32, 33, 17],
        [5, 6, 7, 8, 40],
        [0, 4, 5],
        [34, 18],
        tables,
    )
    rows = 20
    assert stage[:rows].tolist() == [11, 12, 13, 14, 15] + [0] * 15
    assert stage[20 : 20 + rows].tolist() == [30, 31, 32, 33, 17] + [0] * 15
    assert stage[40 : 40 + rows].tolist() == [5, 6, 7, 8, 40] + [-1] * 15  # padding rows write no KV
    assert stage[layout.seq_lens : layout.seq_lens + 4].tolist() == [34, 18, 0, 0]
    assert stage[layout.cu_seqlens : layout.cu_seqlens + 5].tolist() == [0, 4, 5, 5, 5]  # empty ranges
    assert end == layout.tables + 4
    assert stage[layout.tables : end].tolist() == [7, 8, 9, 0]
    # a smaller graph leaves the rest of the buffer alone (it reads rows [:bs * q] only)
    stage.fill_(99)
    pack_step(stage, layout, 1, 2, [3, 4], [8, 9], [1, 2], [0, 2], [10], tables[:1])
    assert stage[:3].tolist() == [3, 4, 99]
    assert stage[layout.cu_seqlens : layout.cu_seqlens + 3].tolist() == [0, 2, 99]
    with pytest.raises(ValueError, match="does not fit"):  # a sequence of more rows than q
        pack_step(stage, layout, 1, 2, [1, 2, 3], [0, 1, 2], [0, 1, 2], [0, 3], [3], tables[:1])
    with pytest.raises(ValueError, match="does not fit"):  # more sequences than bs
        pack_step(stage, layout, 1, 2, [1, 2], [0, 0], [0, 1], [0, 1, 2], [1, 1], tables)


def install_cpu_graph_runners(engine: Engine, k: int) -> list[VerifyGraphRunner]:
    """Uncaptured runners where a CUDA engine captures graphs: the padded inputs, eagerly."""
    config = engine.config
    sizes = verify_graph_sizes(config.max_num_seqs, k, config.max_num_batched_tokens)
    max_blocks = -(-engine.max_model_len // config.block_size)
    runners = []
    for runner in [engine.runner] + ([engine.draft_model.runner] if engine.draft_model else []):
        runner.verify_graphs = VerifyGraphRunner(
            runner._verify_forward, runner.cos_sin_cache, sizes, max_blocks, engine.device
        )
        runners.append(runner.verify_graphs)
    eagle = engine.eagle
    if eagle is not None:
        rows = max(bs * q for bs, q in sizes)
        eagle._graph_hidden = torch.zeros(rows, eagle.cfg.hidden_size, dtype=eagle.dtype)
        eagle.catch_up_graphs = VerifyGraphRunner(
            eagle._graph_forward, eagle.cos_sin_cache, sizes, max_blocks, engine.device
        )
        runners.append(eagle.catch_up_graphs)
    return runners


@pytest.mark.parametrize("method", ["prompt-lookup", "draft-same", "eagle", "eagle3"])
def test_padded_graph_inputs_give_the_tokens_of_decoding_without_speculation(
    ref_models: dict[str, RefModel], eagle_heads: dict[str, Path], method: str
) -> None:
    """8 requests in flight, chunked prefill (a 32-token step budget), preemption, fixed K = 4 and
    adaptive K (other draft lengths, sequences with shorter drafts or none beside drafted ones)."""
    ref = ref_models["stories"]
    spec: dict[str, object] = {"num_speculative_tokens": 4}
    if method == "prompt-lookup":
        spec["speculative"] = "prompt-lookup"
    elif method.startswith("eagle"):
        spec |= {"speculative": "eagle", "speculative_model": str(eagle_heads[method])}
    else:
        spec["speculative_model"] = str(ref.path)
    sampled = method == "prompt-lookup"  # (seeded point-mass rows give the very same tokens too)
    reference = run_to_completion(ref.engine(max_model_len=128), requests(sampled))
    for adaptive in (False, True):
        engine = small_engine(ref, 16, max_num_batched_tokens=32, speculative_adaptive=adaptive, **spec)
        runners = install_cpu_graph_runners(engine, 4)
        got = run_to_completion(engine, requests(sampled))
        assert_same(reference, got)
        assert engine.scheduler.num_preemptions > 0
        assert engine.speculator is not None and engine.speculator.stats.num_drafts > 0
        # the verification (and with a fixed K the draft's / head's catch-up: an adaptive K turns a
        # draft as costly as the target off but for its probes) really ran on the padded inputs
        replays = [r.num_replays for r in runners]
        assert replays[0] > 0 and (adaptive or min(replays) > 0), replays
