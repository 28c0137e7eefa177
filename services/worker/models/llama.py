"""The Llama family (Llama 2 / 3.x, Mistral), parametrised so that Qwen2
(qkv bias) and Qwen3 (q/k RMSNorm) are the same module with a flag.

Parameter names follow Hugging Face's, except that q/k/v are one fused `qkv_proj` and gate/up
one fused `gate_up_proj`; `STACKED_PARAMS` tells the loader where each checkpoint tensor goes.

Two forwards share every module: the plain one (RMSNorm kernels before qkv and gate/up, as in
HF), and the "folded norms" one chosen by `LlamaModel.norms_folded` (see `fold_norms`), in which
each layer's two norm weights live inside the next projection's weight and the per-row 1/rms is
computed by the ops that read the raw residual stream; the two RMSNorm kernels of every layer go.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar, cast

import torch
from torch import nn

from kernels import KernelOps, build_rope_cache
from kernels.ops import QuantFusion
from services.common import switches
from services.worker import pipeline
from services.worker.layers.attention import AttentionMetadata, PagedAttention, RMSNorm
from services.worker.layers.linear import Linear, RowParallelLinear
from services.worker.layers.moe import MoeLayer, SparseMoeBlock
from services.worker.layers.vocab_parallel import VocabParallelEmbedding
from services.worker.model_config import ModelConfig
from services.worker.parallel import ShardLayout, all_gather_last_dim, shard_layout

if TYPE_CHECKING:
    from services.worker.checkpoint import CheckpointTensor
    from services.worker.layers.lora import LoRAMapping
    from services.worker.tp_group import StepDriver

M = TypeVar("M", bound=nn.Module)

# Steps of at most this many tokens take the folded forward (the CUDA-graph logits ladder's top).
FOLDED_MAX_TOKENS = 8
# Rows of a projection folded at a time (bounds the fp32 temporary of `DecoderLayer.fold_norms`).
_FOLD_ROWS = 4096


def quant_fusions(projection: str, folded: bool) -> tuple[QuantFusion, ...]:
    """The fused GEMM variants a decode step runs for a quantized projection, by name (what the
    engine tunes: kernel_tuning._tune_quant_linears). Folded norms: qkv takes the norm weight (its
    1/rms in the decode attention kernel, or in the GEMM where that kernel cannot), gate/up the norm
    weight, the 1/rms and SiLU-and-mul, o and down the residual add. Unfolded (qkv bias, q/k norms):
    gate/up's SiLU-and-mul (`Linear.linear_silu_and_mul`, as the bf16 unfolded path)."""
    if not folded:
        return (QuantFusion(gated=True),) if projection == "gate_up_proj" else ()
    return {
        "qkv_proj": (QuantFusion(norm=True), QuantFusion(norm=True, rms=True)),
        "gate_up_proj": (QuantFusion(norm=True, rms=True, gated=True),),
        "o_proj": (QuantFusion(residual=True),),
        "down_proj": (QuantFusion(residual=True),),
    }.get(projection, ())


# (fused parameter, checkpoint name, shard id)
STACKED_PARAMS: tuple[tuple[str, str, str], ...] = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", "gate"),
    ("gate_up_proj", "up_proj", "up"),
)


