"""A sparse mixture-of-experts feed-forward block (Qwen3-MoE, Mixtral).

    router logits = x @ gate.T                       [T, E]
    weights, ids  = top-k of softmax(logits) (fp32)  [T, k]  (renormalised when norm_topk_prob;
                                                              `route`: ops.moe_router, the logits
                                                              and routing one kernel on the GPU)
    out           = ops.fused_moe(x, w13, w2, weights, ids)

The experts' weights are stacked per projection: `w13` [E, 2*I, H] holds each expert's gate and
up rows (as the dense MLP's fused gate_up_proj), `w2` [E, H, I] its down projection. The loader
maps the checkpoint's per-expert tensors into them (`experts.{e}.gate_proj` / `w1` -> w13[e, :I],
`up_proj` / `w3` -> w13[e, I:], `down_proj` / `w2` -> w2[e]).

Folded norm (decode steps, models/llama.py `fold_norms`): the post-attention norm's weight g lives
in the router's and every expert's w13 columns ((x * g) @ W.T == x @ (W * g).T, exact; with tensor
parallelism each rank's w13 rows are a slice of I, every column of H is whole), and the block
reads the raw residual stream h: the routing kernel scales the router's logits by 1/rms(h), the
gate/up GEMV computes 1/rms(h) from the h tiles it streams, and the down GEMV adds h to its output.
No norm launch, no residual add launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels import KernelOps
from services.worker.layers.linear import Linear
from services.worker.model_config import ModelConfig
from services.worker.parallel import ShardLayout, all_reduce


def route(
    ops: KernelOps,
    router: Linear,
    x: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool = False,
    rms_eps: float | None = None,  # folded norm: x is the raw residual stream
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] fp32, expert ids [T, k]) of each token, for every MoE family: a plain
    router's GEMV inside the routing kernel (`ops.moe_router`: no router GEMM launch in a decode
    step); a quantized router, or one with adapter rows, computes its logits first."""
    if router.quant_method is None and not router.lora_active:
        return ops.moe_router(x, router.weight, router.bias, top_k, scoring, renormalize, rms_eps)
    if rms_eps is None:
        return ops.moe_route(router(x), top_k, scoring, renormalize)
    return ops.moe_route(router(x), top_k, scoring, renormalize, rms_input=x, rms_eps=rms_eps)


@dataclass(frozen=True)
class MoeOperands:
    """What `ops.fused_moe` reads of one MoE layer (this rank's slices), for the decode tuner."""

    w13: torch.Tensor  # [E, 2*I, H]
    w2: torch.Tensor  # [E, H, I]
    w13_bias: torch.Tensor | None  # [E, 2*I]
    w2_bias: torch.Tensor | None  # [E, H] (None also where another rank adds it)
    top_k: int
    activation: str  # reference.MOE_ACTIVATIONS


class MoeLayer(nn.Module):
    """A mixture-of-experts feed-forward of any family: ModelRunner finds these to tune the decode
    kernels for their expert shapes (kernels/triton/moe_tune.py)."""

    def operands(self) -> MoeOperands:
        raise NotImplementedError

    def router_linear(self) -> Linear:
        """The router projection (replicated under tensor parallelism; its decode GEMV runs in
        the routing kernel, `route`)."""
        raise NotImplementedError


class SparseMoeBlock(MoeLayer):
    def __init__(self, cfg: ModelConfig, ops: KernelOps, layout: ShardLayout) -> None:
        super().__init__()
        self.ops = ops
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        # Tensor parallelism: each rank holds a slice of every expert's intermediate dimension
        # (w13's rows, w2's columns); the router is replicated and the outputs all-reduced.
        self.tp_size, self.tp_rank = layout.tp_size, layout.tp_rank
        inter = layout.moe_intermediate_size
        self.gate = Linear(ops, cfg.hidden_size, cfg.num_experts, bias=False)
        self.w13 = nn.Parameter(torch.empty(cfg.num_experts, 2 * inter, cfg.hidden_size))
        self.w2 = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size, inter))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] fp32, expert ids [T, k]) of each token."""
        return route(self.ops, self.gate, x, self.top_k, "softmax_topk", self.norm_topk_prob)

    def operands(self) -> MoeOperands:
        return MoeOperands(self.w13, self.w2, None, None, self.top_k, "silu")

    def router_linear(self) -> Linear:
        return self.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden] normed
        weights, ids = self.route(x)
        out = self.ops.fused_moe(x, self.w13, self.w2, weights, ids)
        return all_reduce(out) if self.tp_size > 1 else out

    def forward_folded(self, h: torch.Tensor, eps: float) -> torch.Tensor:
        """h + this block of rms_norm(h) for the raw residual stream h [T, hidden], the norm's
        weight folded in (`fold_norm`; module docstring). Tensor parallelism: rank 0 adds h to its
        partial sum, the all-reduce then sums the ranks' partials and one h."""
        weights, ids = route(self.ops, self.gate, h, self.top_k, "softmax_topk", self.norm_topk_prob, eps)
        residual = h if self.tp_rank == 0 else None
        out = self.ops.fused_moe(h, self.w13, self.w2, weights, ids, rms_eps=eps, residual=residual)
        return all_reduce(out) if self.tp_size > 1 else out

    @torch.no_grad()
    def fold_norm(self, norm_weight: torch.Tensor) -> None:
        """router.weight *= g[None, :], w13[e] *= g[None, :] for every expert (fp32 products,
        rounded once; one expert at a time bounds the fp32 temporary)."""
        assert self.gate.quant_method is None, "a quantized router keeps its norm (can_fold_norms)"
        g = norm_weight.float()[None, :]
        self.gate.weight.copy_(self.gate.weight.float() * g)
        for expert in self.w13:
            expert.copy_(expert.float() * g)
