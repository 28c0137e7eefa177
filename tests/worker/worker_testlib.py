"""Worker test helpers: tiny random Hugging Face models, and transformers as the reference."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.worker.config import WorkerConfig
from services.worker.engine import Engine, GenerateResult
from services.worker.model_config import ModelConfig
from services.worker.outputs import Usage
from services.worker.request import EngineRequest, SamplingParams


def randomize_norms_and_biases(hf: Any, seed: int) -> None:
    """Random positive norm weights (layer norms, final norm, Qwen3's q/k norms) and random biases,
    in place: a model whose norms are not ones (folded-norm tests)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.rand(param.shape, generator=gen) * 1.5 + 0.25)
            elif name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def tiny_folding_model(family: str, seed: int) -> Any:
    """A tiny random HF model (torch seed `seed`) with head_dim 32 (the Triton attention's range),
    random positive norm weights and random biases, so that folding the norms multiplies by
    something other than ones (folded-norm and quantized-GEMM kernel tests)."""
    import transformers as tf

    torch.manual_seed(seed)
    common: dict[str, Any] = dict(
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_hidden_layers=2,
        vocab_size=128,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    hf = {
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**common)),
        # no qkv bias, no q/k norms: the decode step's input norm runs inside the attention kernel
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common)),
        # q/k norms and experts (issue 22): the input norm's 1/rms in the q/k norm and attention
        # kernels, the post-attention norm's in the routing and gate/up kernels
        "qwen3_moe": lambda: tf.Qwen3MoeForCausalLM(
            tf.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        ),
    }[family]()
    randomize_norms_and_biases(hf, seed)
    return hf.eval()


def saved_config(hf: Any, path: Path) -> ModelConfig:
    """Save a transformers model in `path`; our config of it (for build_model)."""
    from services.worker.model_config import load_model_config

    hf.save_pretrained(str(path))
    return load_model_config(str(path))


