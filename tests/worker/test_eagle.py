"""EAGLE draft heads (docs/speculative.md): the heads' drafts equal an independent reference fed by
transformers' hidden states (EAGLE-1 and EAGLE-3 layouts; the hidden-state wiring), a head that
computes a one-layer target is always accepted (the token / position wiring), sampled output keeps
the target's distribution, Info reports the counters, and heads that cannot serve the target are
refused at start-up. (Greedy identity under batching, chunked prefill and preemption, aborts and
async scheduling: the parametrized tests of test_speculative.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from eagle_testlib import (
    EAGLE3_AUX_LAYERS,
    copy_target_and_head,
    head_config,
    random_head_tensors,
    reference_drafts,
    write_head,
)
from scipy.stats import chi2_contingency
from worker_testlib import RefModel, load_ref, prompts_of_lengths

from services.worker.model_config import ModelConfigError
from services.worker.request import EngineRequest, SamplingParams


@pytest.fixture(scope="module")
def copy_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[RefModel, Path, Path]:
    """A one-layer target, a head that computes it exactly, and one with noise on its weights."""
    root = tmp_path_factory.mktemp("eagle-copy")
    copy_target_and_head(root / "target", root / "head", noise=0.0)
    copy_target_and_head(root / "target", root / "noisy-head", noise=0.5)
    return load_ref(root / "target"), root / "head", root / "noisy-head"


@pytest.mark.parametrize("layout", ["eagle", "eagle3"])
def test_drafts_equal_a_reference_fed_by_the_targets_hidden_states(
    ref_models: dict[str, RefModel], eagle_heads: dict[str, Path], layout: str
) -> None:
    """After every step (prompts in chunks of 8 tokens, drafted steps verified in between), the
    proposer's greedy drafts for each running sequence are those of a plain full recomputation of
    the head over transformers' hidden states (EAGLE-1: the final ones; EAGLE-3: the streams into
    layers 1, 2, 4), and differ from it fed zeros instead: the features matter, and are the right ones."""
    ref = ref_models["stories"]
    head = eagle_heads[layout]
    engine = ref.engine(
        max_model_len=128,
        max_num_batched_tokens=8,
        speculative="eagle",
        speculative_model=str(head),
        speculative_adaptive=False,
        num_speculative_tokens=3,
    )
    assert engine.eagle is not None
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    for i, prompt in enumerate(prompts_of_lengths([19, 6], 512, seed=5)):
        engine.add_request(EngineRequest(f"e{i}", tuple(prompt), sp))
    compared = differs_without_features = 0
    while engine.has_unfinished():
        engine.step()
        for request in list(engine.requests.values()):
            seq = request.sequences[0]
            if seq.is_finished or seq.num_output_tokens == 0:
                continue
            draft = engine.eagle.propose([seq], 3)[0]
            assert draft is not None
            tokens = list(seq.token_ids)
            assert draft.token_ids == reference_drafts(ref.hf, head, tokens, 3, EAGLE3_AUX_LAYERS), (
                request.request_id,
                len(tokens),
            )
            zeros = reference_drafts(ref.hf, head, tokens, 3, EAGLE3_AUX_LAYERS, zero_features=True)
            differs_without_features += zeros != draft.token_ids
            compared += 1
    assert engine.speculator is not None and engine.speculator.stats.num_drafts > 5
    assert compared >= 20 and differs_without_features >= compared // 2
    assert engine.eagle.num_used_blocks == 0


@pytest.mark.parametrize("layout", ["eagle", "eagle3"])
def test_positions_of_a_prefix_cache_hit_enter_the_head_with_zero_features(
    ref_models: dict[str, RefModel], eagle_heads: dict[str, Path], layout: str
) -> None:
    """A prompt whose first two blocks come from the prefix cache: the target computes no features
    there, so the head reads zeros for positions 0..31 (the reference fed the same), and the greedy
    output is still the target's."""
    ref = ref_models["stories"]
    head = eagle_heads[layout]
    engine = ref.engine(
        max_model_len=128, speculative="eagle", speculative_model=str(head), speculative_adaptive=False
    )
    assert engine.eagle is not None
    first, other = prompts_of_lengths([40, 12], 512, seed=9)
    second = first[:36] + other[1:]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine.generate([first], sp, prefix="first")
    engine.add_request(EngineRequest("second", tuple(second), sp))
    while not engine.requests["second"].sequences[0].num_output_tokens:
        engine.step()
    assert engine.block_manager.num_hit_tokens >= 32
    seq = engine.requests["second"].sequences[0]
    draft = engine.eagle.propose([seq], 3)[0]
    assert draft is not None
    tokens = list(seq.token_ids)
    assert draft.token_ids == reference_drafts(ref.hf, head, tokens, 3, EAGLE3_AUX_LAYERS, missing=32)
    while engine.has_unfinished():
        engine.step()
    plain = ref.engine(max_model_len=128).generate([second], sp)
    assert seq.token_ids == tokens[: len(second)] + plain[0].token_ids[0]


