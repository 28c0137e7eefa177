"""The worker engine on CUDA in bf16 (Triton kernels, CUDA graphs, GPU sampler) against transformers.

Models are small random Hugging Face models with real head sizes (head_dim 64 / 128, GQA 4 and 7),
saved in bf16 to a temp dir and loaded by both. A random model's top two logits are often within
bf16 noise of each other (HF bf16 and HF fp32 then disagree on 5-15% of greedy tokens), which
would make a 99% agreement check measure luck. So the embedding is scaled up and the LM head is a
permutation of it: the next token is mostly decided by the current one (a clear top-1 margin),
while the layers, attention included, still move every logprob, which the fp32 comparison checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

BASE: dict[str, Any] = dict(
    hidden_size=512,
    intermediate_size=1024,
    vocab_size=2048,
    max_position_embeddings=1024,
    initializer_range=0.02,
    bos_token_id=1,
    eos_token_id=2,
    num_hidden_layers=3,
)
PROMPT_LENS = [5, 17, 33, 64, 100]  # crossing 16-token blocks
NUM_TOKENS = 64


def _build(family: str) -> Any:
    import transformers as tf

    cfg: Any
    if family == "llama":  # GQA 4, head_dim 64, llama3 rope scaling
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        cfg = tf.LlamaConfig(
            **BASE,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            rope_parameters=rope,
            tie_word_embeddings=False,
        )
        return tf.LlamaForCausalLM(cfg)
    if family == "qwen2":  # GQA 7, head_dim 64, qkv bias, tied embeddings
        cfg = tf.Qwen2Config(
            **{**BASE, "hidden_size": 448},
            num_attention_heads=7,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
        return tf.Qwen2ForCausalLM(cfg)
    if family == "gpt_oss":
        # gpt-oss-20b's real layer (hidden 2880, 64 heads of 64 on 8 KV heads, 32 experts of 2880,
        # top-4, YaRN, window 128: the longer prompts outgrow it), two layers (sliding, full)
        cfg = tf.GptOssConfig(
            **{**BASE, "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 2},
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=64,
            num_local_experts=32,
            num_experts_per_tok=4,
            sliding_window=128,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 4096,
            },
            tie_word_embeddings=False,
        )
        return tf.GptOssForCausalLM(cfg)
    if family == "qwen3_moe":
        # Qwen3-30B-A3B's real layer (hidden 2048, 32 heads of 128 on 4 KV heads, 128 experts of
        # 768, top-8, normalised), two layers
        cfg = tf.Qwen3MoeConfig(
            **{**BASE, "hidden_size": 2048, "num_hidden_layers": 2},
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            moe_intermediate_size=768,
            norm_topk_prob=True,
            tie_word_embeddings=False,
        )
        return tf.Qwen3MoeForCausalLM(cfg)
    if family == "mixtral":  # 8 experts, top-2, GQA 4, head_dim 128
        cfg = tf.MixtralConfig(
            **{**BASE, "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 2},
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            num_local_experts=8,
            num_experts_per_tok=2,
            sliding_window=None,
            tie_word_embeddings=False,
        )
        return tf.MixtralForCausalLM(cfg)
    if family == "gemma3":
        # Gemma-3-1B's layer (hidden 1152, 4 heads of 256 on 1 KV head, q/k norms, sandwich norms),
        # local layers (window 32: the longer prompts outgrow it) around a global one, two rope bases
        cfg = tf.Gemma3TextConfig(
            **{**BASE, "hidden_size": 1152, "intermediate_size": 6912},
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=256,
            query_pre_attn_scalar=256,
            sliding_window=32,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
        )
        return tf.Gemma3ForCausalLM(cfg)
    cfg = tf.Qwen3Config(
        **BASE, num_attention_heads=8, num_key_value_heads=2, head_dim=128, tie_word_embeddings=False
    )  # q/k norm, head_dim 128
    return tf.Qwen3ForCausalLM(cfg)


# the dense families, the mixtures of experts (#22) and Gemma 3's local/global layers
@pytest.fixture(
    scope="module", params=["llama", "qwen2", "qwen3", "gpt_oss", "qwen3_moe", "mixtral", "gemma3"]
)
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    model = _build(request.param).to(torch.bfloat16)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.mul_(3)
        if not model.config.tie_word_embeddings:
            model.lm_head.weight.copy_(embed[torch.randperm(embed.shape[0])] * 0.3)
        if model.config.model_type == "qwen2":  # a random qkv bias, so the engine's bias path is checked too
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.1)
                layer.self_attn.k_proj.bias.normal_(0, 0.1)
        if model.config.model_type == "gpt_oss":  # sinks that take a share of the softmax; biases
            for name, param in model.named_parameters():
                if name.endswith("sinks"):
                    param.normal_(0, 1.0)
                elif name.endswith("bias"):
                    param.normal_(0, 0.05)
    path = tmp_path_factory.mktemp(f"gpu-{request.param}")
    model.save_pretrained(str(path))
    return path


def _engine(
    model_dir: Path,
    enforce_eager: bool = False,
    async_scheduling: str = "auto",
    kv_cache_dtype: str = "auto",
    quantization: str = "none",
) -> Any:
    from services.worker.config import WorkerConfig
    from services.worker.engine import Engine

    return Engine(
        WorkerConfig(
            model=str(model_dir),
            device="cuda",
            dtype="bfloat16",
            max_num_seqs=8,
            max_model_len=512,
            kv_cache_memory="256MiB",
            enforce_eager=enforce_eager,
            async_scheduling=async_scheduling,  # type: ignore[arg-type]
            kv_cache_dtype=kv_cache_dtype,  # type: ignore[arg-type]
            quantization=quantization,  # type: ignore[arg-type]
        )
    )


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENS]


@dataclass
class Agreement:
    """The engine's greedy run against transformers, over `total` positions (teacher-forced on the
    engine's own tokens unless named free-running)."""

    hf16: int  # engine token == HF bf16's argmax
    total: int
    free_running: int  # engine's tokens == HF bf16's own generate()
    fp32_engine: int  # engine token == HF fp32's argmax
    fp32_hf16: int  # HF bf16's argmax == HF fp32's argmax: the reference's own bf16 noise floor
    err_engine: float  # mean |logprob - HF fp32| of the engine's tokens
    err_hf16: float  # the same for HF bf16

    def check(self, bar: float = 0.99) -> None:
        """>= bar agreement with HF bf16; or, where HF bf16 itself agrees with HF fp32 less than
        that (a random model whose near-ties bf16 rounding flips: two bf16 implementations then
        cannot agree at 99% unless they round identically), agreement with the fp32 model at least
        transformers bf16's own, less 1%."""
        if self.hf16 >= bar * self.total:
            return
        assert self.fp32_hf16 < bar * self.total, (
            f"greedy agreement with HF bf16 {self.hf16}/{self.total} < {bar:.0%}"
        )
        assert self.fp32_engine >= self.fp32_hf16 - 0.01 * self.total, (
            f"agreement with HF fp32: engine {self.fp32_engine}/{self.total} < HF bf16's {self.fp32_hf16}"
        )


