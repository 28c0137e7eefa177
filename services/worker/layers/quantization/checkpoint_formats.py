"""Pre-quantized checkpoints: AWQ, GPTQ, compressed-tensors, block FP8 (config.json's
`quantization_config`), each a `QuantMethod` that reads its own tensors and repacks them at load.

Integer formats are repacked onto `quant_linear`'s layout (kernels/reference.py
`dequantize_weight`): codes along K per output row (int8 [N, K] stored as code - 128, or 4-bit
two a byte), fp32 scales and zero points [N, G] over contiguous groups of K. GPTQ's act-order
(`desc_act`, a `g_idx` that is not k // group_size) is served by sorting the input columns by
group at load (`input_perm`) and gathering x's columns the same way per call; q/k/v (and
gate/up) see the same input and so the same order, which the loader checks.

FP8 checkpoints with per-channel or per-tensor scales load onto `Fp8Method` (per-row scales);
block-wise FP8 (128 x 128) keeps its e4m3 weight and block scales and dequantizes per call.

The LM head is quantized when the checkpoint says so (`quantizes_lm_head`: GPTQ's `lm_head: true`;
compressed-tensors config groups whose targets cover it and an `ignore` that does not name it;
`fp8` / `awq` with a `modules_to_not_convert` that does not name it) and then loads through the
same method as the decoder's projections; a quantized embedding is refused by name.

Tensor parallelism: each format's `part_axes` says how its tensors follow a rank's slice of the
weight (base.py `Split`), so a rank reads only its slice of the packed codes, scales and zero
points: packed words and groups along K (row-parallel o_proj / down), packed words along N (AWQ,
GPTQ's qzeros: column-parallel qkv / gate_up). A slice that would cut a packed word, a group or an
FP8 block is a load error naming the tensor; GPTQ act-order cannot be split along K at all.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from kernels.reference import dequantize_weight
from services.worker.layers.linear import Linear
from services.worker.layers.quantization.base import QuantMethod, QuantOperands
from services.worker.layers.quantization.fp8 import FP8, Fp8Method
from services.worker.layers.quantization.int8 import Int8Method
from services.worker.layers.split import Split

if TYPE_CHECKING:
    from services.worker.checkpoint import CheckpointTensor

AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # AWQ's GEMM packing interleaves 8 columns a word


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned codes of int32 words holding 32 / bits values each (value i at bits * i) along dim."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    words = packed.to(torch.int32).unsqueeze(-1)
    codes = (words >> shifts) & ((1 << bits) - 1)  # [..., per_word]
    codes = codes.reshape(*packed.shape, per_word)
    if dim == 0:  # [W, X, per_word] -> [W * per_word, X]
        return codes.permute(0, 2, 1).reshape(packed.shape[0] * per_word, packed.shape[1])
    return codes.reshape(packed.shape[0], packed.shape[1] * per_word)


class PackedIntMethod(QuantMethod):
    """Integer weights with scales and zero points per contiguous group, on `quant_linear`."""

    name = "packed-int"

    def __init__(self, bits: int, group_size: int, act_order: bool = False) -> None:
        self.bits, self.group_size, self.act_order = bits, group_size, act_order
        self.perm_loaded: set[int] = set()  # id() of the layers whose column order a first shard set

    def _group(self, layer: Linear) -> int:
        return self.group_size if self.group_size > 0 else layer.in_features

    def _group_axis(self, dim: int) -> tuple[int, int] | None:
        """A [G, ...] / [..., G] per-group tensor's `dim` under a split of K: whole groups, or
        (one group per row: per channel) replicated."""
        return (dim, self.group_size) if self.group_size > 0 else None

    def create_weights(self, layer: Linear) -> None:
        n, k = layer.out_features, layer.in_features
        group = self._group(layer)
        if k % group:
            raise ValueError(f"{self.name}: group size {group} does not divide in_features {k}")
        device = layer.weight.device
        del layer.weight
        if self.bits == 8:
            qweight = torch.empty(n, k, dtype=torch.int8, device=device)
        else:
            qweight = torch.empty(n, k // 2, dtype=torch.uint8, device=device)
        layer.qweight = nn.Parameter(qweight, requires_grad=False)
        layer.weight_scale = nn.Parameter(torch.empty(n, k // group, device=device), requires_grad=False)
        layer.weight_zero = nn.Parameter(torch.empty(n, k // group, device=device), requires_grad=False)
        if self.act_order:
            perm = torch.empty(k, dtype=torch.int64, device=device)
            layer.input_perm = nn.Parameter(perm, requires_grad=False)

    def store(
        self, layer: Linear, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, row_start: int
    ) -> None:
        """codes [rows, K] unsigned, scales / zeros [rows, G] -> rows of the layer's parameters."""
        rows = codes.shape[0]
        dev = layer.qweight.device
        codes = codes.to(dev)
        if self.bits == 8:
            q = (codes - 128).to(torch.int8)
            zeros = zeros - 128
        else:
            q8 = codes.to(torch.uint8)
            q = q8[:, 0::2] | (q8[:, 1::2] << 4)
        layer.qweight.data[row_start : row_start + rows].copy_(q)
        layer.weight_scale.data[row_start : row_start + rows].copy_(scales.float())
        layer.weight_zero.data[row_start : row_start + rows].copy_(zeros.float())

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.act_order:
            x = x.index_select(1, layer.input_perm)
        return layer.ops.quant_linear(
            x, layer.qweight, layer.weight_scale, self.bits, layer.weight_zero, bias
        )

    def gemm_operands(self, layer: Linear) -> QuantOperands | None:
        return QuantOperands(layer.qweight, layer.weight_scale, layer.weight_zero, self.bits)

    def fused_operands(self, layer: Linear) -> QuantOperands | None:
        # act-order gathers x's columns per call, which the fused GEMM's norm weight would have to follow
        return None if self.act_order else self.gemm_operands(layer)

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:
        """The weight in the checkpoint's column order."""
        w = dequantize_weight(layer.qweight, layer.weight_scale, self.bits, layer.weight_zero)
        if self.act_order:
            out = torch.empty_like(w)
            out[:, layer.input_perm] = w
            return out
        return w

    def order_columns(
        self,
        layer: Linear,
        g_idx: torch.Tensor,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
    ) -> torch.Tensor:
        """Act-order: codes' columns sorted by group (scales / zeros are already per group)."""
        group = self._group(layer)
        k = layer.in_features
        trivial = torch.arange(k, dtype=torch.int64) // group
        if not self.act_order:
            if not torch.equal(g_idx.to(torch.int64), trivial):
                raise ValueError("g_idx is not k // group_size but the config has no desc_act")
            return codes
        perm = torch.argsort(g_idx.to(torch.int64), stable=True)
        if not torch.equal(g_idx.to(torch.int64)[perm], trivial):
            raise ValueError(f"g_idx does not put exactly {group} columns in each group")
        current = layer.input_perm.data
        if id(layer) not in self.perm_loaded:  # (to_empty left the parameter uninitialised)
            self.perm_loaded.add(id(layer))
            current.copy_(perm)
        elif not torch.equal(current.cpu(), perm):
            raise ValueError("act-order g_idx differs between the shards of one fused projection")
        return codes[:, perm]