def test_an_eagle3_head_is_told_by_its_tensors(
    ref_models: dict[str, RefModel], stories_dir: Path, tmp_path: Path
) -> None:
    """`midlayer.*` tensors make an EAGLE-3 head whatever its `architectures` says."""
    cfg = head_config(stories_dir, True, eagle_aux_hidden_state_layer_ids=EAGLE3_AUX_LAYERS)
    cfg["architectures"] = ["LlamaForCausalLM"]
    path = write_head(tmp_path, cfg, random_head_tensors(cfg, True, seed=4))
    engine = ref_models["stories"].engine(speculative="eagle", speculative_model=str(path))
    assert engine.eagle is not None and engine.eagle.layout.eagle3
    assert engine.eagle.layout.aux_layers == (1, 2, 4)


def test_a_head_that_computes_the_target_is_always_accepted(copy_pair: tuple[RefModel, Path, Path]) -> None:
    """Pair i = (token i + 1, feature i), the chained drafts and the target's LM head: a head equal
    to the target's computation drafts exactly the target's greedy tokens. Info reports it."""
    from services.worker.rpc import _speculative_info

    ref, head, _ = copy_pair
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = prompts_of_lengths([4, 11, 7], 320, seed=2)
    plain = ref.engine(max_model_len=128).generate(prompts, sp)
    engine = ref.engine(
        max_model_len=128,
        speculative="eagle",
        speculative_model=str(head),
        num_speculative_tokens=4,
        speculative_adaptive=False,  # (the head costs as much as this one-layer target: adaptation says no)
    )
    got = engine.generate(prompts, sp)
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]
    info = _speculative_info(engine)
    assert info is not None and (info.method, info.draft_model) == ("eagle", head.name)
    assert info.num_draft_tokens > 50 and info.num_accepted_tokens == info.num_draft_tokens
    assert info.acceptance_rate == 1.0 and info.mean_accepted_length > 3.0


def test_sampled_output_distribution_is_the_targets(copy_pair: tuple[RefModel, Path, Path]) -> None:
    """Rejection sampling with a head's q (a noisy copy: kept about half the time): over 300 seeds
    the tokens at output positions 1..3 follow the distribution decoding without speculation gives
    (chi-square test of homogeneity; the first token is the prefill's, not speculated)."""
    ref, _, noisy = copy_pair
    prompt = [1, 40, 50, 60]
    sp = [SamplingParams(temperature=1.0, top_k=4, seed=s, max_tokens=4, ignore_eos=True) for s in range(300)]
    plain = ref.engine(max_model_len=64).generate([prompt] * len(sp), sp)
    engine = ref.engine(
        max_model_len=64, speculative="eagle", speculative_model=str(noisy), speculative_adaptive=False
    )
    spec = engine.generate([prompt] * len(sp), sp)
    stats = engine.speculator.stats if engine.speculator else None
    assert stats is not None and stats.num_draft_tokens > 100
    assert 0.1 < stats.acceptance_rate < 0.9  # both the kept and the residual paths ran
    for pos in (1, 2, 3):
        a = [r.token_ids[0][pos] for r in plain]
        b = [r.token_ids[0][pos] for r in spec]
        tokens = sorted(set(a) | set(b))
        table = [[a.count(t) for t in tokens], [b.count(t) for t in tokens]]
        keep = [j for j in range(len(tokens)) if table[0][j] + table[1][j] >= 10]
        rare = [j for j in range(len(tokens)) if j not in keep]
        table = [[row[j] for j in keep] + ([sum(row[j] for j in rare)] if rare else []) for row in table]
        assert chi2_contingency(table).pvalue > 1e-3, (pos, table)