def _against_transformers(
    model_dir: Path, kv_cache_dtype: str = "auto", quantization: str = "none"
) -> Agreement:
    """The engine's greedy run against transformers bf16 and fp32 (of the checkpoint's own weights,
    also when the engine quantizes them at load)."""
    from transformers import AutoModelForCausalLM

    from services.worker.request import SamplingParams

    engine = _engine(model_dir, kv_cache_dtype=kv_cache_dtype, quantization=quantization)
    assert engine.ops.name == "triton" and engine.runner.graphs is not None
    vocab = engine.model_config.vocab_size
    prompts = _prompts(vocab)
    results = engine.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=0)
    )
    del engine
    auto: Any = AutoModelForCausalLM
    hf16 = auto.from_pretrained(str(model_dir), dtype=torch.bfloat16).cuda().eval()
    hf32 = auto.from_pretrained(str(model_dir), dtype=torch.float32).cuda().eval()
    hf16.generation_config.eos_token_id = None  # like ignore_eos: EOS may be chosen, and does not stop
    agree = total = free_agree = fp32_engine = fp32_hf16 = 0
    err_engine, err_hf16 = [], []
    for prompt, result in zip(prompts, results, strict=True):
        tokens = result.token_ids[0]
        assert len(tokens) == NUM_TOKENS
        ids = torch.tensor([prompt + tokens], device="cuda")
        with torch.no_grad():  # free-running greedy of transformers bf16, position by position
            hf_out = hf16.generate(
                ids[:, : len(prompt)], max_new_tokens=NUM_TOKENS, min_new_tokens=NUM_TOKENS, do_sample=False
            )[0, len(prompt) :].tolist()
        free_agree += sum(a == b for a, b in zip(hf_out, tokens, strict=True))
        with torch.no_grad():  # teacher-forced on the engine's own tokens
            lp16 = torch.log_softmax(hf16(ids).logits[0].float(), -1)[len(prompt) - 1 : -1]
            lp32 = torch.log_softmax(hf32(ids).logits[0].float(), -1)[len(prompt) - 1 : -1]
        chosen = torch.tensor(tokens, device="cuda")[:, None]
        engine_lp = torch.tensor([lp.logprob for lp in result.logprobs[0]], device="cuda")
        ref32 = lp32.gather(1, chosen)[:, 0]
        err_engine.append((engine_lp - ref32).abs())
        err_hf16.append((lp16.gather(1, chosen)[:, 0] - ref32).abs())
        agree += int((lp16.argmax(-1) == chosen[:, 0]).sum())
        fp32_engine += int((lp32.argmax(-1) == chosen[:, 0]).sum())
        fp32_hf16 += int((lp32.argmax(-1) == lp16.argmax(-1)).sum())
        total += NUM_TOKENS
    e_engine, e_hf16 = torch.cat(err_engine).mean().item(), torch.cat(err_hf16).mean().item()
    print(
        f"{model_dir.name} (KV {kv_cache_dtype}): greedy agreement teacher-forced {agree}/{total}, "
        f"free-running {free_agree}/{total}; with HF fp32: engine {fp32_engine}, HF bf16 {fp32_hf16}; "
        f"mean |logprob - fp32| engine {e_engine:.4f}, HF bf16 {e_hf16:.4f}"
    )
    return Agreement(agree, total, free_agree, fp32_engine, fp32_hf16, e_engine, e_hf16)