def quantized_bf16_engine(path: Path, quantization: str, **config: Any) -> Engine:
    """The GPU quantization tests' engine: a 2-layer Llama of hidden 256 (head_dim 64, vocabulary
    512, torch seed 0; `config`: more LlamaConfig fields) saved in bf16 in `path`, served on CUDA
    in bf16 with `quantization`, 4 sequences of up to 128 tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=512,
        num_hidden_layers=2,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **config,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(path))
    return Engine(
        WorkerConfig(
            model=str(path),
            device="cuda",
            dtype="bfloat16",
            quantization=quantization,  # type: ignore[arg-type]
            max_num_seqs=4,
            max_model_len=128,
            kv_cache_memory="64MiB",
        )
    )


TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    max_position_embeddings=256,
    initializer_range=0.1,  # peaked enough that greedy choices are not near-ties
    bos_token_id=1,
    eos_token_id=2,
)


def _tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    rope: dict[str, Any] = {
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    }
    cfg = LlamaConfig(**TINY, **rope, num_hidden_layers=3, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _tiny_qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**TINY, num_hidden_layers=2, tie_word_embeddings=True))


def _tiny_qwen3() -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(**TINY, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False))


def _tiny_mistral() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**TINY, num_hidden_layers=2, sliding_window=None))


def _tiny_qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    # 3 layers, the middle one dense (mlp_only_layers): both feed-forward kinds in one model
    cfg = Qwen3MoeConfig(
        **TINY,
        num_hidden_layers=3,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
    )
    return Qwen3MoeForCausalLM(cfg)


def _tiny_mixtral() -> Any:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        **TINY, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=None
    )
    return MixtralForCausalLM(cfg)


def _tiny_mistral_sliding() -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    # a window of 8 positions: every test prompt outgrows it
    return MistralForCausalLM(MistralConfig(**TINY, num_hidden_layers=2, sliding_window=8))


def _tiny_gemma2() -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # caps low enough to bend the scores and logits of a tiny random model
    cfg = Gemma2Config(
        **TINY,
        num_hidden_layers=3,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=8,
        attn_logit_softcapping=1.5,
        final_logit_softcapping=4.0,
    )
    return Gemma2ForCausalLM(cfg)


def _tiny_gemma3() -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # local layers (window 8, rope base 10k) around a global one (1M base, linear x8 scaling)
    cfg = Gemma3TextConfig(
        **TINY,
        num_hidden_layers=4,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    )
    return Gemma3ForCausalLM(cfg)


def _tiny_phi3() -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    # LongRoPE: short factors below position 64, long ones from there on
    half = 8  # head_dim 16
    cfg = Phi3Config(
        **{**TINY, "num_attention_heads": 4, "hidden_size": 64},
        num_hidden_layers=2,
        original_max_position_embeddings=64,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 0.5 * i for i in range(half)],
        },
        pad_token_id=0,
    )
    return Phi3ForCausalLM(cfg)


def _tiny_gpt_oss() -> Any:
    from transformers import GptOssConfig, GptOssForCausalLM

    # alternating sliding (window 8) and full layers, YaRN past 32 positions; random sinks and
    # biases large enough to matter, gate/up weights large enough that the SwiGLU clamps (at 7) bite
    cfg = GptOssConfig(
        **{**TINY, "intermediate_size": 32},
        num_hidden_layers=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 8.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
            "original_max_position_embeddings": 32,
        },
    )
    model = GptOssForCausalLM(cfg)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            elif name.endswith("sinks"):
                param.copy_(torch.randn(param.shape, generator=gen) * 2.0)
            elif name.endswith("experts.gate_up_proj"):
                param.mul_(10.0)
    return model


TINY_BUILDERS: dict[str, Callable[[], Any]] = {
    "llama": _tiny_llama,
    "qwen2": _tiny_qwen2,
    "qwen3": _tiny_qwen3,
    "mistral": _tiny_mistral,
    "qwen3_moe": _tiny_qwen3_moe,
    "mixtral": _tiny_mixtral,
    "mistral_sw": _tiny_mistral_sliding,
    "gemma2": _tiny_gemma2,
    "gemma3": _tiny_gemma3,
    "phi3": _tiny_phi3,
    "gpt_oss": _tiny_gpt_oss,
}


@dataclass
class RefModel:
    """A model directory and its transformers twin (fp32)."""

    path: Path
    hf: Any
    eos_token_ids: list[int]
    vocab_size: int
    # transformers' answers so far by prompt: (the max_new_tokens asked, the tokens, their
    # log-softmax rows or None). Many tests ask the same prompts (once per engine setting), and
    # greedy decoding is prefix-consistent: a longer answer also serves a shorter ask.
    _answers: dict[tuple[int, ...], tuple[int, list[int], list[torch.Tensor] | None]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        return self._answer(prompt, max_new_tokens, with_logprobs=False)[0]

    def greedy_with_logprobs(
        self, prompt: list[int], max_new_tokens: int
    ) -> tuple[list[int], list[torch.Tensor]]:
        tokens, steps = self._answer(prompt, max_new_tokens, with_logprobs=True)
        assert steps is not None
        return tokens, steps

    def _answer(
        self, prompt: list[int], max_new_tokens: int, with_logprobs: bool
    ) -> tuple[list[int], list[torch.Tensor] | None]:
        key = tuple(prompt)
        cached = self._answers.get(key)
        if cached is None or cached[0] < max_new_tokens or (with_logprobs and cached[2] is None):
            cached = self._answers[key] = (
                max_new_tokens,
                *self._generate(prompt, max_new_tokens, with_logprobs),
            )
        _, tokens, steps = cached
        return tokens[:max_new_tokens], None if steps is None else steps[:max_new_tokens]

    def _generate(
        self, prompt: list[int], max_new_tokens: int, with_logprobs: bool
    ) -> tuple[list[int], list[torch.Tensor] | None]:
        out = self.hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=self.eos_token_ids,
            pad_token_id=0,
            output_logits=with_logprobs,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, len(prompt) :].tolist()
        if not with_logprobs:
            return tokens, None
        return tokens, [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]

    def engine(self, **overrides: Any) -> Engine:
        # CPU fp32 unless a test asks otherwise: the reference is transformers on the CPU in fp32
        options: dict[str, Any] = {
            "model": str(self.path),
            "device": "cpu",
            "kv_cache_memory": "16MiB",
            "max_num_seqs": 64,
        }
        options.update(overrides)
        return Engine(WorkerConfig(**options))


def load_ref(path: Path) -> RefModel:
    from transformers import AutoModelForCausalLM

    from services.worker.model_config import load_model_config

    cfg = load_model_config(str(path))
    # transformers' SDPA attention has no score soft-capping (Gemma 2): its eager one does
    extra = {"attn_implementation": "eager"} if cfg.attn_logit_softcapping else {}
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **extra).eval()
    return RefModel(path, hf, list(cfg.eos_token_ids), cfg.vocab_size)


def prompts_of_lengths(lengths: list[int], vocab_size: int, seed: int = 0, bos: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [[bos, *torch.randint(3, vocab_size, (n - 1,), generator=gen).tolist()] for n in lengths]


def usage_of(result: GenerateResult) -> Usage:
    """The usage of a finished request (set on its last output)."""
    assert result.usage is not None, f"{result.request_id} did not finish"
    return result.usage


def run_to_completion(
    engine: Engine, requests: list[EngineRequest], check_blocks_freed: bool = True
) -> dict[str, GenerateResult]:
    """Add the requests, step the engine until all finish, collect each request's result; by
    default also check that every KV block was given back."""
    results = {r.request_id: r for r in engine.run(requests)}
    if check_blocks_freed:
        assert engine.block_manager.num_used_blocks == 0
    return results


# ---- checks shared by the model-family tests (test_dense_families.py, test_moe_models.py) --------
def check_greedy_matches_transformers(
    ref: RefModel, lengths: list[int], budget: int, **engine_options: Any
) -> Engine:
    """Greedy tokens of prompts of `lengths`, all in flight at once (chunked prefill when the
    token `budget` is small), equal transformers' generate; the usage counts each prompt and
    every KV block is given back. Returns the engine for the caller's own checks."""
    engine = ref.engine(max_num_batched_tokens=budget, **engine_options)
    prompts = prompts_of_lengths(lengths, ref.vocab_size, seed=11)
    results = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids[0] == ref.greedy(prompt, 16), f"prompt of {len(prompt)} tokens"
        assert usage_of(result).prompt_tokens == len(prompt)
    assert engine.block_manager.num_used_blocks == 0
    return engine


