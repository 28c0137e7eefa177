"""The facts the worker needs from a Hugging Face model directory, read without `transformers`.

Handles both config spellings: `rope_scaling` + `rope_theta` (transformers 4.x) and
`rope_parameters` (transformers 5.x). EOS ids are the union of config.json and
generation_config.json, each an int or a list (gpt-oss: also harmony's `<|call|>`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ModelConfigError(ValueError):
    """The model directory or its config cannot be served; the message says why."""


@dataclass(frozen=True)
class ModelConfig:
    path: str
    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # {"rope_type": "llama3", "factor": ...}; None: plain rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q, k, v (Qwen2 always; Llama / Qwen3 when attention_bias)
    o_proj_bias: bool  # bias on o_proj (Llama / Qwen3 when attention_bias; never Qwen2)
    mlp_bias: bool
    qk_norm: bool  # RMSNorm over head_dim on q and k (Qwen3)
    sliding_window: int | None  # None: full attention everywhere
    eos_token_ids: tuple[int, ...] = field(default=())
    torch_dtype: str = "float32"  # the checkpoint's dtype
    # Mixture of experts (Qwen3-MoE, Mixtral); num_experts 0: every layer's MLP is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's intermediate size
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model whose MLP is dense anyway
    # Per-layer attention kind ("sliding_attention" | "full_attention"); () with a sliding window:
    # every layer slides (Mistral)
    layer_types: tuple[str, ...] = ()
    attn_logit_softcapping: float = 0.0  # > 0: scores := cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcapping: float = 0.0  # > 0: the same on the LM head's logits (Gemma 2)
    query_pre_attn_scalar: float = 0.0  # > 0: attention scale = this ** -0.5 (Gemma), else head_dim's
    # The sliding layers' own rope (Gemma 3: a 10k base for local layers, 1M for global ones)
    rope_local_theta: float = 0.0  # 0: the sliding layers use the global rope
    rope_local_scaling: dict[str, Any] | None = None
    hidden_act: str = "silu"
    # A learned logit per attention head in every softmax's denominator (gpt-oss's `sinks`)
    attention_sinks: bool = False
    # Image-in models (LLaVA, Qwen2.5-VL): the top-level config.json (vision_config,
    # image_token_index, ...); the fields above then describe its language model (text_config, or
    # the top level in Qwen2.5-VL's hub layout). None: a text-only model.
    multimodal: dict[str, Any] | None = None
    # Multimodal rotary (Qwen2.5-VL's M-RoPE): rotary frequency pairs per (temporal, height,
    # width) section, e.g. (16, 24, 24); () for 1D rope.
    mrope_section: tuple[int, ...] = ()

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    def layer_window(self, layer: int) -> int:
        """The layer's sliding window (0: full attention)."""
        if self.sliding_window is None:
            return 0
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return 0
        return self.sliding_window

    @property
    def uniform_sliding_window(self) -> int:
        """The window when EVERY layer slides (Mistral with a sliding window), else 0: only then
        can a sequence's blocks that fell out of the window be freed (services/worker/
        block_manager.py); a model with full-attention layers (Gemma 2/3, gpt-oss) keeps them all."""
        windows = {self.layer_window(i) for i in range(self.num_layers)}
        return windows.pop() if len(windows) == 1 else 0

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelConfigError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    return data


def _moe_fields(cfg: dict[str, Any], model_type: str) -> dict[str, Any]:
    """The mixture-of-experts fields of Qwen3-MoE, Mixtral and gpt-oss configs (both spellings of
    the expert count: `num_experts` in Qwen's checkpoints, `num_local_experts` in Mixtral's,
    gpt-oss's and transformers 5's Qwen3-MoE configs)."""
    if model_type not in ("qwen3_moe", "mixtral", "gpt_oss"):
        return {}
    num_layers = int(cfg["num_hidden_layers"])
    if model_type in ("mixtral", "gpt_oss"):
        return {
            "num_experts": int(cfg["num_local_experts"]),
            "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
            "moe_intermediate_size": int(cfg["intermediate_size"]),
            # softmax over the top-k logits = renormalised top-k of the softmax (gpt-oss's router:
            # models/gpt_oss.py)
            "norm_topk_prob": True,
        }
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    only_mlp = {int(i) for i in cfg.get("mlp_only_layers") or []}
    return {
        "num_experts": int(cfg.get("num_experts") or cfg["num_local_experts"]),
        "num_experts_per_tok": int(cfg["num_experts_per_tok"]),
        "moe_intermediate_size": int(cfg["moe_intermediate_size"]),
        "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
        "dense_layers": tuple(i for i in range(num_layers) if i in only_mlp or (i + 1) % step != 0),
    }