def test_logits_and_greedy_match_transformers(model_dir: Path) -> None:
    """>= 99% greedy agreement with transformers bf16 (#22's bar), or, on a model where transformers
    bf16 itself agrees with its fp32 model less (the random gpt-oss layer: 83% on the CPU, 87%
    between the engine and HF bf16 on the H100 with the engine as close to fp32 as HF bf16:
    mean |logprob error| 0.0661 vs 0.0663), at least HF bf16's agreement with fp32."""
    a = _against_transformers(model_dir)
    a.check()
    # Free-running, one bf16 near-tie sends the two continuations apart for the rest of the 64 tokens
    # (seen once on Qwen3: 263/320 with 318/320 teacher-forced), so it gets a looser sanity bound,
    # and none where the reference's own bf16 is below the bar (every near-tie is such a fork).
    if a.fp32_hf16 >= 0.99 * a.total:
        assert a.free_running >= 0.75 * a.total, (
            f"free-running greedy agreement {a.free_running}/{a.total} < 75%"
        )
    # The engine in bf16 is as close to the fp32 model as transformers in bf16 is (within 2x + noise).
    assert a.err_engine <= 2 * a.err_hf16 + 0.01, (a.err_engine, a.err_hf16)


def test_fp8_kv_cache_stays_close_to_transformers(model_dir: Path) -> None:
    """--kv-cache-dtype fp8 rounds every cached K/V to 1/16: looser than bf16, still the same model."""
    a = _against_transformers(model_dir, "fp8")
    a.check(bar=0.95)
    assert a.err_engine <= 6 * a.err_hf16 + 0.03, (a.err_engine, a.err_hf16)