def _head(tmp: Path, stories: Path, eagle3: bool, **config: object) -> Path:
    cfg = head_config(stories, eagle3, **config)
    num_aux = len(config.get("eagle_aux_hidden_state_layer_ids") or EAGLE3_AUX_LAYERS)  # type: ignore[arg-type]
    return write_head(tmp, cfg, random_head_tensors(cfg, eagle3, seed=1, num_aux=num_aux))


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("hidden", "head's hidden size is 32, the target's 64"),
        ("vocab", "head's vocabulary has 300 tokens, the target's 512"),
        ("target_hidden", "reads hidden states of size 128, the target's are 64"),
        ("aux_layers", r"aux hidden-state layers \[1, 2, 9\] do not name distinct layers"),
        ("default_aux", r"aux hidden-state layers \[2, 2, 2\]"),
        ("d2t", "d2t maps draft tokens to ids outside the target's vocabulary of 512"),
        ("missing", "missing tensors layers.0.mlp.down_proj.weight"),
        ("speculators", "architecture 'Eagle3Speculator' is not an EAGLE head"),
    ],
)
def test_startup_refuses_a_head_that_does_not_fit_the_target(
    ref_models: dict[str, RefModel], stories_dir: Path, tmp_path: Path, case: str, message: str
) -> None:
    aux = {"eagle_aux_hidden_state_layer_ids": EAGLE3_AUX_LAYERS}
    if case == "hidden":
        path = _head(tmp_path, stories_dir, False, hidden_size=32, intermediate_size=64)
    elif case == "vocab":
        path = _head(tmp_path, stories_dir, False, vocab_size=300)
    elif case == "target_hidden":
        path = _head(tmp_path, stories_dir, True, target_hidden_size=128, **aux)
    elif case == "aux_layers":
        path = _head(tmp_path, stories_dir, True, eagle_aux_hidden_state_layer_ids=[1, 2, 9])
    elif case == "default_aux":  # 5 layers: (2, 5 // 2, 5 - 3)
        path = _head(tmp_path, stories_dir, True)
    elif case == "d2t":
        path = _head(tmp_path, stories_dir, True, draft_vocab_size=200, **aux)
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path / "model.safetensors"))
        tensors["d2t"][-1] = 400  # draft token 199 -> 599
        save_file(tensors, str(path / "model.safetensors"))
    elif case == "missing":
        cfg = head_config(stories_dir, False)
        tensors = random_head_tensors(cfg, False, seed=1)
        del tensors["layers.0.mlp.down_proj.weight"]
        path = write_head(tmp_path, cfg, tensors)
    else:  # the `speculators` packaging (its own config layout)
        path = _head(tmp_path, stories_dir, False, architectures=["Eagle3Speculator"])
    with pytest.raises(ModelConfigError, match=message):
        ref_models["stories"].engine(speculative="eagle", speculative_model=str(path))


def test_startup_refuses_a_target_whose_hidden_states_it_cannot_read(
    ref_models: dict[str, RefModel], tmp_path: Path
) -> None:
    gemma = ref_models["gemma2"]
    cfg = head_config(gemma.path, False)
    path = write_head(tmp_path, cfg, random_head_tensors(cfg, False, seed=1))
    with pytest.raises(ModelConfigError, match="Gemma2ForCausalLM is not supported"):
        gemma.engine(speculative="eagle", speculative_model=str(path))
