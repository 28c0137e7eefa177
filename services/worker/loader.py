"""Build a model on the meta device and stream its weights in, tensor by tensor.

The module tree is created on `meta` (no memory), materialised empty on the target device in the
target dtype, then each checkpoint tensor is read from safetensors (one file or many, listed by
`model.safetensors.index.json`) and copied into its parameter, or into its shard of a fused
parameter (q/k/v -> qkv_proj, gate/up -> gate_up_proj). Every parameter must be covered exactly;
a tensor that maps nowhere, has the wrong shape or is missing is an error naming it.

Tensor parallelism (services/worker/parallel.py): each rank reads only its slice of a sharded
tensor (safetensors `get_slice`), never the whole tensor: column-parallel rows of q/k/v, gate/up
and the experts' gate/up, row-parallel columns of o_proj, down and the experts' down, vocabulary
rows of the embedding and LM head. A quantized projection's tensors (a full-precision weight
quantized as it loads, or a checkpoint's packed codes, scales and zero points) are sliced the same
way by its QuantMethod (layers/quantization/base.py `read_part`).

Pipeline parallelism: a stage reads only its layers' tensors, and stage 0 also the embedding, the
final norm and the LM head (`_this_stage`); the later stages do not build those modules at all.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import TypeVar

import torch

from kernels import KernelOps
from services.worker.checkpoint import CheckpointTensor, WeightLoadError, iter_checkpoint
from services.worker.layers.linear import Linear, RowParallelLinear
from services.worker.layers.quantization import (
    checkpoint_quant_method,
    checkpoint_quantizes_lm_head,
    make_quant_method,
    model_quantization,
    quantize_linears,
    weight_bytes,
)
from services.worker.layers.split import Split
from services.worker.model_config import ModelConfig
from services.worker.models import model_class
from services.worker.models.llama import LlamaForCausalLM
from services.worker.parallel import shard_layout

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# A decoder layer's tensor: held by one pipeline stage
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
# The decoder's tensors in a checkpoint saved as the base model (transformers' AutoModel, e.g. the
# Qwen3-Embedding checkpoints): named without the "model." of the causal LM
_BASE_MODEL_PREFIXES = ("embed_tokens.", "layers.", "norm.")
# What pipeline stage 0 alone holds: the embedding, the final norm and the LM head
_FIRST_STAGE_PREFIXES = ("model.embed_tokens.", "model.norm.", "lm_head.")
# One expert's projection in a mixture-of-experts block -> (stacked parameter, shard of its rows)
_EXPERT = re.compile(r"^(?P<block>.*\.mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight$")
_EXPERT_PROJS = {
    "gate_proj": ("w13", "gate"),
    "w1": ("w13", "gate"),
    "up_proj": ("w13", "up"),
    "w3": ("w13", "up"),
    "down_proj": ("w2", ""),
    "w2": ("w2", ""),
}


M = TypeVar("M", bound=torch.nn.Module)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# torch.nn.init's in-place initialisers, as the modules' reset_parameters call them
_INITIALISERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """Modules built on meta skip their parameter initialisers (as transformers' `no_init_weights`
    does): a meta tensor holds no values to initialise, and the first initialiser run on one goes
    through torch's reference decompositions, which import torch._dynamo: seconds of every
    worker's start-up for nothing. (Process-wide while the modules are built: the worker builds
    them before it serves anything.)"""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}

    def skip(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    for name in _INITIALISERS:
        setattr(torch.nn.init, name, skip)
    try:
        yield
    finally:
        for name, init in saved.items():
            setattr(torch.nn.init, name, init)


def materialize(module: M, device: torch.device) -> M:
    """`module.to_empty(device=device)` for a module built on meta: the same uninitialised
    tensors (shapes, strides, dtypes, ties), made with `torch.empty_strided`. `to_empty`'s
    `empty_like` of a meta tensor runs torch's reference decomposition, whose first call imports
    sympy, at every worker start-up, for nothing."""
    return module._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))


def _shard_slice(model: LlamaForCausalLM, shard: str) -> tuple[int, int]:
    """(start, size) of a fused parameter's rows that a checkpoint tensor fills (this rank's sizes)."""
    layout, d = shard_layout(model.config), model.config.head_dim
    q, kv, inter = layout.num_heads * d, layout.num_kv_heads * d, layout.intermediate_size
    return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, inter), "up": (inter, inter)}[shard]


def _checkpoint_slice(
    model: LlamaForCausalLM, name: str, shard: str, shape: tuple[int, ...]
) -> tuple[int, int, int]:
    """(dim, start, size) of the checkpoint tensor `name` (a parameter name, after renames and
    fusing) that this rank holds; the whole tensor with T = 1 and for replicated tensors."""
    layout, d = shard_layout(model.config), model.config.head_dim
    whole = (0, 0, shape[0] if shape else 0)
    if layout.tp_size == 1:
        return whole
    r = layout.tp_rank
    if shard == "q":
        return 0, layout.q_head_start * d, layout.num_heads * d
    if shard in ("k", "v"):
        return 0, layout.kv_head_start * d, layout.num_kv_heads * d
    if shard in ("gate", "up"):
        return 0, r * layout.intermediate_size, layout.intermediate_size
    if name.endswith(".o_proj.weight"):
        return 1, layout.q_head_start * d, layout.num_heads * d
    if name.endswith(".attn.sinks"):  # one per query head (gpt-oss)
        return 0, layout.q_head_start, layout.num_heads
    if name.endswith(".down_proj.weight"):
        return 1, r * layout.intermediate_size, layout.intermediate_size
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return 0, layout.vocab_start, max(0, min(layout.vocab_size, shape[0] - layout.vocab_start))
    return whole


def _expert_slice(model: LlamaForCausalLM, part: str) -> tuple[int, int, int]:
    """(dim, start, size) of an expert's checkpoint tensor that this rank holds: a slice of the
    intermediate dimension (gate/up rows, down columns)."""
    layout = shard_layout(model.config)
    inter = layout.moe_intermediate_size
    return (0 if part else 1), layout.tp_rank * inter, inter


def _expert_dest(
    model: LlamaForCausalLM, params: dict[str, torch.nn.Parameter], name: str
) -> tuple[str, str, torch.Tensor] | None:
    """(parameter, shard key, destination view) of an expert tensor; None for any other tensor."""
    match = _EXPERT.match(name)
    if match is None or match["proj"] not in _EXPERT_PROJS:
        return None
    stacked, part = _EXPERT_PROJS[match["proj"]]
    target, expert = f"{match['block']}.{stacked}", int(match["expert"])
    param = params.get(target)
    if param is None or expert >= param.shape[0]:
        return None
    dest = param.data[expert]
    if part:
        inter = shard_layout(model.config).moe_intermediate_size
        dest = dest.narrow(0, 0 if part == "gate" else inter, inter)
    return target, f"{expert}/{part}" if part else str(expert), dest


def _quantized_linears(model: LlamaForCausalLM) -> dict[str, Linear]:
    """Checkpoint weight name ("....qkv_proj.weight") -> its Linear, for layers whose QuantMethod
    quantizes the full-precision tensor as it is loaded (layers/quantization/)."""
    return {
        f"{name}.weight": m
        for name, m in model.named_modules()
        if isinstance(m, Linear) and m.quant_method is not None
    }


def _quantized_split(model: LlamaForCausalLM, layer: Linear, name: str, shard: str) -> Split | None:
    """The slice of a quantized projection this rank holds: a fused part's rows (column-parallel),
    a row-parallel layer's input columns, or the LM head's vocabulary rows (the last rank's may be
    fewer than its padded rows); None for the whole (T = 1, replicated layers)."""
    layout = shard_layout(model.config)
    if layout.tp_size == 1:
        return None
    if name.rsplit(".", 1)[0] == "lm_head":
        start = layout.vocab_start
        return Split(0, start, max(0, min(layout.vocab_size, model.config.vocab_size - start)))
    if not (shard or isinstance(layer, RowParallelLinear)):
        return None
    dim, start, size = _checkpoint_slice(model, name.rsplit(".", 1)[0] + ".weight", shard, ())
    return Split(dim, start, size)


def load_weights(
    model: LlamaForCausalLM,
    tensors: Iterator[tuple[str, str, CheckpointTensor | torch.Tensor]],
    pooling: bool = False,
) -> None:
    """Fill every parameter of `model` from `tensors`. `pooling` (an embed worker): the LM head
    is never used, so a checkpoint without one (an embedding model saved as the base model, e.g.
    Qwen3-Embedding) loads, its LM head zero."""
    quantized = _quantized_linears(model)
    params = dict(model.named_parameters())
    # A quantized layer's own parameters (qweight, scales) are filled from its `.weight` tensor
    owned = {f"{q.rsplit('.', 1)[0]}.{p}" for q, m in quantized.items() for p, _ in m.named_parameters()}
    owned -= {f"{q.rsplit('.', 1)[0]}.bias" for q in quantized}
    targets: dict[str, torch.Tensor] = {n: p for n, p in params.items() if n not in owned}
    targets.update(
        {n: torch.empty(m.out_features, m.in_features, device="meta") for n, m in quantized.items()}
    )
    required: dict[str, set[str]] = {}
    for name, stacked in targets.items():
        if name.endswith(".mlp.w13"):
            required[name] = {f"{e}/{part}" for e in range(stacked.shape[0]) for part in ("gate", "up")}
            continue
        if name.endswith(".mlp.w2"):
            required[name] = {str(e) for e in range(stacked.shape[0])}
            continue
        fused = next(
            (
                f
                for f, _, _ in model.stacked_params
                if name.endswith(f"{f}.weight") or name.endswith(f"{f}.bias")
            ),
            None,
        )
        required[name] = {s for f, _, s in model.stacked_params if f == fused} if fused else {""}
    if pooling and "lm_head.weight" in required and not model.config.tie_word_embeddings:
        del required["lm_head.weight"]
        targets["lm_head.weight"].data.zero_()
    loaded: dict[str, set[str]] = {name: set() for name in targets}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    # A tied LM head reads the embedding, unless the checkpoint quantized it (then it has its own
    # tensors and is untied: build_model)
    tied = model.config.tie_word_embeddings and "lm_head.weight" not in quantized
    if "lm_head.weight" in quantized:  # the last rank's rows past the vocabulary stay zero
        for head_param in quantized["lm_head.weight"].parameters():
            head_param.data.zero_()
    checkpoint = (
        (file_name, name, item if isinstance(item, CheckpointTensor) else CheckpointTensor.of(item))
        for file_name, name, item in tensors
    )
    for file_name, checkpoint_name, item in model.remap_checkpoint(_this_stage(model, checkpoint)):
        name = _full_name(checkpoint_name)
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        source = item
        for old, new in model.checkpoint_renames:
            name = name.replace(old, new)
        if tied and name == "lm_head.weight":  # (a renamed one: LLaVA's language_model.lm_head)
            continue
        expert = _expert_dest(model, params, name)
        if expert is not None:
            target, shard, dest = expert
            tensor = source.read(*_expert_slice(model, shard.partition("/")[2]))
            if tuple(tensor.shape) != tuple(dest.shape):
                raise WeightLoadError(
                    f"{file_name}: tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            loaded[target].add(shard)
            continue
        target, shard = name, ""
        # (a multimodal model's vision tower keeps separate q/k/v: models/llava.py)
        for fused, original, shard_id in (
            () if name.startswith(getattr(model, "unfused_prefixes", ())) else model.stacked_params
        ):
            if f".{original}." in name:
                target, shard = name.replace(f".{original}.", f".{fused}."), shard_id
                break
        module_path, _, suffix = target.rpartition(".")
        qlayer = quantized.get(f"{module_path}.weight")
        if qlayer is not None and suffix != "bias":
            # A quantized layer's tensors (`weight`, or a packed format's qweight / scales / ...)
            # are gathered per shard and handed to its QuantMethod once all have arrived.
            method = qlayer.quant_method
            assert method is not None
            if suffix not in method.checkpoint_suffixes:
                raise WeightLoadError(
                    f"{file_name}: unexpected tensor {checkpoint_name!r} for {method.name} weights "
                    f"(expected {', '.join(method.checkpoint_suffixes)})"
                )
            start, size = _shard_slice(model, shard) if shard else (0, qlayer.out_features)
            split = _quantized_split(model, qlayer, target, shard)
            if module_path == "lm_head" and split is not None:
                size = split.size  # (its vocabulary rows, without the last rank's padding)
            parts = pending.setdefault((module_path, shard), {})
            try:  # this rank's slice of the tensor (quantization/base.py `read_part`)
                parts[suffix] = method.read_part(suffix, source, split)
            except ValueError as exc:
                raise WeightLoadError(f"{file_name}: tensor {checkpoint_name!r}: {exc}") from exc
            if len(parts) == len(method.checkpoint_suffixes):
                del pending[(module_path, shard)]
                try:
                    method.load_checkpoint(qlayer, parts, start, size)
                except ValueError as exc:
                    raise WeightLoadError(f"{file_name}: tensor {checkpoint_name!r}: {exc}") from exc
                loaded[f"{module_path}.weight"].add(shard)
            continue
        param = params.get(target)
        if param is None:
            raise WeightLoadError(
                f"{file_name}: unexpected tensor {checkpoint_name!r} (no such parameter in {type(model).__name__})"
            )
        dest = param.data
        if shard:
            start, size = _shard_slice(model, shard)
            dest = dest.narrow(0, start, size)
        dim, start, size = _checkpoint_slice(model, target, shard, source.shape)
        tensor = source.read(dim, start, size)
        if target in ("model.embed_tokens.weight", "lm_head.weight") and size < dest.shape[0]:
            dest[size:].zero_()  # the last rank's rows past the vocabulary: padding
            dest = dest.narrow(0, 0, size)
        if tuple(tensor.shape) != tuple(dest.shape):
            raise WeightLoadError(
                f"{file_name}: tensor {checkpoint_name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
            )
        dest.copy_(tensor)
        loaded[target].add(shard)
    for (module_path, shard), parts in pending.items():
        qlayer = quantized[f"{module_path}.weight"]
        assert qlayer.quant_method is not None
        missing_parts = sorted(set(qlayer.quant_method.checkpoint_suffixes) - set(parts))
        name = _checkpoint_name(model, f"{module_path}.weight", shard).rsplit(".", 1)[0]
        raise WeightLoadError(
            f"{model.config.path}: missing tensor(s) {', '.join(f'{name}.{p}' for p in missing_parts)}"
        )
    for name, needed in required.items():
        missing = needed - loaded[name]
        if missing:
            if name.endswith((".mlp.w13", ".mlp.w2")):
                block = name.rsplit(".", 1)[0]
                shown = [f"{block}.experts.{s.replace('/', ' ')}" for s in sorted(missing)[:4]]
                raise WeightLoadError(f"{model.config.path}: missing expert tensor(s) {', '.join(shown)}")
            shown = [name] if missing == {""} else [_checkpoint_name(model, name, s) for s in sorted(missing)]
            method = quantized[name].quant_method if name in quantized else None
            if method is not None:  # a quantized layer's own tensors, e.g. lm_head.qweight
                shown = [
                    ", ".join(f"{n.rsplit('.', 1)[0]}.{suffix}" for suffix in method.checkpoint_suffixes)
                    for n in shown
                ]
                shown[-1] += f" ({method.name} weights)"
            raise WeightLoadError(f"{model.config.path}: missing tensor(s) {', '.join(shown)}")


def _full_name(checkpoint_name: str) -> str:
    """A tensor's name as the causal LM names it (a checkpoint saved as the base model, e.g. by
    transformers' AutoModel, names the decoder's tensors without the "model.")."""
    return f"model.{checkpoint_name}" if checkpoint_name.startswith(_BASE_MODEL_PREFIXES) else checkpoint_name


def _this_stage(
    model: LlamaForCausalLM, tensors: Iterator[tuple[str, str, CheckpointTensor]]
) -> Iterator[tuple[str, str, CheckpointTensor]]:
    """The checkpoint's tensors this rank's pipeline stage holds, before anything reads them (a
    family's `remap_checkpoint` reads what it converts): its layers' tensors, and on stage 0 the
    embedding, the final norm and the LM head; everything with P = 1."""
    layout = model.layout
    if layout.pp_size == 1:
        yield from tensors
        return
    for file_name, checkpoint_name, tensor in tensors:
        name = _full_name(checkpoint_name)
        layer = _LAYER.match(name)
        if layer is not None and not layout.holds_layer(int(layer[1])):
            continue  # another pipeline stage's layer
        if name.startswith(_FIRST_STAGE_PREFIXES) and not layout.first_stage:
            continue  # stage 0's embedding, final norm or LM head (models/llama.py OnFirstStage)
        yield file_name, checkpoint_name, tensor


def _checkpoint_name(model: LlamaForCausalLM, name: str, shard: str) -> str:
    for fused, original, shard_id in model.stacked_params:
        if shard_id == shard:
            return name.replace(f".{fused}.", f".{original}.")
    return name


def init_dummy_weights(model: LlamaForCausalLM, seed: int) -> None:
    """Random weights of the right shapes: small normal matrices, unit norms, zero biases.

    Drawn on the parameters' device: an 8B model's worth of CPU randn takes about a minute,
    on a GPU well under a second (the values then differ between CPU and GPU, both seeded)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    quantized = _quantized_linears(model)
    owned = {f"{q.rsplit('.', 1)[0]}.{p}" for q, m in quantized.items() for p, _ in m.named_parameters()}
    for layer in quantized.values():  # drawn in full precision, quantized as a checkpoint would be
        assert layer.quant_method is not None
        values = torch.randn(layer.out_features, layer.in_features, generator=gen, device=device) * 0.02
        layer.quant_method.load_weight(layer, values, 0)
        if layer.bias is not None:
            layer.bias.data.zero_()
    for name, param in model.named_parameters():
        if name in owned:
            continue
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32, device=device) * 0.02
            param.data.copy_(values)