@pytest.mark.parametrize("quantization", ["int8", "fp8", "int4"])
def test_quantized_weights_stay_close_to_transformers(model_dir: Path, quantization: str) -> None:
    """#19: weights quantized at load (int8 W8A16, fp8 W8A8 / weight-only for decode, int4 g128) keep
    greedy agreement with transformers bf16 on the unquantized weights >= 95% over 64 tokens (int8,
    fp8; int4, a 4-bit round-to-nearest without calibration, >= 80%) on the dense shapes (Llama-3.1-8B's
    and Qwen2-0.5B's layers); the report line states the mean |logprob - fp32| per format."""
    if model_dir.name.removeprefix("gpu-").rstrip("0123456789") not in ("llama", "qwen2"):
        pytest.skip("the dense shapes of the issue (Llama-3.1-8B, Qwen2-0.5B)")
    a = _against_transformers(model_dir, quantization=quantization)
    a.check(bar=0.80 if quantization == "int4" else 0.95)


def test_cuda_graphs_on_and_off_identical(model_dir: Path) -> None:
    from services.worker.request import SamplingParams

    eager, graphs = _engine(model_dir, enforce_eager=True), None
    assert eager.runner.graphs is None
    prompts = _prompts(eager.model_config.vocab_size)[:4]
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=32, ignore_eos=True, seed=7)
    params = [greedy, seeded, greedy, seeded]
    out_eager = [r.token_ids[0] for r in eager.generate(prompts, params)]
    # All greedy, no logprobs, 3 rows padded to the size-4 graph: the graph's own LM head + argmax.
    plain = eager.generate(prompts[:3], greedy, prefix="plain")
    del eager
    graphs = _engine(model_dir)
    assert graphs.runner.graphs is not None
    out_graphs = [r.token_ids[0] for r in graphs.generate(prompts, params)]
    assert out_graphs == out_eager
    plain_graphs = graphs.generate(prompts[:3], greedy, prefix="plain")
    assert [r.token_ids[0] for r in plain_graphs] == [r.token_ids[0] for r in plain]
    # A seeded request alone gives the tokens it gave inside the batch.
    alone = graphs.generate([prompts[1]], [seeded], prefix="alone")[0].token_ids[0]
    assert alone == out_eager[1]


def test_prefill_graphs_on_and_off_agree(model_dir: Path) -> None:
    """Prompt-carrying steps replaying piecewise graphs (prefill_graph.py) give the eager forward's
    tokens and logprobs: 8 requests in flight, prompts chunked by a 96-token step budget into
    steps mixed with decodes, padded to the ladder's buckets (and under 17 tokens, eager), a
    prefix-cache hit, with layer-wise KV signals off. Logprobs within 2e-2 (a padded bucket may take
    another cuBLAS kernel than the eager step's row count: the same math, summed in another order)."""
    from services.worker.request import SamplingParams

    def engine(max_tokens: int) -> Any:
        from services.worker.config import WorkerConfig
        from services.worker.engine import Engine

        return Engine(
            WorkerConfig(
                model=str(model_dir),
                device="cuda",
                dtype="bfloat16",
                max_num_seqs=8,
                max_model_len=512,
                max_num_batched_tokens=96,
                kv_cache_memory="256MiB",
                prefill_graph_max_tokens=max_tokens,
            )
        )

    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    eager = engine(0)
    assert eager.runner.prefill_graphs is None and eager.runner.graphs is not None
    base = _prompts(eager.model_config.vocab_size)  # 5, 17, 33, 64, 100 tokens
    # + a prompt that starts with another's 64 tokens (a prefix hit once that one is cached), one
    # of 40 and one of 197 (three chunks)
    prompts = [*base, base[3] + base[1], base[4][:40], base[4] + base[3] + base[2]]
    ref = eager.generate(prompts, params)
    del eager
    graphs = engine(96)
    assert graphs.runner.prefill_graphs is not None
    assert graphs.runner.prefill_graphs.sizes[-1] == 96
    out = graphs.generate(prompts, params)
    assert graphs.runner.prefill_graphs.num_replays > 0
    for a, b in zip(ref, out, strict=True):
        assert a.token_ids[0] == b.token_ids[0]
        la = [lp.logprob for lp in a.logprobs[0]]
        lb = [lp.logprob for lp in b.logprobs[0]]
        assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 2e-2


