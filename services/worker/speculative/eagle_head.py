"""EAGLE draft heads: the checkpoint layouts, what is refused, the module and its weights.

Two published layouts (vLLM's llama_eagle.py and llama_eagle3.py read the same checkpoints):

EAGLE-1/2 (`architectures` LlamaForCausalLM / EagleLlamaForCausalLM; `fc.weight` [H, 2H],
`layers.0.*`). At position i the head reads the pair (token i + 1, feature i):

    x = fc(concat(embed(token), feature))   feature: the target's final hidden state (after its norm)
    layers.0 .. : Llama decoder layers; layer 0 has no input norm (EAGLE's cnets.py)
    out = h + residual                      no final norm
    logits = the target's lm_head(out); the next position's feature is `out`

  The embedding and the LM head are the target's (a checkpoint's copies are ignored).

EAGLE-3 (`architectures` LlamaForCausalLMEagle3 / Eagle3LlamaForCausalLM; `midlayer.*`, `fc.weight`
[H, n * H_target], `norm`, `lm_head` over a draft vocabulary, `d2t`):

    hidden = fc(concat(aux_1 .. aux_n))     aux_j: the target's residual stream entering layer l_j
    x = concat(input_layernorm(embed(token)), hidden_norm(hidden))   qkv reads 2H columns
    residual = hidden (hidden_norm(hidden) with norm_before_residual); post-attention norm; MLP
    prenorm = h + residual; logits = lm_head(norm(prenorm)) over the draft vocabulary, draft
    token d being target token d + d2t[d]; the next position's hidden is `prenorm` (fc only
    combines the target's states)

  l_j: `eagle_aux_hidden_state_layer_ids` of config.json (top level or in `eagle_config`), else
  vLLM's default (2, L // 2, L - 3) for a target of L layers. The embedding is the checkpoint's
  `embed_tokens` when it has one, else the target's.

Refused at start-up (ModelConfigError naming --speculative-model): a hidden size or vocabulary
that is not the target's, a `d2t` that maps outside the target's vocabulary, aux layers outside
the target, variants this module does not compute (HASS's add_para_norm, EAGLE-3 without aux
states, the `speculators` format), and tensors that are missing, unexpected or misshapen.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kernels import KernelOps
from services.worker.checkpoint import WeightLoadError, iter_checkpoint
from services.worker.layers.attention import AttentionMetadata, RMSNorm
from services.worker.layers.linear import Linear
from services.worker.loader import materialize
from services.worker.model_config import ModelConfig, ModelConfigError
from services.worker.models.llama import MLP, Attention
from services.worker.parallel import shard_layout

EAGLE1_ARCHITECTURES = ("LlamaForCausalLM", "EagleLlamaForCausalLM", "LlamaForCausalLMEagle")
EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


@dataclass(frozen=True)
class EagleLayout:
    eagle3: bool
    aux_layers: tuple[int, ...]  # EAGLE-3: the target layers whose input streams feed fc (ascending)
    feature_size: int  # width of the target features one position gives the head
    draft_vocab_size: int  # rows of the head's own lm_head (EAGLE-3); the target's vocabulary (EAGLE-1)
    fc_bias: bool
    own_embedding: bool  # EAGLE-3 checkpoints that carry embed_tokens
    norm_before_residual: bool


def read_layout(cfg: ModelConfig, target: ModelConfig, load_format: str = "auto") -> EagleLayout:
    """The head's layout from its config.json and tensor names (`dummy`: config.json alone, the
    layout its architecture names), or a ModelConfigError saying why it cannot serve `target`."""
    where = f"--speculative-model {cfg.path}"
    raw: dict[str, Any] = json.loads((Path(cfg.path) / "config.json").read_text())
    arch = str((raw.get("architectures") or [""])[0])
    names = _tensor_names(cfg.path, where) if load_format != "dummy" else {"fc.weight"}
    eagle3 = arch in EAGLE3_ARCHITECTURES or any(
        n.startswith("layers.0.hidden_norm") or n == "d2t" for n in names
    )
    if not eagle3 and arch not in EAGLE1_ARCHITECTURES:
        raise ModelConfigError(
            f"{where}: architecture {arch!r} is not an EAGLE head this worker reads "
            f"(EAGLE-1/2: {', '.join(EAGLE1_ARCHITECTURES)}; EAGLE-3: {', '.join(EAGLE3_ARCHITECTURES)}; "
            "the `speculators` format is not supported)"
        )
    if "fc.weight" not in names:
        raise ModelConfigError(f"{where}: no fc.weight: not an EAGLE head checkpoint")
    if raw.get("add_para_norm"):
        raise ModelConfigError(f"{where}: HASS heads (add_para_norm) are not supported")
    if cfg.vocab_size != target.vocab_size:
        raise ModelConfigError(
            f"{where}: the head's vocabulary has {cfg.vocab_size} tokens, the target's {target.vocab_size}; "
            "an EAGLE head must be trained for the target model"
        )
    if not eagle3:
        if cfg.hidden_size != target.hidden_size:
            raise ModelConfigError(
                f"{where}: the head's hidden size is {cfg.hidden_size}, the target's {target.hidden_size}; "
                "an EAGLE head reads the target's hidden states and shares its embedding and LM head"
            )
        return EagleLayout(
            eagle3=False,
            aux_layers=(),
            feature_size=target.hidden_size,
            draft_vocab_size=target.vocab_size,
            fc_bias="fc.bias" in names,
            own_embedding=False,
            norm_before_residual=False,
        )
    eagle_config = raw.get("eagle_config") or {}
    if eagle_config.get("use_aux_hidden_state") is False:
        raise ModelConfigError(f"{where}: EAGLE-3 heads without aux hidden states are not supported")
    target_hidden = int(raw.get("target_hidden_size") or cfg.hidden_size)
    if target_hidden != target.hidden_size:
        raise ModelConfigError(
            f"{where}: the head reads hidden states of size {target_hidden}, the target's are "
            f"{target.hidden_size}; an EAGLE head must be trained for the target model"
        )
    own_embedding = "embed_tokens.weight" in names
    if not own_embedding and cfg.hidden_size != target.hidden_size:
        raise ModelConfigError(
            f"{where}: the head's hidden size is {cfg.hidden_size}, the target's {target.hidden_size}, and "
            "it has no embed_tokens of its own to use instead of the target's"
        )
    ids = raw.get("eagle_aux_hidden_state_layer_ids") or eagle_config.get("eagle_aux_hidden_state_layer_ids")
    layers = target.num_layers
    aux = sorted({int(i) for i in ids}) if ids else [2, layers // 2, layers - 3]
    if len(set(aux)) != len(aux) or not all(0 <= i < layers for i in aux):
        raise ModelConfigError(
            f"{where}: aux hidden-state layers {aux} do not name distinct layers of the target's {layers} "
            "(set eagle_aux_hidden_state_layer_ids in the head's config.json)"
        )
    draft_vocab = int(raw.get("draft_vocab_size") or cfg.vocab_size)
    if draft_vocab > target.vocab_size:
        raise ModelConfigError(
            f"{where}: draft vocabulary of {draft_vocab} tokens exceeds the target's {target.vocab_size}"
        )
    return EagleLayout(
        eagle3=True,
        aux_layers=tuple(aux),
        feature_size=len(aux) * target_hidden,
        draft_vocab_size=draft_vocab,
        fc_bias="fc.bias" in names,
        own_embedding=own_embedding,
        norm_before_residual=bool(raw.get("norm_before_residual", False)),
    )


def _tensor_names(path: str, where: str) -> set[str]:
    try:
        return {_canonical(name) for _, name, _ in iter_checkpoint(path)}
    except WeightLoadError as exc:
        raise ModelConfigError(f"{where}: {exc}") from None


def _canonical(name: str) -> str:
    """Checkpoint names as this module's: `midlayer.` is layer 0, a leading `model.` goes."""
    name = name.removeprefix("model.")
    return "layers.0." + name.removeprefix("midlayer.") if name.startswith("midlayer.") else name


