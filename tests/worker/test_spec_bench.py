"""benchmarks/spec_bench.py: --smoke runs every workload on the CPU and writes its JSON; its
confident dummy target, successor table and oracle proposer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.engine_bench import write_model
from benchmarks.spec_bench import (
    TINY,
    OracleProposer,
    Setup,
    first_divergence,
    make_engine,
    successor_table,
    top_logprobs,
)
from services.worker.request import SamplingParams
from tests.bench_testlib import run_bench

REPO = Path(__file__).resolve().parents[2]


def test_spec_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    report, _ = run_bench("spec_bench.py", "--smoke", "--dtype", "bfloat16", out=out)
    rows = {(r["name"], r["k"], r["adaptive"]): r for r in report["rows"]}
    assert rows[("baseline", 0, False)]["speedup"] == 1.0
    assert report["speculative_cuda_graphs"] is True
    # the confident target: its greedy choice is far above any rounding difference
    assert report["logprob_margin"]["min"] > 5.0 and report["rounding_noise"] < 0.5
    # greedy speculation emits the baseline's tokens, whatever the proposer
    assert all(r["same_output"] and r["first_divergence"] == -1 for r in report["rows"])
    for k in (2, 4):
        # free proposals of the target's own output, and the target as its own draft: all kept
        assert rows[("oracle (baseline output, free)", k, False)]["acceptance_rate"] == 1.0
        assert rows[("draft=target", k, False)]["acceptance_rate"] == 1.0
        assert rows[("never-agreeing draft", k, False)]["acceptance_rate"] < 0.2
        # the model quotes the prompt with an edit every 8 tokens: lookup proposes, is mostly kept
        lookup = rows[("prompt lookup (quotes, 1/8)", k, False)]
        assert 0.4 < lookup["acceptance_rate"] < 1.0 and lookup["mean_accepted_length"] > 1.5
        # EAGLE: the baseline's tokens through a real head's forwards are all kept; a random head's ~never
        assert rows[("eagle3 head, oracle tokens", k, False)]["acceptance_rate"] == 1.0
        assert rows[("eagle3 random head", k, False)]["acceptance_rate"] < 0.2
        assert rows[("eagle1 random head", k, False)]["acceptance_rate"] < 0.2
    assert ("never-agreeing draft", 4, True) in rows
    assert ("eagle3 random head", 4, True) in rows and ("eagle1 random head", 4, True) in rows
    assert report["targets"]["full_agreement_k4_measured"] is True
    assert set(report["targets"]) >= {
        "full_agreement_k4_speedup",
        "zero_agreement_adaptive_speedup",
        "eagle3_full_agreement_k4_speedup",
        "eagle3_zero_agreement_adaptive_speedup",
    }


def test_successor_table_quotes_the_document_with_edits() -> None:
    gen = torch.Generator().manual_seed(0)
    doc = (torch.randperm(509, generator=gen)[:20] + 3).tolist()
    succ = successor_table(512, doc, 8, gen)
    assert sorted(succ.tolist()) == list(range(512))  # a bijection
    out, token = [], doc[-1]
    for _ in range(22):
        token = int(succ[token])
        out.append(token)
    # doc[0..7], an edit, doc[8..15], an edit, doc[16..19]
    assert out[:8] == doc[:8] and out[9:17] == doc[8:16] and out[18:22] == doc[16:20]
    assert out[8] not in doc and out[17] not in doc
    # any other token starts a chain that does not repeat itself soon
    token, seen = 0 if 0 not in doc else 1, set()
    for _ in range(100):
        assert token not in seen
        seen.add(token)
        token = int(succ[token])


def tiny_setup(root: Path) -> tuple[Path, Setup]:
    cfg = {**TINY, "max_position_embeddings": 256}
    gen = torch.Generator().manual_seed(0)
    succ = successor_table(512, list(range(3, 35)), 8, gen)
    return write_model(root, "target", cfg), Setup("cpu", "bfloat16", 128, [4], False, succ)


def test_confident_target_margins_are_far_above_bf16_rounding() -> None:
    """Plain dummy weights give near-flat logits (top-1 / top-2 ties in bf16: a verification's
    other GEMM shapes can flip the greedy choice); make_confident's are decided by > 5 nats."""
    with tempfile.TemporaryDirectory() as tmp:
        target, setup = tiny_setup(Path(tmp))
        engine = make_engine(target, setup)
        prompt = list(range(100, 116))
        confident = [top1 - top2 for _, top1, top2 in top_logprobs(engine, prompt, 32)]
        with torch.no_grad():  # plain dummy weights again
            engine.runner.model.model.embed_tokens.weight.normal_(0, 0.02)
            engine.runner.model.lm_head.weight.normal_(0, 0.02)
        flat = [top1 - top2 for _, top1, top2 in top_logprobs(engine, prompt, 32)]
    assert min(confident) > 5.0
    assert min(flat) < 0.1


def test_oracle_stops_proposing_where_the_output_left_the_baseline() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        target, setup = tiny_setup(Path(tmp))
        prompt = list(range(100, 116))
        engine = make_engine(target, setup, speculative="prompt-lookup", speculative_adaptive=False)
        assert engine.speculator is not None
        # a "baseline" that differs from the model's output at position 5
        sp: SamplingParams = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
        expected = engine.generate([prompt], sp, prefix="plain")[0].token_ids[0]
        fake = list(expected)
        fake[5] = (fake[5] + 1) % 512
        stats = engine.speculator.stats
        before = (stats.num_draft_tokens, stats.num_accepted_tokens)
        engine.speculator.proposer = OracleProposer(fake)
        output = engine.generate([prompt], sp, prefix="run")[0].token_ids[0]
        drafted = stats.num_draft_tokens - before[0]
        accepted = stats.num_accepted_tokens - before[1]
    assert output == expected  # greedy speculation: the model's tokens, whatever was proposed
    assert first_divergence(output, fake) == 5
    # drafts only up to position 5 (the old oracle went on proposing the "baseline" after it)
    assert 0 < drafted <= 5 and accepted <= drafted