def _drive(engine: Any, requests: list[Any], aborts: dict[int, list[str]]) -> tuple[list[Any], list[float]]:
    """Every step's outputs (request id, choices, finished) and all logprobs, aborting between steps."""
    for req in requests:
        engine.add_request(req)
    steps: list[Any] = []
    logprobs: list[float] = []
    while engine.has_unfinished():
        outputs = [engine.abort(rid) for rid in aborts.get(len(steps), [])]
        outputs += engine.step()
        record = []
        for out in outputs:
            if out is None:
                continue
            record.append(
                (
                    out.request_id,
                    tuple((c.index, c.token_ids, c.finish_reason) for c in out.choices),
                    out.finished,
                )
            )
            logprobs += [lp.logprob for c in out.choices for lp in c.logprobs or ()]
        steps.append(record)
    assert engine.block_manager.num_used_blocks == 0 and engine._launched is None
    return steps, logprobs


def test_async_scheduling_on_and_off_identical(model_dir: Path) -> None:
    """Overlap on / off x CUDA graphs on / off: the same outputs in the same steps (greedy in-graph
    argmax, seeded top-p with logprobs, a stop id met mid-run, ragged max_tokens, an abort while
    the next step is in flight), and the overlap really ran."""
    from dataclasses import replace

    from services.worker.request import EngineRequest, SamplingParams

    reference = _engine(model_dir, enforce_eager=True, async_scheduling="off")
    prompts = _prompts(reference.model_config.vocab_size)
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=33, ignore_eos=True, logprobs=1)
    # A token first drawn at output position >= 10 of a seeded run: stopping on it ends "stop" mid-run.
    # (A tiny random model may cycle through a few tokens from the start, as Gemma 3's soft-capped
    # one does at temperatures 1 and 2 from its 5-token prompt: the first prompt, seed and
    # temperature whose run draws a new token that late.)
    stop, stop_prompt = None, prompts[0]
    for temperature, stop_prompt, seed in (
        (t, p, s) for t in (1.0, 2.0) for p in prompts for s in range(3, 11)
    ):
        drawn = SamplingParams(temperature=temperature, seed=seed, max_tokens=40, ignore_eos=True)
        tokens = reference.generate([stop_prompt], drawn, prefix=f"ref{temperature}-{seed}")[0].token_ids[0]
        stop = next((t for i, t in enumerate(tokens) if i >= 10 and t not in tokens[:i]), None)
        if stop is not None:
            break
    assert stop is not None, "no seeded run drew a new token after position 10"

    def requests() -> list[Any]:
        return [
            EngineRequest("greedy", tuple(prompts[0]), greedy),
            EngineRequest("stop", tuple(stop_prompt), replace(drawn, stop_token_ids=(stop,))),
            EngineRequest("seeded", tuple(prompts[1]), seeded),
            EngineRequest(
                "short", tuple(prompts[2]), SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
            ),
            EngineRequest("aborted", tuple(prompts[3]), seeded),
        ]

    aborts = {12: ["aborted"]}
    base = _drive(reference, requests(), aborts)
    # All greedy, no logprobs: the in-graph argmax path, continuations reading its output tensor.
    plain = [EngineRequest(f"p{i}", tuple(prompts[i]), greedy) for i in range(3)]
    plain_ref = _drive(reference, plain, {})
    del reference
    for eager, mode in ((True, "on"), (False, "off"), (False, "on")):
        engine = _engine(model_dir, enforce_eager=eager, async_scheduling=mode)
        assert (engine.runner.graphs is None) == eager and engine.async_scheduling == (mode == "on")
        steps, logprobs = _drive(engine, requests(), aborts)
        assert steps == base[0], (eager, mode)
        assert logprobs == pytest.approx(base[1], abs=0.02), (eager, mode)
        if mode == "on":
            assert engine.num_continuations > 20 and engine.num_discarded_rows >= 2
        assert _drive(engine, plain, {})[0] == plain_ref[0], (eager, mode)
        del engine