def build_model(
    cfg: ModelConfig,
    ops: KernelOps,
    device: torch.device,
    dtype: torch.dtype,
    load_format: str,
    seed: int = 0,
    quantization: str = "none",
    quantization_group_size: int = 0,
    fold_norms: bool = True,
    pooling: bool = False,
) -> LlamaForCausalLM:
    cls = model_class(cfg.architecture)
    method = checkpoint_quant_method(cfg.path, quantization) if load_format != "dummy" else None
    # The LM head is quantized only where the checkpoint quantized it (then by the same method)
    quantized_head = method is not None and checkpoint_quantizes_lm_head(cfg.path)
    if method is None:
        method = make_quant_method(quantization, quantization_group_size)
    with _default_dtype(dtype), torch.device("meta"), _skip_init():
        model = cls(cfg, ops)
        if method is not None:  # the layers' quantized parameters replace their weights, still on meta
            quantize_linears(model, method, lm_head=quantized_head)
    model = materialize(model, device)
    if cfg.tie_word_embeddings and not quantized_head and model.layout.first_stage:
        # materialize keeps the tie, but be explicit (a later pipeline stage holds neither)
        model.lm_head.weight = model.model.embed_tokens.weight
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_weights(model, iter_checkpoint(cfg.path), pooling)
    # Once the weights are final (checkpoint or dummy): each layer's RMSNorm weights go into the
    # next projection where the kernel bundle can run that path (models/llama.py `fold_norms`;
    # a quantized model's into its GEMMs, its codes untouched).
    folded = model.fold_norms() if fold_norms else False
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s (%s, %.1fM parameters, %s, weights %s: %.1f MB) on %s; layer norms %s",
        cfg.path,
        cfg.architecture,
        num_params / 1e6,
        dtype,
        model_quantization(model),
        weight_bytes(model) / 1e6,
        device,
        ("folded into the qkv/gate_up GEMMs" if method is not None else "folded into qkv/gate_up")
        if folded
        else "separate",
    )
    return model