class Attention(nn.Module):
    def __init__(
        self, cfg: ModelConfig, ops: KernelOps, layer: int = 0, layout: ShardLayout | None = None
    ) -> None:
        super().__init__()
        self.ops = ops
        layout = layout or shard_layout(cfg)
        # This rank's heads (all of them with T = 1): qkv is column-parallel, o_proj row-parallel.
        self.num_heads, self.num_kv_heads, self.head_dim = layout.num_heads, layout.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(ops, cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(ops, self.q_size, cfg.hidden_size, cfg.o_proj_bias, layout.tp_size)
        self.q_norm = RMSNorm(ops, cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(ops, cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attn = PagedAttention(
            ops,
            self.num_heads,
            self.num_kv_heads,
            cfg.head_dim,
            scale=cfg.attention_scale,
            sliding_window=cfg.layer_window(layer),
            soft_cap=cfg.attn_logit_softcapping,
            sinks=cfg.attention_sinks,
        )

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:  # x: [T, hidden] normed
        # Without q/k norms the next kernel is the (rotary +) attention kernel: it may launch as
        # soon as the qkv GEMM runs, its pre-wait loads (block table, cached K/V) overlapping it.
        qkv = self.qkv_proj(x, early_signal=self.q_norm is None)
        return self.o_proj(self._attend(qkv, meta))

    def forward_folded(
        self, h: torch.Tensor, norm: RMSNorm, meta: AttentionMetadata, norm_in_gemm: bool = False
    ) -> torch.Tensor:
        """h + attention(norm(h)) for the raw residual stream h [T, hidden], the input norm's
        weight folded into qkv_proj (`norm`'s is ones) or, quantized (`norm_in_gemm`), applied
        to h inside its GEMM (`norm` keeps it): the norm is the qkv op's per-row scale, the add
        o_proj's. Adapters (LoRA) fold the norm's weight into their A (full precision) or read h
        times it (quantized) and add to qkv_proj's and o_proj's outputs like the base weights do."""
        eps = norm.eps
        norm_weight = norm.weight if norm_in_gemm else None
        if (
            self.q_norm is None
            and self.qkv_proj.bias is None
            and self.ops.attention_scales_rms(meta.max_seqlen_q, self.head_dim, h.dtype, h.shape[0])
        ):
            # A decode step: the attention kernel scales q/k/v by h's 1/rms (before its PDL wait),
            # so the norm costs no launch at all. (With a qkv bias or q/k norms the scale would
            # have to come before them: those models take the norm kernel.)
            # The attention kernel may launch as soon as the qkv GEMM runs: its pre-wait loads
            # (block table, cached K/V, h's 1/rms) then overlap the weight stream.
            qkv = self.qkv_proj.linear_norm_weight(h, norm_weight, early_signal=True)
            out = self._attend(qkv, meta, rms_input=h, rms_eps=eps)
        elif (
            self.qkv_proj.bias is None
            and not self.qkv_proj.lora_active
            and self.ops.attention_scales_rms(meta.max_seqlen_q, self.head_dim, h.dtype, h.shape[0])
        ):
            # q/k norms (Qwen3-MoE): the q/k norm kernel normalises h's 1/rms times q and k and
            # returns them divided by it, the attention kernel then scales q/k/v by it: no norm
            # launch either (reference.qk_rms_norm)
            qkv = self.qkv_proj.linear_norm_weight(h, norm_weight)
            out = self._attend(qkv, meta, rms_input=h, rms_eps=eps)
        elif self.qkv_proj.lora_active:  # (an adapter reads the normalised input: the norm runs)
            out = self._attend(self.qkv_proj(norm(h)), meta)
        else:
            out = self._attend(self.qkv_proj.linear_rms_norm(h, eps, norm_weight), meta)
        return self.o_proj.linear_add(out, residual=h)

    def norm_qk(
        self, q: torch.Tensor, k: torch.Tensor, rms_input: torch.Tensor | None = None, rms_eps: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hkv, D] -> the same after the per-head q/k norms (Qwen3), if any
        (`rms_input`: a folded input norm's raw stream, reference.qk_rms_norm)."""
        if self.q_norm is None or self.k_norm is None:
            return q, k
        # (both in one launch on the GPU)
        w_q, w_k = self.q_norm.weight, self.k_norm.weight
        return self.ops.qk_rms_norm(q, k, w_q, w_k, self.q_norm.eps, rms_input=rms_input, rms_eps=rms_eps)

    def _attend(
        self,
        qkv: torch.Tensor,
        meta: AttentionMetadata,
        rms_input: torch.Tensor | None = None,
        rms_eps: float = 0.0,
    ) -> torch.Tensor:
        """qkv [T, q_size + 2 kv_size] -> attention output [T, q_size] (before o_proj)."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.norm_qk(q, k, rms_input, rms_eps)
        if self.ops.rotary_write_kv_cache is not None:  # one kernel instead of two (GPU)
            out = self.attn.rotate_write_attend(q, k, v, meta, rms_input, rms_eps)  # [T, Hq, D]
        else:
            assert rms_input is None
            q, k = self.ops.rotary(q, k, meta.positions, meta.cos_sin_cache)
            out = self.attn(q, k, v, meta)  # [T, Hq, D]
        return out.reshape(num_tokens, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, layout: ShardLayout) -> None:
        super().__init__()
        self.ops = ops
        inter = layout.intermediate_size  # this rank's slice: gate/up column-, down row-parallel
        self.gate_up_proj = Linear(ops, cfg.hidden_size, 2 * inter, bias=cfg.mlp_bias)
        self.down_proj = RowParallelLinear(ops, inter, cfg.hidden_size, cfg.mlp_bias, layout.tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden] normed
        # (one kernel for a decode-sized x where faster; not with adapter rows: they add to gate/up
        # before the activation)
        if self.ops.linear_silu_and_mul is not None and not self.gate_up_proj.lora_active:
            return self.down_proj(self.gate_up_proj.linear_silu_and_mul(x))
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))

    def forward_folded(
        self, h: torch.Tensor, eps: float, norm_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h + mlp(rms_norm(h)) for the raw residual stream h [T, hidden], the norm's weight folded
        into gate_up_proj: gate/up are computed from h and scaled by its 1/rms inside the SiLU op.
        Quantized: `norm_weight`, the 1/rms and the SiLU-and-mul in the gate/up GEMM, one launch."""
        assert self.ops.silu_and_mul_rms is not None, f"kernel bundle {self.ops.name!r} cannot fold norms"
        if self.gate_up_proj.quant_method is not None:
            if self.gate_up_proj.lora_active:  # (an adapter reads the normalised input: the norm runs)
                assert norm_weight is not None
                act = self.ops.silu_and_mul(self.gate_up_proj(self.ops.rms_norm(h, norm_weight, eps)))
            else:
                act = self.gate_up_proj.linear_silu_and_mul(h, rms_eps=eps, norm_weight=norm_weight)
        # (one kernel for one row where faster; not with adapter rows, whose deltas of the raw h add
        # to gate/up before the SiLU op's 1/rms scale)
        elif self.ops.linear_silu_and_mul is not None and not self.gate_up_proj.lora_active:
            act = self.gate_up_proj.linear_silu_and_mul(h, rms_eps=eps)
        else:
            act = self.ops.silu_and_mul_rms(self.gate_up_proj(h), h, eps)
        return self.down_proj.linear_add(act, residual=h)


def make_mlp(
    cfg: ModelConfig, ops: KernelOps, layer: int, layout: ShardLayout | None = None
) -> MLP | SparseMoeBlock:
    """The layer's feed-forward block: dense, or a sparse mixture of experts (Qwen3-MoE, Mixtral)."""
    layout = layout or shard_layout(cfg)
    return SparseMoeBlock(cfg, ops, layout) if cfg.is_moe_layer(layer) else MLP(cfg, ops, layout)


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: ModelConfig, ops: KernelOps, layer: int = 0, layout: ShardLayout | None = None
    ) -> None:
        super().__init__()
        layout = layout or shard_layout(cfg)
        self.self_attn = Attention(cfg, ops, layer, layout)
        self.mlp = make_mlp(cfg, ops, layer, layout)
        self.input_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        # Set by `fold_norms` on a quantized layer: the norms keep their weights and the folded
        # forward hands them to the quantized GEMMs (which multiply x by them) instead
        self.norm_weights_in_gemm = False

    def forward(
        self, hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            x = self.input_layernorm(hidden)
        else:
            x, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn(x, meta)
        x, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp(x), residual

    def forward_folded(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Residual stream in -> residual stream out, both norms folded (their weights are ones, or,
        quantized, applied by the GEMMs)."""
        in_gemm = self.norm_weights_in_gemm
        h = self.self_attn.forward_folded(h, self.input_layernorm, meta, in_gemm)
        mlp_norm = self.post_attention_layernorm
        if isinstance(self.mlp, SparseMoeBlock):  # (never quantized: can_fold_norms)
            return self.mlp.forward_folded(h, mlp_norm.eps)
        assert isinstance(self.mlp, MLP), "only dense and SparseMoeBlock layers fold (can_fold_norms)"
        return self.mlp.forward_folded(h, mlp_norm.eps, mlp_norm.weight if in_gemm else None)

    @torch.no_grad()
    def fold_norms(self) -> None:
        """qkv_proj.weight *= input_layernorm.weight[None, :], gate_up_proj.weight *=
        post_attention_layernorm.weight[None, :] (fp32 products, rounded once), then both norm
        weights := 1 so that nothing can apply them twice.

        Quantized projections keep their codes (re-quantizing W * g would round the checkpoint's
        weights a second time, and a per-output-channel scale cannot absorb a per-column g): the
        norms keep their weights, which the folded forward's quantized GEMMs apply to x
        (`norm_weights_in_gemm`; the unfolded forward's norms still apply them as before).

        A sparse MoE layer (Qwen3-MoE, Mixtral; full precision only: can_fold_norms) folds the
        post-attention norm into its router and every expert's w13 (SparseMoeBlock.fold_norm)."""
        if self.self_attn.qkv_proj.quant_method is not None:
            assert isinstance(self.mlp, MLP), "quantized MoE layers never fold (can_fold_norms)"
            self.norm_weights_in_gemm = True
            return
        pairs: list[tuple[RMSNorm, Linear]] = [(self.input_layernorm, self.self_attn.qkv_proj)]
        if isinstance(self.mlp, SparseMoeBlock):
            self.mlp.fold_norm(self.post_attention_layernorm.weight)
            self.post_attention_layernorm.weight.fill_(1.0)
        else:
            assert isinstance(self.mlp, MLP), "only dense and SparseMoeBlock layers fold (can_fold_norms)"
            pairs.append((self.post_attention_layernorm, self.mlp.gate_up_proj))
        for norm, proj in pairs:
            g = norm.weight.float()[None, :]
            # Row blocks: the fp32 copy of a whole 8B gate/up weight would be ~470 MB.
            for rows in proj.weight.split(_FOLD_ROWS):
                rows.copy_(rows.float() * g)
            proj.folded_norm = norm.weight.detach().clone()  # (an adapter's A is scaled by it too)
            norm.weight.fill_(1.0)


class MissingLayer(nn.Module):
    """A layer held by another pipeline stage (keeps the layers' indices): no parameters."""


class OnFirstStage(nn.Module):
    """Stage 0's embedding, final norm or LM head in a later pipeline stage's model: no parameters,
    never called (stage 0 embeds the tokens and applies the final norm and the LM head to the
    hidden states that come back to it: pipeline.py), so a later stage neither allocates nor
    reads them."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def forward(self, *args: object) -> torch.Tensor:
        raise RuntimeError(f"{self.name} runs on pipeline stage 0 only")


def _first_stage_only(layout: ShardLayout, name: str, build: Callable[[], M]) -> M:
    """`build()` on stage 0; an `OnFirstStage` placeholder on the later stages. (Typed as the
    module it stands for: every use of these modules is on stage 0.)"""
    return build() if layout.first_stage else cast(M, OnFirstStage(name))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, layout: ShardLayout) -> None:
        super().__init__()
        self.layout = layout
        # The embedding and the final norm only on stage 0 (ShardLayout.first_stage)
        self.embed_tokens: nn.Embedding = _first_stage_only(
            layout, "embed_tokens", lambda: VocabParallelEmbedding(layout, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, ops, i, layout) if layout.holds_layer(i) else MissingLayer()
            for i in range(cfg.num_layers)
        )
        self.norm: RMSNorm = _first_stage_only(
            layout, "norm", lambda: RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        )
        # True once `LlamaForCausalLM.fold_norms` folded the layers' norm weights into qkv_proj and
        # gate_up_proj (the layer norms' weights are then ones).
        self.norms_folded = False
        self.init_step_hooks()

    @property
    def weight_dtype(self) -> torch.dtype:
        """The full-precision weights' dtype (a norm's: every stage holds its layers' norms)."""
        return cast(DecoderLayer, self.layers[self.layout.layer_start]).input_layernorm.weight.dtype

    def init_step_hooks(self) -> None:
        """The attributes the engine sets on a model to hook into its forward (every model class
        that builds itself without LlamaModel.__init__ calls this: Gemma's)."""
        # EAGLE-3 heads read the residual stream entering these layers (speculative/eagle_head.py):
        # each forward then leaves them side by side in `aux_hidden` [T, len(aux_layers) * hidden]
        self.aux_layers: tuple[int, ...] = ()
        self.aux_hidden: torch.Tensor | None = None
        # --pipeline-trace: each micro-batch's start and end on this stage (pipeline.py)
        self.trace: pipeline.StageTrace | None = None
        # --pipeline-batches: batches of different steps a pipeline-parallel group keeps in flight
        # (every rank the same), and this rank's count of batches started (their messages' tags)
        self.pipeline_batches = 1
        self.batches_started = 0
        # the LoRA pool's row mapping (services/worker/lora/pool.py), None without LoRA: a pipeline
        # stage narrows it to each micro-batch
        self.lora_mapping: LoRAMapping | None = None

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.layout.pp_size > 1:
            assert inputs_embeds is None, "image inputs are not served by a pipeline-parallel group"
            return self._forward_stage(input_ids, meta)
        # inputs_embeds: the token embeddings with some rows replaced (image rows, models/llava.py)
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        # The folded forward is for decode-sized steps, where it removes launches. Larger steps run
        # the unfolded forward, which is the same function here (its norms multiply by ones, the
        # projections carry their weights): the folded one measured slower for large-batch decode
        # (cuBLAS with beta = 1, the SiLU op re-reading h per chunk; docs/gpu.md round 5).
        aux: list[torch.Tensor] = []
        if self.norms_folded and input_ids.shape[0] <= FOLDED_MAX_TOKENS:
            for i, layer in enumerate(self.layers):
                if i in self.aux_layers:  # (the folded forward carries the raw residual stream)
                    aux.append(hidden)
                hidden = cast(DecoderLayer, layer).forward_folded(hidden, meta)
            self._keep_aux(aux)
            return self.norm(hidden)  # the final norm is not folded (lm_head may be the embedding)
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            if i in self.aux_layers:
                aux.append(hidden if residual is None else hidden + residual)
            hidden, residual = layer(hidden, residual, meta)
        assert residual is not None
        self._keep_aux(aux)
        normed, _ = self.norm.add_and_norm(hidden, residual)
        return normed

    def _keep_aux(self, aux: list[torch.Tensor]) -> None:
        if self.aux_layers:
            self.aux_hidden = torch.cat(aux, dim=-1)

    def _forward_stage(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Pipeline parallelism: this stage's layers over the step's micro-batches, between the
        stage before and the one after (services/worker/pipeline.py); stage 0 returns the normed
        hidden states (the other stages' return value is not used)."""
        return self.start_stage(input_ids, meta).finish()

    def start_stage(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> pipeline.StageForward:
        """This stage's layers over one batch, its results sent on; the batch's `finish()` (stage 0:
        the batch back from the last stage, normed) may come after later batches started."""
        layout = self.layout

        def layers(
            hidden: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if self.norms_folded and hidden.shape[0] <= FOLDED_MAX_TOKENS:
                # The folded forward carries one stream, the whole residual stream; between
                # stages it travels as (stream, zeros), which the next stage and stage 0's final
                # norm add back exactly (x + 0 = x).
                h = hidden if residual is None else hidden + residual
                for i in range(layout.layer_start, layout.layer_end):
                    h = cast(DecoderLayer, self.layers[i]).forward_folded(h, meta)
                return h, torch.zeros_like(h)
            for i in range(layout.layer_start, layout.layer_end):
                hidden, residual = self.layers[i](hidden, residual, meta)
            assert residual is not None  # every stage holds at least one layer (P <= layers)
            return hidden, residual

        def final_norm(hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
            return self.norm.add_and_norm(hidden, residual)[0]

        mapping = self.lora_mapping
        batch, self.batches_started = self.batches_started, self.batches_started + 1
        try:
            return pipeline.start_stage(
                layout,
                input_ids,
                meta,
                cast(DecoderLayer, self.layers[layout.layer_start]).input_layernorm.weight,
                self.embed_tokens,
                layers,
                final_norm,
                self.trace,
                mapping.select_rows if mapping is not None else None,
                batch,
                self.pipeline_batches,
            )
        finally:
            if mapping is not None:
                mapping.restore()


class LlamaForCausalLM(nn.Module):
    """input ids [T] + metadata -> hidden states [T, hidden]; `compute_logits` on the rows to sample."""

    stacked_params = STACKED_PARAMS
    # (checkpoint substring, parameter substring): names that differ only in a module's name
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # Rank 0 of a parallel group: sends each forward's inputs to the other ranks first
    # (services/worker/tp_group.py); None on the other ranks and with T = P = 1.
    driver: StepDriver | None = None
    # The activation of the fused gate/up projection's activation-and-mul (the GEMM tuner times
    # its epilogue variant: kernels/triton/skinny_gemm.py)
    mlp_activation = "silu"
    # Fold the layer norms although the attention has q/k norms (can_fold_norms): a family whose
    # folded decode step saves more than the one norm launch a layer it keeps (Qwen3-MoE)
    folds_with_qk_norm = False

    def __init__(self, cfg: ModelConfig, ops: KernelOps) -> None:
        super().__init__()
        self.config = cfg
        self.ops = ops
        # This rank's slice of every sharded dimension (services/worker/parallel.py); the whole
        # model with T = 1.
        self.layout = shard_layout(cfg)
        self.model = LlamaModel(cfg, ops, self.layout)
        # The LM head only on stage 0, like the embedding it may be tied to
        self.lm_head: Linear = _first_stage_only(
            self.layout, "lm_head", lambda: Linear(ops, cfg.hidden_size, self.layout.vocab_size, bias=False)
        )
        if cfg.tie_word_embeddings and self.layout.first_stage:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.driver is not None:
            self.driver.forward(input_ids, meta)
        return self.model(input_ids, meta)

    def start_forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> pipeline.StageForward:
        """P > 1 with batches in flight (rank 0): the other ranks are sent the batch, stage 0 runs
        its layers over it now, and the batch's `finish()` gives the hidden states once it came
        back through every stage (services/worker/pipeline.py)."""
        if self.driver is not None:
            self.driver.forward(input_ids, meta)
        return self.model.start_stage(input_ids, meta)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [S] -> [S, hidden]
        """The token embeddings outside a forward (an EAGLE head's input, speculative/eagle.py); in
        a group the other ranks join the vocabulary-parallel embedding's all-reduce."""
        if self.driver is not None and self.layout.tp_size > 1:
            self.driver.embed(input_ids)
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [S, hidden] -> [S, vocab] fp32
        if self.layout.tp_size == 1:  # (its own layout: a draft on rank 0 of a group is unsharded)
            return self.lm_head(hidden).float()
        if self.driver is not None:
            self.driver.compute_logits(hidden)
        # Each rank's vocabulary slice, gathered in rank order; the last rank's padding rows dropped.
        logits = all_gather_last_dim(self.lm_head(hidden))
        return logits[:, : self.config.vocab_size].float()

    @property
    def norms_folded(self) -> bool:
        return self.model.norms_folded

    def can_fold_norms(self) -> bool:
        """Whether `fold_norms` applies: the kernel bundle has the three folded-norm ops, and the
        weights are not fp16 (the folded projections see the raw residual stream, whose values
        grow to hundreds or thousands in deep models; their products with the weights can leave
        fp16's range where the normalised activations never do. bf16 and fp32 have fp32's range),
        and the model has no qkv bias and no q/k norms: only then does a decode step lose both norm
        launches (the input norm's scale moves into the attention kernel, which must apply it
        before a bias or a q/k norm). Qwen2 / Qwen3 would keep one norm launch, and on the GPU the
        fold's different bf16 rounding (W * g rounded once) made Qwen3's free-running greedy
        output drift from transformers' more than the unfolded model's (tests/kernels/test_engine_gpu.py).
        A family with q/k norms folds where `folds_with_qk_norm` says so (Qwen3-MoE: its folded
        MoE block loses the post-attention norm launch; the input norm stays one launch).
        MoE layers fold when every one is a SparseMoeBlock (not gpt-oss's biased router) and no
        projection is quantized."""
        cfg = self.config
        moe_layers = [m for m in self.model.layers.modules() if isinstance(m, MoeLayer)]
        quantized = any(
            isinstance(m, Linear) and m.quant_method is not None for m in self.model.layers.modules()
        )
        return (
            self.ops.folds_norms
            and not cfg.attention_bias
            and (not cfg.qk_norm or self.folds_with_qk_norm)
            and all(isinstance(m, SparseMoeBlock) for m in moe_layers)
            and not (moe_layers and quantized)
            and self.model.weight_dtype != torch.float16
            # A quantized model folds the norms into its GEMMs where the format has the fused GEMM
            # (not GPTQ act-order, not block FP8): DecoderLayer.fold_norms
            and all(
                m.quant_method.fused_operands(m) is not None
                for m in self.model.layers.modules()
                if isinstance(m, Linear) and m.quant_method is not None
            )
            # Parallel groups fold too: qkv / gate_up are column-parallel over the whole hidden
            # dimension (each rank folds g into its rows), a row-parallel o_proj / down_proj adds
            # the residual on tensor-parallel rank 0 only, before its all-reduce
            # (RowParallelLinear.linear_add), and pipeline stages pass the folded forward's one
            # stream as (stream, zeros) (LlamaModel._forward_stage).
            and switches.FOLD_NORMS.value  # TANDEM_FOLD_NORMS=0: separate norms (services/common/switches.py)
        )

    def fold_norms(self) -> bool:
        """Fold each layer's two RMSNorm weights into the projection after it (exact algebra:
        W (g * n) = (W diag g) n), once, after the weights are loaded; True if it did.

        Why: in a batch-1 decode step the two RMSNorm launches per layer are a visible share of the
        step (figures in docs/gpu.md, round 5). Folded, the qkv projection
        takes the raw residual stream and scales each row by its 1/rms (`linear_rms_norm`),
        o_proj and down_proj add into the residual stream (`linear_add`), and the SiLU op scales
        gate/up by the row's 1/rms (`silu_and_mul_rms`). The final `model.norm` stays (lm_head may
        be tied to the embedding); Qwen3's q/k norms (per head, after qkv) are untouched; Qwen2's
        qkv bias is added after the scale, as before."""
        if self.model.norms_folded or not self.can_fold_norms():
            return False
        for layer in self.model.layers:
            if isinstance(layer, DecoderLayer):  # (not the layers of other pipeline stages)
                layer.fold_norms()
        self.model.norms_folded = True
        return True

    def remap_checkpoint(
        self, tensors: Iterator[tuple[str, str, CheckpointTensor]]
    ) -> Iterator[tuple[str, str, CheckpointTensor]]:
        """The checkpoint's (file, name, tensor) as the loader maps them: a family whose checkpoint
        layout differs from its parameters' beyond names (gpt-oss's experts) converts them here."""
        return tensors

    def build_rope_cache(self, max_position: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The cos/sin table every layer's rotary reads (AttentionMetadata.cos_sin_cache); a family
        with per-layer ropes (Gemma 3) also builds its other tables here."""
        cfg = self.config
        return build_rope_cache(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_scaling, dtype, device)

    def attention_layers(self) -> list[PagedAttention]:
        return [m for m in self.modules() if isinstance(m, PagedAttention)]