def check_prefix_hits_and_preemption(ref: RefModel) -> None:
    """8 requests sharing a 33-token prefix in a cache of 10 blocks (3-4 blocks each): prefix hits,
    some requests preempted and recomputed, and still transformers' greedy tokens."""
    cfg = ref.hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    block_bytes = 16 * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    engine = ref.engine(kv_cache_memory=str(10 * block_bytes), max_num_batched_tokens=64, max_model_len=64)
    (prefix,) = prompts_of_lengths([33], ref.vocab_size, seed=3)
    prompts = [
        prefix + tail[1:] for tail in prompts_of_lengths([4, 9, 2, 6, 11, 3, 8, 5], ref.vocab_size, seed=4)
    ]
    requests = [
        EngineRequest(f"r{i}", tuple(p), SamplingParams(temperature=0.0, max_tokens=20))
        for i, p in enumerate(prompts)
    ]
    results = run_to_completion(engine, requests)
    for i, prompt in enumerate(prompts):
        assert results[f"r{i}"].token_ids[0] == ref.greedy(prompt, 20)
    assert engine.block_manager.hit_rate > 0
    assert engine.scheduler.num_preemptions > 0


def check_logprobs_match_transformers(
    ref: RefModel, prompt_len: int, max_tokens: int, seed: int, **engine_options: Any
) -> None:
    """The greedy tokens of one prompt and their logprobs (within 1e-4) equal transformers'."""
    engine = ref.engine(**engine_options)
    (prompt,) = prompts_of_lengths([prompt_len], ref.vocab_size, seed=seed)
    (result,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0))
    tokens, steps = ref.greedy_with_logprobs(prompt, max_tokens)
    assert result.token_ids[0] == tokens
    for entry, step, token in zip(result.logprobs[0], steps, tokens, strict=True):
        assert abs(entry.logprob - float(step[token])) < 1e-4


def check_greedy(
    engine: Engine, ref: Any, vocab_size: int, label: object = None, max_tokens: int = 10, seed: int = 2
) -> None:
    """Greedy tokens of 8 prompts in flight (max_tokens each) equal transformers' generate on `ref`."""
    prompts = prompts_of_lengths([3, 5, 8, 13, 2, 21, 9, 6], vocab_size, seed=seed)
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    results = run_to_completion(
        engine, [EngineRequest(f"r{i}", tuple(p), greedy) for i, p in enumerate(prompts)]
    )
    for i, prompt in enumerate(prompts):
        out = ref.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        assert results[f"r{i}"].token_ids[0] == out[0, len(prompt) :].tolist(), (label, i)


def model_logits(model: Any, prompt: list[int], block_size: int = 4) -> torch.Tensor:
    """Logits [len(prompt), vocab] fp32 of a prefill of prompt[:-1] and a decode step of prompt[-1]."""
    from kernels import build_rope_cache
    from services.worker.layers.attention import AttentionMetadata

    cfg = model.config
    num_tokens, num_blocks = len(prompt), -(-len(prompt) // block_size)
    kv = torch.zeros(cfg.num_layers, 2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    for i, attn in enumerate(model.attention_layers()):
        attn.kv_cache = kv[i]
    cos_sin = build_rope_cache(
        cfg.head_dim, num_tokens, cfg.rope_theta, cfg.rope_scaling, torch.float32, "cpu"
    )
    out = []
    for start, end in ((0, num_tokens - 1), (num_tokens - 1, num_tokens)):
        positions = torch.arange(start, end)
        meta = AttentionMetadata(
            positions=positions,
            slot_mapping=positions.clone(),
            block_tables=torch.arange(num_blocks, dtype=torch.int32)[None, :],
            cu_seqlens_q=torch.tensor([0, end - start], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            max_seqlen_q=end - start,
            cos_sin_cache=cos_sin,
        )
        with torch.inference_mode():
            out.append(model.compute_logits(model(torch.tensor(prompt[start:end]), meta)))
    return torch.cat(out)