class _HeadLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, index: int, eagle3: bool) -> None:
        super().__init__()
        layout = shard_layout(cfg)
        self.self_attn = Attention(cfg, ops, index, layout)
        if eagle3 and index == 0:  # qkv reads concat(normed embedding, normed hidden)
            out = self.self_attn.q_size + 2 * self.self_attn.kv_size
            self.self_attn.qkv_proj = Linear(ops, 2 * cfg.hidden_size, out, bias=cfg.attention_bias)
            self.hidden_norm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, ops, layout)
        self.input_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)


class EagleHead(nn.Module):
    """The head's parameters (not the target's it shares) and its forward over (token, hidden) pairs."""

    d2t: torch.Tensor  # EAGLE-3: [draft vocabulary] int64, target id = draft id + d2t[draft id]

    def __init__(
        self,
        cfg: ModelConfig,
        layout: EagleLayout,
        ops: KernelOps,
        target_embed: Callable[[torch.Tensor], torch.Tensor],
        target_logits: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        super().__init__()
        self.cfg, self.layout = cfg, layout
        hidden = cfg.hidden_size
        fc_in = 2 * hidden if not layout.eagle3 else layout.feature_size
        self.fc = Linear(ops, fc_in, hidden, bias=layout.fc_bias)
        self.layers = nn.ModuleList(_HeadLayer(cfg, ops, i, layout.eagle3) for i in range(cfg.num_layers))
        self.norm: RMSNorm | None = None
        self.lm_head: Linear | None = None
        self.embed_tokens: nn.Embedding | None = None
        if layout.eagle3:
            self.norm = RMSNorm(ops, hidden, cfg.rms_norm_eps)
            self.lm_head = Linear(ops, hidden, layout.draft_vocab_size, bias=False)
            self.register_buffer("d2t", torch.zeros(layout.draft_vocab_size, dtype=torch.int64))
            if layout.own_embedding:
                self.embed_tokens = nn.Embedding(cfg.vocab_size, hidden)
        # the target's modules, called, never owned (their parameters are not the head's)
        self._target_embed, self._target_logits = target_embed, target_logits
        self.vocab_size = cfg.vocab_size
        self._draft_ids: torch.Tensor | None = None  # EAGLE-3: target id of each draft-vocab logit

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn for layer in self.layers]  # type: ignore[misc]

    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features [T, F] as the head's input hidden [T, H] (EAGLE-3: fc over the
        aux streams; EAGLE-1 concatenates them with the embedding inside `forward`)."""
        return self.fc(features) if self.layout.eagle3 else features

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """[T] tokens and [T, H] hidden (`combine`d target features, or the head's own outputs) ->
        [T, H] outputs before any final norm: the next position's hidden, and `compute_logits`' input."""
        embed = (
            self.embed_tokens(input_ids) if self.embed_tokens is not None else self._target_embed(input_ids)
        )
        h = hidden
        residual = hidden
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, _HeadLayer)
            if i == 0 and not self.layout.eagle3:
                x = self.fc(torch.cat([embed.to(hidden.dtype), hidden], dim=-1))
                residual = x  # (no input norm on layer 0)
            elif i == 0:
                normed = layer.hidden_norm(hidden)
                residual = normed if self.layout.norm_before_residual else hidden
                x = torch.cat([layer.input_layernorm(embed.to(hidden.dtype)), normed], dim=-1)
            else:
                x, residual = layer.input_layernorm.add_and_norm(h, residual)
            h = layer.self_attn(x, meta)
            x, residual = layer.post_attention_layernorm.add_and_norm(h, residual)
            h = layer.mlp(x)
        return h + residual

    def compute_logits(self, out: torch.Tensor) -> torch.Tensor:
        """[B, H] outputs -> [B, target vocabulary] float32 logits (EAGLE-3: -inf off the draft vocabulary)."""
        if not self.layout.eagle3:
            return self._target_logits(out).float()
        assert self.norm is not None and self.lm_head is not None
        logits = self.lm_head(self.norm(out)).float()
        if self._draft_ids is None:
            self._draft_ids = torch.arange(self.layout.draft_vocab_size, device=out.device) + self.d2t
        full = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        full[:, self._draft_ids] = logits
        return full

    # ---- weights ----------------------------------------------------------------------------
    def load(self, path: str) -> None:
        """The checkpoint's tensors into the head's parameters; every one must be there."""
        where = f"--speculative-model {path}"
        params: dict[str, torch.Tensor] = dict(self.named_parameters())
        if self.layout.eagle3:
            params["d2t"] = self.d2t
        ignored = {"t2d"}
        if not self.layout.eagle3:  # the target's embedding and LM head; layer 0 has no input norm
            ignored |= {"embed_tokens.weight", "lm_head.weight", "layers.0.input_layernorm.weight"}
        fused = {
            "q_proj": ("qkv_proj", 0),
            "k_proj": ("qkv_proj", 1),
            "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0),
            "up_proj": ("gate_up_proj", 1),
        }
        loaded: set[str] = set()
        with torch.no_grad():
            if self.layout.eagle3:
                self.d2t.zero_()  # (optional when the draft vocabulary is the target's)
            for _, raw_name, tensor in iter_checkpoint(path):
                name = _canonical(raw_name)
                if name in ignored:
                    continue
                parts = name.split(".")
                shard: int | None = None
                if len(parts) >= 2 and parts[-2] in fused:
                    parts[-2], shard = fused[parts[-2]]
                dest_name = ".".join(parts)
                dest = params.get(dest_name)
                if dest is None:
                    raise WeightLoadError(f"{where}: unexpected tensor {raw_name!r} for this EAGLE layout")
                value = tensor.read(0, 0, tensor.shape[0] if tensor.shape else 0)
                if shard is not None:
                    dest = self._shard_of(dest_name, dest, shard)
                if tuple(value.shape) != tuple(dest.shape):
                    raise WeightLoadError(
                        f"{where}: {raw_name} has shape {tuple(value.shape)}, this head expects {tuple(dest.shape)}"
                    )
                dest.copy_(value)
                loaded.add(dest_name if shard is None else f"{dest_name}#{shard}")
        expected = set()
        for name in params:
            owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
            shards = {"qkv_proj": 3, "gate_up_proj": 2}.get(owner, 0)
            expected |= {f"{name}#{s}" for s in range(shards)} if shards else {name}
        if not self.layout.eagle3:
            expected.discard("layers.0.input_layernorm.weight")
        elif self.layout.draft_vocab_size == self.vocab_size:
            expected.discard("d2t")
        missing = sorted(expected - loaded)
        if missing:
            raise WeightLoadError(f"{where}: missing tensors {', '.join(missing[:6])}")
        self._check_d2t(where)

    def _shard_of(self, name: str, param: torch.Tensor, shard: int) -> torch.Tensor:
        """The rows of fused q/k/v or gate/up that checkpoint tensor `shard` fills."""
        layer = self.layers[int(name.split(".")[1])]
        assert isinstance(layer, _HeadLayer)
        if ".qkv_proj." in name:
            attn = layer.self_attn
            sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        else:
            half = param.shape[0] // 2
            sizes = [half, half]
        start = sum(sizes[:shard])
        return param.narrow(0, start, sizes[shard])

    def _check_d2t(self, where: str) -> None:
        if not self.layout.eagle3:
            return
        ids = torch.arange(self.layout.draft_vocab_size) + self.d2t.cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ModelConfigError(
                f"{where}: d2t maps draft tokens to ids outside the target's vocabulary of {self.vocab_size}"
            )

    @torch.no_grad()
    def init_dummy(self, seed: int) -> None:
        """Random weights (--load-format dummy, benchmarks): small normal matrices, unit norms,
        zero biases, the identity draft vocabulary."""
        device = self.fc.weight.device
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen, device=device) * 0.02)
        if self.layout.eagle3:
            self.d2t.zero_()


def build_head(
    cfg: ModelConfig,
    layout: EagleLayout,
    ops: KernelOps,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str,
    seed: int,
    target_embed: Callable[[torch.Tensor], torch.Tensor],
    target_logits: Callable[[torch.Tensor], torch.Tensor],
) -> EagleHead:
    """The head on `device` in `dtype`, its weights from the checkpoint (or random: dummy)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):  # no host copy of the weights, no initialisation to throw away
            head = EagleHead(cfg, layout, ops, target_embed, target_logits)
    finally:
        torch.set_default_dtype(old)
    head = materialize(head, device)
    if load_format == "dummy":
        head.init_dummy(seed)
    else:
        head.load(cfg.path)
    return head.eval()