class GPTQMethod(PackedIntMethod):
    """GPTQ (AutoGPTQ / GPTQModel): qweight int32 [K * bits / 32, N] packed along K, qzeros int32
    [G, N * bits / 32] packed along N (stored minus one in the v1 `gptq` format), scales fp16
    [G, N], g_idx int32 [K]; w[k, n] = scales[g, n] * (q[k, n] - zero[g, n]), g = g_idx[k]."""

    name = "gptq"
    checkpoint_suffixes = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, bits: int, group_size: int, act_order: bool, zeros_offset: int) -> None:
        super().__init__(bits, group_size, act_order)
        self.zeros_offset = zeros_offset

    def part_axes(self, suffix: str, shape: tuple[int, ...], split_dim: int) -> tuple[int, int] | None:
        per_word = 32 // self.bits
        if split_dim == 0:  # output columns of the checkpoint's [.., N] tensors
            return {"qweight": (1, 1), "qzeros": (1, per_word), "scales": (1, 1)}.get(suffix)
        if suffix == "g_idx" and self.act_order:
            raise ValueError(
                "act-order (desc_act) GPTQ weights cannot be split along K over tensor-parallel ranks: "
                "a rank's input columns belong to groups anywhere in the row"
            )
        return {
            "qweight": (0, per_word),
            "qzeros": self._group_axis(0),
            "scales": self._group_axis(0),
            "g_idx": (0, 1),
        }.get(suffix)

    def read_part(self, suffix: str, source: CheckpointTensor, split: Split | None) -> torch.Tensor:
        tensor = super().read_part(suffix, source, split)
        if suffix == "g_idx" and split is not None and split.dim == 1 and self.group_size > 0:
            tensor = tensor - split.start // self.group_size  # this rank's groups, from 0
        return tensor

    def load_checkpoint(
        self, layer: Linear, parts: dict[str, torch.Tensor], row_start: int, rows: int
    ) -> None:
        k = layer.in_features
        groups = k // self._group(layer)
        per_word = 32 // self.bits
        expected = {
            "qweight": (k // per_word, rows),
            "qzeros": (groups, rows // per_word),
            "scales": (groups, rows),
            "g_idx": (k,),
        }
        for suffix, shape in expected.items():
            if tuple(parts[suffix].shape) != shape:
                raise ValueError(f"{suffix} has shape {tuple(parts[suffix].shape)}, expected {shape}")
        codes = unpack_int32(parts["qweight"], self.bits, dim=0).t()  # [rows, K]
        zeros = (unpack_int32(parts["qzeros"], self.bits, dim=1) + self.zeros_offset).t()  # [rows, G]
        scales = parts["scales"].float().t()
        codes = self.order_columns(layer, parts["g_idx"], codes, scales, zeros)
        self.store(layer, codes, scales, zeros, row_start)


class AWQMethod(PackedIntMethod):
    """AWQ, GEMM version: qweight int32 [K, N / 8] and qzeros int32 [G, N / 8] packed along N in
    AWQ's interleaved order, scales fp16 [G, N]; w[k, n] = (q[k, n] - zero[g, n]) * scales[g, n]."""

    name = "awq"
    checkpoint_suffixes = ("qweight", "qzeros", "scales")

    def part_axes(self, suffix: str, shape: tuple[int, ...], split_dim: int) -> tuple[int, int] | None:
        if split_dim == 0:  # packed along N, 8 columns a word
            return {"qweight": (1, 8), "qzeros": (1, 8), "scales": (1, 1)}.get(suffix)
        return {"qweight": (0, 1), "qzeros": self._group_axis(0), "scales": self._group_axis(0)}.get(suffix)

    @staticmethod
    def unpack(packed: torch.Tensor) -> torch.Tensor:
        codes = unpack_int32(packed, 4, dim=1).reshape(packed.shape[0], -1, 8)
        return codes[:, :, list(AWQ_REVERSE_ORDER)].reshape(packed.shape[0], -1)

    def load_checkpoint(
        self, layer: Linear, parts: dict[str, torch.Tensor], row_start: int, rows: int
    ) -> None:
        k = layer.in_features
        groups = k // self._group(layer)
        expected = {"qweight": (k, rows // 8), "qzeros": (groups, rows // 8), "scales": (groups, rows)}
        for suffix, shape in expected.items():
            if tuple(parts[suffix].shape) != shape:
                raise ValueError(f"{suffix} has shape {tuple(parts[suffix].shape)}, expected {shape}")
        codes = self.unpack(parts["qweight"]).t()
        zeros = self.unpack(parts["qzeros"]).t()
        self.store(layer, codes, parts["scales"].float().t(), zeros, row_start)


class PackQuantizedMethod(PackedIntMethod):
    """compressed-tensors `pack-quantized` (W4A16 / W8A16, llm-compressor): weight_packed int32
    [N, K * bits / 32] packed along K, codes stored as q + 2^(bits-1); weight_scale [N, G];
    weight_shape [2]; weight_zero_point [N, G] when asymmetric."""

    name = "compressed-tensors pack-quantized"

    def __init__(self, bits: int, group_size: int, symmetric: bool) -> None:
        super().__init__(bits, group_size)
        self.symmetric = symmetric
        self.checkpoint_suffixes = ("weight_packed", "weight_scale", "weight_shape") + (
            () if symmetric else ("weight_zero_point",)
        )

    def part_axes(self, suffix: str, shape: tuple[int, ...], split_dim: int) -> tuple[int, int] | None:
        if suffix == "weight_shape":
            return None
        if split_dim == 0:  # every tensor is [N, ...]
            return 0, 1
        if suffix == "weight_packed":
            return 1, 32 // self.bits
        return self._group_axis(1)

    def read_part(self, suffix: str, source: CheckpointTensor, split: Split | None) -> torch.Tensor:
        tensor = super().read_part(suffix, source, split)
        if suffix == "weight_shape" and split is not None:  # [N, K] of the whole -> of this slice
            whole = [int(v) for v in tensor.tolist()]
            if len(whole) != 2 or split.start + split.size > whole[split.dim]:
                raise ValueError(f"weight_shape {whole} does not hold this rank's {split.describe()}")
            whole[split.dim] = split.size
            tensor = torch.tensor(whole, dtype=torch.int64)
        return tensor

    def load_checkpoint(
        self, layer: Linear, parts: dict[str, torch.Tensor], row_start: int, rows: int
    ) -> None:
        k = layer.in_features
        groups = k // self._group(layer)
        if [int(v) for v in parts["weight_shape"].tolist()] != [rows, k]:
            raise ValueError(f"weight_shape {parts['weight_shape'].tolist()}, expected {[rows, k]}")
        if tuple(parts["weight_scale"].shape) != (rows, groups):
            raise ValueError(
                f"weight_scale has shape {tuple(parts['weight_scale'].shape)}, expected {(rows, groups)}"
            )
        codes = unpack_int32(parts["weight_packed"], self.bits, dim=1)[:, :k]
        offset = 1 << (self.bits - 1)
        if self.symmetric:
            zeros = torch.full((rows, groups), float(offset))
        else:
            zeros = parts["weight_zero_point"].float().reshape(rows, groups) + offset
        self.store(layer, codes, parts["weight_scale"].float(), zeros, row_start)


def _per_row(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-tensor ([], [1]) or per-channel ([rows], [rows, 1]) scale as [rows, 1] fp32."""
    scale = scale.float().reshape(-1, 1)
    if scale.shape[0] == 1:
        return scale.expand(rows, 1)
    if scale.shape[0] != rows:
        raise ValueError(f"weight_scale has {scale.shape[0]} values, expected 1 or {rows}")
    return scale


def _per_row_axes(suffix: str, shape: tuple[int, ...], split_dim: int) -> tuple[int, int] | None:
    """`weight` [N, K] and a per-channel `weight_scale` ([N] / [N, 1]) follow a split; a
    per-tensor scale (and a static `input_scale`) is the same on every rank."""
    if suffix == "weight":
        return split_dim, 1
    per_channel = suffix == "weight_scale" and math.prod(shape) > 1
    return (0, 1) if per_channel and split_dim == 0 else None


class CheckpointFp8Method(Fp8Method):
    """FP8 e4m3 weights with per-tensor or per-channel `weight_scale` (compressed-tensors
    `float-quantized`, ModelOpt / `fp8` without blocks); activations quantized per token at run
    time (a static `input_scale`, when present, is not used)."""

    name = "fp8 checkpoint"

    def __init__(self, has_input_scale: bool) -> None:
        self.checkpoint_suffixes = ("weight", "weight_scale") + (("input_scale",) if has_input_scale else ())

    def part_axes(self, suffix: str, shape: tuple[int, ...], split_dim: int) -> tuple[int, int] | None:
        return _per_row_axes(suffix, shape, split_dim)

    def load_checkpoint(
        self, layer: Linear, parts: dict[str, torch.Tensor], row_start: int, rows: int
    ) -> None:
        weight = parts["weight"]
        if weight.dtype != FP8 or tuple(weight.shape) != (rows, layer.in_features):
            raise ValueError(
                f"weight {weight.dtype} {tuple(weight.shape)}, expected float8_e4m3fn {(rows, layer.in_features)}"
            )
        layer.qweight.data[row_start : row_start + rows].copy_(weight)
        layer.weight_scale.data[row_start : row_start + rows].copy_(_per_row(parts["weight_scale"], rows))


class CheckpointInt8Method(Int8Method):
    """compressed-tensors `int-quantized` INT8 weights with per-channel / per-tensor scales. The
    checkpoint's W8A8 runs as W8A16 (activations stay in the model dtype)."""

    name = "int8 checkpoint"

    def __init__(self, has_input_scale: bool) -> None:
        super().__init__(0)
        self.checkpoint_suffixes = ("weight", "weight_scale") + (("input_scale",) if has_input_scale else ())

    def part_axes(self, suffix: str, shape: tuple[int, ...], split_dim: int) -> tuple[int, int] | None:
        return _per_row_axes(suffix, shape, split_dim)

    def load_checkpoint(
        self, layer: Linear, parts: dict[str, torch.Tensor], row_start: int, rows: int
    ) -> None:
        weight = parts["weight"]
        if weight.dtype != torch.int8 or tuple(weight.shape) != (rows, layer.in_features):
            raise ValueError(
                f"weight {weight.dtype} {tuple(weight.shape)}, expected int8 {(rows, layer.in_features)}"
            )
        layer.qweight.data[row_start : row_start + rows].copy_(weight)
        layer.weight_scale.data[row_start : row_start + rows].copy_(_per_row(parts["weight_scale"], rows))


class BlockFp8Method(QuantMethod):
    """Block-wise FP8 (Qwen3-FP8, DeepSeek-V3: `quant_method: fp8`, `weight_block_size`): weight
    e4m3 [N, K], weight_scale_inv fp32 [ceil(N / bn), ceil(K / bk)], w = weight * scale of its block.
    Dequantized per call (no block-scaled GEMM kernel yet): the memory of FP8, not its speed."""

    name = "block fp8"
    checkpoint_suffixes = ("weight", "weight_scale_inv")

    def __init__(self, block: tuple[int, int]) -> None:
        self.block = block

    def create_weights(self, layer: Linear) -> None:
        n, k = layer.out_features, layer.in_features
        bn, bk = self.block
        device = layer.weight.device
        del layer.weight
        layer.qweight = nn.Parameter(torch.empty(n, k, dtype=FP8, device=device), requires_grad=False)
        layer.weight_scale = nn.Parameter(
            torch.empty(-(-n // bn), -(-k // bk), device=device), requires_grad=False
        )

    def part_axes(self, suffix: str, shape: tuple[int, ...], split_dim: int) -> tuple[int, int] | None:
        if suffix == "weight":
            return split_dim, 1
        return split_dim, self.block[split_dim]  # whole blocks of weight_scale_inv

    def load_checkpoint(
        self, layer: Linear, parts: dict[str, torch.Tensor], row_start: int, rows: int
    ) -> None:
        bn, bk = self.block
        k = layer.in_features
        weight, scale = parts["weight"], parts["weight_scale_inv"]
        if weight.dtype != FP8 or tuple(weight.shape) != (rows, k):
            raise ValueError(
                f"weight {weight.dtype} {tuple(weight.shape)}, expected float8_e4m3fn {(rows, k)}"
            )
        if row_start % bn or (rows % bn and row_start + rows != layer.out_features):
            raise ValueError(
                f"a fused shard at row {row_start} of {rows} rows is not aligned to {bn}-row blocks"
            )
        if tuple(scale.shape) != (-(-rows // bn), -(-k // bk)):
            raise ValueError(
                f"weight_scale_inv has shape {tuple(scale.shape)}, expected {(-(-rows // bn), -(-k // bk))}"
            )
        layer.qweight.data[row_start : row_start + rows].copy_(weight)
        layer.weight_scale.data[row_start // bn : row_start // bn + scale.shape[0]].copy_(scale.float())

    def dequantized_weight(self, layer: Linear) -> torch.Tensor:
        bn, bk = self.block
        n, k = layer.qweight.shape
        s = layer.weight_scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        return layer.qweight.float() * s

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = self.dequantized_weight(layer).to(x.dtype)
        return F.linear(x, w, bias)


def _names(module: str, pattern: str) -> bool:
    """Whether a module pattern of a quantization config names `module`: "re:<regex>" (matched at
    the start of the module's name, as compressed-tensors does), or the module's name or a dotted
    suffix of it ("lm_head" names "lm_head" and "language_model.lm_head")."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return module == pattern or module.endswith("." + pattern) or pattern.endswith("." + module)


def quantizes_lm_head(qcfg: dict[str, Any]) -> bool:
    """Whether a checkpoint's `quantization_config` quantizes the LM head too (its tensors are then
    the format's, e.g. `lm_head.qweight`); a ValueError naming the module when it quantizes the
    token embedding, which no method here can hold."""
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "gptq":
        return bool(qcfg.get("lm_head", False))
    if method == "compressed-tensors":
        ignore = [str(p) for p in qcfg.get("ignore") or []]
        targets = [str(t) for g in (qcfg.get("config_groups") or {}).values() for t in g.get("targets") or []]
        embed = "model.embed_tokens"
        if any(t == "Embedding" or _names(embed, t) for t in targets) and not any(
            _names(embed, p) for p in ignore
        ):
            raise ValueError(
                f"its config groups quantize the token embedding ({embed}), which is not supported"
            )
        targeted = any(t == "Linear" or _names("lm_head", t) for t in targets)
        return targeted and not any(_names("lm_head", p) for p in ignore)
    if method in ("fp8", "awq"):
        # transformers' rule: without the list its defaults keep the LM head; a list that exists
        # and does not name it means the LM head was converted too
        skip = qcfg.get("modules_to_not_convert", qcfg.get("ignored_layers"))
        return skip is not None and not any(_names("lm_head", str(p)) for p in skip)
    return False


def checkpoint_method(qcfg: dict[str, Any], describe: str) -> QuantMethod:
    """The QuantMethod of a checkpoint's `quantization_config`; ValueError naming an unsupported scheme."""
    method = str(qcfg.get("quant_method", "")).lower()
    if method == "gptq":
        bits = int(qcfg.get("bits", 4))
        if bits not in (4, 8):
            raise ValueError(f"gptq with {bits}-bit weights (supported: 4, 8)")
        fmt = str(qcfg.get("checkpoint_format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq checkpoint_format {fmt!r} (supported: gptq, gptq_v2)")
        return GPTQMethod(
            bits,
            int(qcfg.get("group_size", 128)),
            bool(qcfg.get("desc_act", False)),
            1 if fmt == "gptq" else 0,
        )
    if method == "awq":
        version = str(qcfg.get("version", "gemm")).lower()
        bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
        if version != "gemm" or bits != 4 or not qcfg.get("zero_point", True):
            raise ValueError(
                f"awq version {version!r}, {bits}-bit, zero_point {qcfg.get('zero_point', True)} (supported: gemm, 4-bit, zero_point)"
            )
        return AWQMethod(4, int(qcfg.get("group_size", qcfg.get("q_group_size", 128))))
    if method == "fp8" and qcfg.get("weight_block_size"):
        bn, bk = (int(v) for v in qcfg["weight_block_size"])
        return BlockFp8Method((bn, bk))
    if method == "fp8":
        return CheckpointFp8Method(has_input_scale=qcfg.get("activation_scheme", "dynamic") == "static")
    if method == "compressed-tensors":
        return _compressed_tensors_method(qcfg)
    raise ValueError(f"quant_method {method!r}")


def _compressed_tensors_method(qcfg: dict[str, Any]) -> QuantMethod:
    groups = list((qcfg.get("config_groups") or {}).values())
    if len(groups) != 1:
        raise ValueError(f"compressed-tensors with {len(groups)} config groups (supported: 1)")
    fmt = str(qcfg.get("format", ""))
    weights = groups[0].get("weights") or {}
    acts = groups[0].get("input_activations") or {}
    bits, kind, strategy = int(weights.get("num_bits", 0)), weights.get("type"), weights.get("strategy")
    static_input = bool(acts) and not acts.get("dynamic", False)
    if fmt == "float-quantized" and kind == "float" and bits == 8 and strategy in ("channel", "tensor"):
        return CheckpointFp8Method(has_input_scale=static_input)
    if fmt == "int-quantized" and kind == "int" and bits == 8 and strategy in ("channel", "tensor"):
        return CheckpointInt8Method(has_input_scale=static_input)
    if (
        fmt == "pack-quantized"
        and kind == "int"
        and bits in (4, 8)
        and strategy in ("group", "channel")
        and not acts
    ):
        group = int(weights.get("group_size") or 0) if strategy == "group" else 0
        return PackQuantizedMethod(bits, group, bool(weights.get("symmetric", True)))
    raise ValueError(
        f"compressed-tensors format {fmt!r} with {bits}-bit {kind} weights per {strategy}"
        + (" and quantized activations" if acts else "")
    )