def _normalise_scaling(scaling: dict[str, Any] | None, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """{"rope_type": ..., ...} with the context lengths YaRN / LongRoPE / dynamic NTK need filled in
    from the top-level config (Phi-3 keeps `original_max_position_embeddings` there); None for
    plain rope."""
    if scaling is None:
        return None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "su":  # the old name of longrope
        rope_type = "longrope"
    scaling["rope_type"] = rope_type
    if rope_type in ("default", "mrope"):  # M-RoPE's frequencies are the default ones (mrope_section)
        return None
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    if rope_type in ("yarn", "longrope", "dynamic"):
        original = scaling.get("original_max_position_embeddings") or cfg.get(
            "original_max_position_embeddings"
        )
        scaling["original_max_position_embeddings"] = int(original or max_pos)
        if rope_type == "longrope" and cfg.get("original_max_position_embeddings"):
            # transformers: the attention factor of Phi-3 comes from the ratio of the two lengths
            scaling["factor"] = max_pos / int(cfg["original_max_position_embeddings"])
        elif scaling.get("factor") is None:
            scaling["factor"] = max_pos / scaling["original_max_position_embeddings"]
    return scaling


def _rope_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """rope_theta / rope_scaling (global layers) and the sliding layers' own rope where it differs:
    transformers 5 nests `rope_parameters` per layer type, 4.x has `rope_local_base_freq` (Gemma 3)."""
    rope = cfg.get("rope_parameters") or {}
    local: dict[str, Any] | None = None
    if "full_attention" in rope or "sliding_attention" in rope:
        local = rope.get("sliding_attention")
        rope = rope.get("full_attention") or {}
    if float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise ModelConfigError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and rope:
        scaling = dict(rope)
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    fields: dict[str, Any] = {"rope_theta": theta, "rope_scaling": _normalise_scaling(scaling, cfg)}
    section = (scaling or {}).get("mrope_section")
    if section:
        fields["mrope_section"] = tuple(int(v) for v in section)
    if local is not None:
        fields["rope_local_theta"] = float(local.get("rope_theta", theta))
        fields["rope_local_scaling"] = _normalise_scaling(dict(local), cfg)
    elif cfg.get("rope_local_base_freq"):
        fields["rope_local_theta"] = float(cfg["rope_local_base_freq"])
    return fields


def _layer_types(cfg: dict[str, Any], model_type: str, num_layers: int) -> tuple[str, ...]:
    """Which layers slide: config.json's `layer_types`, else the family's pattern (Gemma 2: every
    other layer from the first; Gemma 3: five local then one global), else () (all alike)."""
    types = cfg.get("layer_types")
    if types:
        return tuple(str(t) for t in types)
    if model_type == "gemma2":
        return tuple("sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers))
    if model_type == "gemma3_text":
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        return tuple(
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)
        )
    return ()


# Language models with Qwen2's attention (bias on q, k, v; none on o_proj), by model_type
_QWEN2_TYPES = ("qwen2", "qwen2_5_vl", "qwen2_5_vl_text")

# Harmony's end of a tool-call message: generation stops there for the caller to run the tool
# (gpt-oss ships it as a special token but lists only <|return|> and <|endoftext|> as EOS).
HARMONY_CALL_TOKEN = "<|call|>"


def _harmony_stop_ids(root: Path) -> list[int]:
    """The id of `<|call|>` in the model directory's tokenizer (tokenizer_config.json's added
    tokens, else tokenizer.json's), or none."""
    for name, key in (("tokenizer_config.json", "added_tokens_decoder"), ("tokenizer.json", "added_tokens")):
        path = root / name
        if not path.is_file():
            continue
        tokens = _read_json(path).get(key) or {}
        entries = tokens.items() if isinstance(tokens, dict) else ((t.get("id"), t) for t in tokens)
        for token_id, entry in entries:
            if isinstance(entry, dict) and entry.get("content") == HARMONY_CALL_TOKEN:
                return [int(token_id)]
    return []


def causal_lm_architecture(architecture: str) -> str:
    """A checkpoint saved as the base model ("Qwen3Model": transformers' AutoModel, as embedding
    models such as Qwen3-Embedding often are) holds the causal LM's decoder: it is served as that
    family ("Qwen3ForCausalLM"), by an embed worker without an LM head (loader.py)."""
    if architecture.endswith("Model") and not architecture.endswith("PreTrainedModel"):
        return architecture.removesuffix("Model") + "ForCausalLM"
    return architecture


def load_model_config(model_dir: str) -> ModelConfig:
    """Read config.json (and generation_config.json when present) of a model directory."""
    root = Path(model_dir)
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        raise ModelConfigError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    cfg = _read_json(cfg_path)
    archs = cfg.get("architectures") or []
    if not archs:
        raise ModelConfigError(f"{cfg_path}: no 'architectures' entry")
    multimodal: dict[str, Any] | None = None
    if isinstance(cfg.get("text_config"), dict) and isinstance(cfg.get("vision_config"), dict):
        # LLaVA-style: the language model's fields come from text_config (see models/llava.py)
        multimodal, cfg = cfg, {**cfg["text_config"], "eos_token_id": cfg["text_config"].get("eos_token_id")}
        cfg.setdefault("tie_word_embeddings", multimodal.get("tie_word_embeddings", False))
    elif cfg.get("model_type") == "qwen2_5_vl" and isinstance(cfg.get("vision_config"), dict):
        multimodal = cfg  # Qwen2.5-VL's hub layout: the language model's fields at the top level
    model_type = str(cfg.get("model_type", ""))
    if model_type == "gemma3":  # a multimodal Gemma 3 config: its text model
        raise ModelConfigError(
            f"{cfg_path}: Gemma 3 with a vision tower ({archs[0]}) is not supported; "
            "serve a text-only checkpoint (Gemma3ForCausalLM)"
        )
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    use_sw = cfg.get("use_sliding_window", True)
    sliding_window = cfg.get("sliding_window") if use_sw else None
    eos = _as_ids(cfg.get("eos_token_id"))
    gen_path = root / "generation_config.json"
    if gen_path.is_file():
        eos += [i for i in _as_ids(_read_json(gen_path).get("eos_token_id")) if i not in eos]
    if model_type == "gpt_oss":
        eos += [i for i in _harmony_stop_ids(root) if i not in eos]
    try:
        return ModelConfig(
            path=str(root),
            architecture=causal_lm_architecture(str(archs[0])),
            model_type=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type in _QWEN2_TYPES or bool(cfg.get("attention_bias", False)),
            o_proj_bias=model_type not in _QWEN2_TYPES and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            sliding_window=int(sliding_window) if sliding_window else None,
            eos_token_ids=tuple(eos),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            layer_types=_layer_types(cfg, model_type, int(cfg["num_hidden_layers"])),
            attn_logit_softcapping=float(cfg.get("attn_logit_softcapping") or 0.0),
            final_logit_softcapping=float(cfg.get("final_logit_softcapping") or 0.0),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or 0.0),
            hidden_act=str(cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"),
            attention_sinks=model_type == "gpt_oss",
            **_rope_fields(cfg),
            **_moe_fields(cfg, model_type),
            multimodal=multimodal,
        )
    except KeyError as exc:
        raise ModelConfigError(f"{cfg_path}: missing key {exc.args[0]!r}") from None
