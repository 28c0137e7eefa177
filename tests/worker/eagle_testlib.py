"""EAGLE head checkpoints in the published layouts (config.json + model.safetensors), written for a
tiny target, and an independent reference of the head's greedy drafts computed from transformers'
hidden states by full recomputation (no paged cache, none of the worker's code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

# EAGLE-3 heads of these tests read stories260K's layers 1, 2 and 4 (its 5 layers make vLLM's
# default (2, L // 2, L - 3) name layer 2 three times)
EAGLE3_AUX_LAYERS = [4, 1, 2]


def head_config(target_dir: Path, eagle3: bool, **extra: Any) -> dict[str, Any]:
    target = json.loads((target_dir / "config.json").read_text())
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "max_position_embeddings",
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
    )
    cfg = {k: target[k] for k in keys if k in target}
    cfg.update(
        architectures=["LlamaForCausalLMEagle3" if eagle3 else "LlamaForCausalLM"],
        model_type="llama",
        num_hidden_layers=1,
        hidden_act="silu",
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    cfg.update(extra)
    return cfg


def random_head_tensors(
    cfg: dict[str, Any], eagle3: bool, seed: int, num_aux: int = 3, scale: float = 0.3
) -> dict[str, torch.Tensor]:
    """Random weights under the checkpoint names of the layout (EAGLE-1: `layers.0.*` with an fc
    bias and the copy of the embedding the original checkpoints carry; EAGLE-3: `midlayer.*`,
    `d2t` / `t2d` over a draft vocabulary)."""
    gen = torch.Generator().manual_seed(seed)
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * scale / shape[-1] ** 0.5 * 4

    def norm() -> torch.Tensor:
        return torch.rand(h, generator=gen) + 0.5

    prefix = "midlayer." if eagle3 else "layers.0."
    qkv_in = 2 * h if eagle3 else h
    t = {
        f"{prefix}self_attn.q_proj.weight": rnd(q, qkv_in),
        f"{prefix}self_attn.k_proj.weight": rnd(kv, qkv_in),
        f"{prefix}self_attn.v_proj.weight": rnd(kv, qkv_in),
        f"{prefix}self_attn.o_proj.weight": rnd(h, q),
        f"{prefix}mlp.gate_proj.weight": rnd(inter, h),
        f"{prefix}mlp.up_proj.weight": rnd(inter, h),
        f"{prefix}mlp.down_proj.weight": rnd(h, inter),
        f"{prefix}post_attention_layernorm.weight": norm(),
    }
    if eagle3:
        draft_vocab = cfg.get("draft_vocab_size", vocab)
        target_ids = torch.randperm(vocab, generator=gen)[:draft_vocab].sort().values
        t |= {
            "fc.weight": rnd(h, num_aux * h),
            f"{prefix}input_layernorm.weight": norm(),
            f"{prefix}hidden_norm.weight": norm(),
            "norm.weight": norm(),
            "lm_head.weight": rnd(draft_vocab, h) * 3,
            "d2t": target_ids - torch.arange(draft_vocab),
            "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill(0, target_ids, True),
        }
    else:
        t |= {
            "fc.weight": rnd(h, 2 * h),
            "fc.bias": torch.randn(h, generator=gen) * 0.1,
            "embed_tokens.weight": torch.zeros(vocab, h),  # (ignored: the target's is used)
        }
    return t


def write_head(path: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


# ---- the reference ------------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _head_forward(
    w: dict[str, torch.Tensor], cfg: dict[str, Any], eagle3: bool, embeds: torch.Tensor, hidden: torch.Tensor
) -> torch.Tensor:
    """The head over positions 0..T-1 at once (causal attention, no cache): [T, H] outputs."""
    p = "midlayer." if eagle3 else "layers.0."
    eps = cfg["rms_norm_eps"]
    n_heads, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    if eagle3:
        residual = hidden
        x = torch.cat(
            [
                _rms(embeds, w[f"{p}input_layernorm.weight"], eps),
                _rms(hidden, w[f"{p}hidden_norm.weight"], eps),
            ],
            -1,
        )
    else:
        x = torch.cat([embeds, hidden], -1) @ w["fc.weight"].T + w["fc.bias"]
        residual = x
    t = x.shape[0]
    qh = (x @ w[f"{p}self_attn.q_proj.weight"].T).view(t, n_heads, d).transpose(0, 1)
    kh = (x @ w[f"{p}self_attn.k_proj.weight"].T).view(t, n_kv, d).transpose(0, 1)
    vh = (x @ w[f"{p}self_attn.v_proj.weight"].T).view(t, n_kv, d).transpose(0, 1)
    inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (torch.arange(0, d, 2).float() / d))
    angles = torch.arange(t).float()[:, None] * inv[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    qh, kh = _rotate(qh, cos, sin), _rotate(kh, cos, sin)
    kh, vh = kh.repeat_interleave(n_heads // n_kv, 0), vh.repeat_interleave(n_heads // n_kv, 0)
    scores = qh @ kh.transpose(1, 2) / d**0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ vh).transpose(0, 1).reshape(t, n_heads * d)
    residual = residual + attn @ w[f"{p}self_attn.o_proj.weight"].T
    x = _rms(residual, w[f"{p}post_attention_layernorm.weight"], eps)
    mlp = torch.nn.functional.silu(x @ w[f"{p}mlp.gate_proj.weight"].T) * (x @ w[f"{p}mlp.up_proj.weight"].T)
    return residual + mlp @ w[f"{p}mlp.down_proj.weight"].T


@torch.no_grad()
def reference_drafts(
    target: Any,
    head_dir: Path,
    tokens: list[int],
    k: int,
    aux_layers: list[int],
    zero_features: bool = False,
    missing: int = 0,
) -> list[int]:
    """The head's K greedy drafts after `tokens`, from the transformers target's hidden states: pair
    i = (token i + 1, feature i) for i = 0..n-2, then each draft and the head's own output chained.
    `zero_features`: zeros for all the target's features (a negative control); `missing`: zeros for
    those of positions 0..missing-1 (positions the target did not compute: a prefix-cache hit)."""
    cfg = json.loads((head_dir / "config.json").read_text())
    w = {
        n: t.float() if t.is_floating_point() else t
        for n, t in load_file(str(head_dir / "model.safetensors")).items()
    }
    eagle3 = "d2t" in w
    ids = torch.tensor([tokens[:-1]])
    out = target.model(ids, output_hidden_states=True)
    if eagle3:
        features = torch.cat([out.hidden_states[j][0] for j in sorted(aux_layers)], -1)
    else:
        features = out.last_hidden_state[0]
    features = features.clone()
    features[: len(features) if zero_features else missing] = 0.0
    hidden = features @ w["fc.weight"].T if eagle3 else features
    embed = target.model.embed_tokens
    inputs = list(tokens[1:])
    drafts: list[int] = []
    for _ in range(k):
        h = _head_forward(w, cfg, eagle3, embed(torch.tensor(inputs)), hidden)
        last = h[-1]
        if eagle3:
            logits = _rms(last, w["norm.weight"], cfg["rms_norm_eps"]) @ w["lm_head.weight"].T
            d = int(logits.argmax())
            token = d + int(w["d2t"][d])
        else:
            token = int(target.lm_head(last).argmax())
        drafts.append(token)
        inputs.append(token)
        hidden = torch.cat([hidden, last[None]])
    return drafts


def copy_target_and_head(target_dir: Path, head_dir: Path, noise: float, seed: int = 0) -> None:
    """A one-layer Llama target and an EAGLE-1 head that computes it: the head at position i reads
    (token i + 1, feature i) and, with fc = [I, 0] and the target's layer as its own, gives the
    target's output at position i + 1, i.e. its next token (`noise` > 0: a head that often, not
    always, agrees). For the copy to be exact the target's attention adds nothing (o_proj = 0: the
    head never sees token 0, which the target attends to), its embedding rows have unit RMS and its
    input / final norms are ones (layer 0 of an EAGLE head has no input norm, and no final norm:
    a positive scale of the logits keeps their argmax)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    layer = model.model.layers[0]
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(emb / emb.pow(2).mean(-1, keepdim=True).sqrt())
        layer.self_attn.o_proj.weight.zero_()
        layer.post_attention_layernorm.weight.copy_(torch.rand(64) + 0.5)
    model.save_pretrained(str(target_dir))
    gen = torch.Generator().manual_seed(seed + 1)
    tensors = {f"layers.0.{name}": p.detach().clone() for name, p in layer.named_parameters()}
    tensors["fc.weight"] = torch.cat([torch.eye(64), torch.zeros(64, 64)], dim=1)
    tensors["fc.bias"] = torch.zeros(64)
    for name, t in tensors.items():
        if noise and name.endswith("proj.weight"):
            t.add_(torch.randn(t.shape, generator=gen) * t.std() * noise)
    head = head_config(target_dir, eagle3=False)
    write_head(head_dir, head, tensors)
