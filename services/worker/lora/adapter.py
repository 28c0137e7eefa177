"""A LoRA adapter in the PEFT format, read and checked against the served model.

A PEFT adapter directory holds `adapter_config.json` (r, lora_alpha, target_modules, use_rslora,
base_model_name_or_path, ...) and `adapter_model.safetensors`, whose tensors are named
`base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight` with
A [r, in_features] and B [out_features, r]. The update of a projection is
y += scaling * (x @ A^T) @ B^T with scaling = lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)).

Everything that could go wrong is checked here, at load, and raised as `LoRAAdapterError` with a
message a person can act on (the servicer turns it into INVALID_ARGUMENT, the gateway into 400).
The weights are kept on the host in fp32 with the scaling folded into B; pool.py copies them into
a device slot when a step needs the adapter.

In a tensor-parallel group each rank reads only its shard, sliced like the projection it adapts
(vLLM's `vllm/lora/layers` scheme): a column-parallel projection (qkv_proj, gate_up_proj) keeps A
whole and the rows of B that produce the rank's output columns (its q/k/v heads, its gate and up
rows); a row-parallel one (o_proj, down_proj) keeps the columns of A that read the rank's input
slice and B whole, so each rank's delta is a partial sum that the layer's one all-reduce adds up
with the base projection's. A pipeline stage reads only its layers. The shapes are checked
against the whole model on every rank (from the file's header, without reading the tensors).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from services.common.block_hash import lora_root_hash

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Projection module -> (the model's fused projection holding it, its index among the fused parts)
MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
}
# How many checkpoint modules each fused projection stacks
FUSED_PARTS = {"qkv_proj": 3, "o_proj": 1, "gate_up_proj": 2, "down_proj": 1}

_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_ids = itertools.count(1)


class LoRAAdapterError(ValueError):
    """An adapter that cannot be served beside this model (bad files, rank, modules or shapes)."""


@dataclass(frozen=True)
class ProjectionShape:
    """One fused projection of a layer: its input width and the output width of each part in the
    whole model (what an adapter's tensors must match), and the slices this rank holds."""

    in_features: int
    part_out: tuple[int, ...]  # e.g. (q_size, kv_size, kv_size) for qkv_proj
    # Column-parallel: per part, (first row, rows) of its lora_B this rank keeps; None = all of them
    part_rows: tuple[tuple[int, int], ...] | None = None
    # Row-parallel: (first column, columns) of lora_A this rank keeps; None = all of them
    in_cols: tuple[int, int] | None = None

    @property
    def local_in(self) -> int:
        """Input width of this rank's slice of the projection."""
        return self.in_cols[1] if self.in_cols is not None else self.in_features

    @property
    def local_part_out(self) -> tuple[int, ...]:
        """Output width of each part in this rank's slice of the projection."""
        return tuple(n for _, n in self.part_rows) if self.part_rows is not None else self.part_out


@dataclass(frozen=True)
class ModelShapes:
    """What an adapter must fit: the layer count and every fused projection's shape."""

    num_layers: int
    projections: dict[str, ProjectionShape]
    hidden_size: int
    layers: tuple[int, int] | None = None  # [start, end) this pipeline stage holds; None = all

    def holds_layer(self, layer: int) -> bool:
        return self.layers is None or self.layers[0] <= layer < self.layers[1]


@dataclass(frozen=True)
class LoRAWeights:
    a: torch.Tensor  # [r, in_features] fp32
    b: torch.Tensor  # [out_features, r] fp32, scaling folded in


@dataclass(frozen=True, eq=False)
class LoRAAdapter:
    """A loaded adapter: its weights on the host, keyed by (layer, module name)."""

    name: str
    path: str
    rank: int
    scaling: float
    weights: dict[tuple[int, str], LoRAWeights] = field(repr=False)
    base_model: str = ""
    # Distinguishes two loads (even of one name): the device pool keys its slots by it.
    lora_id: int = field(default_factory=lambda: next(_ids))
    digest: str = ""  # blake2b of the adapter's files: the same adapter under any name

    @property
    def target_modules(self) -> list[str]:
        return sorted({module for _, module in self.weights})

    @property
    def root_hash(self) -> int:
        """The prefix cache's chain root for prompts under this adapter (services/common/block_hash.py):
        the same tokens under two adapters, or under none, never share KV."""
        return lora_root_hash(self.digest)


def load_adapter(
    name: str, path: str, shapes: ModelShapes, max_rank: int, lora_id: int | None = None
) -> LoRAAdapter:
    """Read and check the PEFT adapter in directory `path` (this rank's shard of it); raises
    LoRAAdapterError. `lora_id`: the id rank 0 gave the adapter (the other ranks of a group)."""
    if not name:
        raise LoRAAdapterError("the adapter needs a name")
    directory = Path(path)
    if not directory.is_dir():
        raise LoRAAdapterError(f"adapter {name!r}: {path!r} is not a directory")
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise LoRAAdapterError(f"adapter {name!r}: {CONFIG_FILE} is missing in {path}")
    if not weights_path.is_file():
        hint = (
            " (adapter_model.bin is not read: save with safe_serialization)"
            if (directory / "adapter_model.bin").exists()
            else ""
        )
        raise LoRAAdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is missing in {path}{hint}")
    config_bytes = config_path.read_bytes()
    try:
        config = json.loads(config_bytes)
        assert isinstance(config, dict)
    except (ValueError, AssertionError):
        raise LoRAAdapterError(f"adapter {name!r}: {CONFIG_FILE} is not a JSON object") from None
    rank, scaling = _check_config(name, config, max_rank)
    weights = _read_weights(name, weights_path, shapes, max_rank, scaling)
    digest = hashlib.blake2b(config_bytes + b"\0", digest_size=16)
    with weights_path.open("rb") as f:  # (in chunks: the digest never needs the whole file in memory)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return LoRAAdapter(
        name=name,
        path=str(directory),
        rank=rank,
        scaling=scaling,
        weights=weights,
        base_model=str(config.get("base_model_name_or_path") or ""),
        digest=digest.hexdigest(),
        **({"lora_id": lora_id} if lora_id is not None else {}),
    )


def _check_config(name: str, config: dict[str, object], max_rank: int) -> tuple[int, float]:
    """(rank, scaling) of a supported config."""
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoRAAdapterError(f"adapter {name!r}: peft_type {peft_type!r} is not served (only LORA)")
    rank = config.get("r")
    if not isinstance(rank, int) or rank <= 0:
        raise LoRAAdapterError(
            f"adapter {name!r}: adapter_config.json needs a positive integer r, got {rank!r}"
        )
    if rank > max_rank:
        raise LoRAAdapterError(f"adapter {name!r}: rank {rank} is above --max-lora-rank {max_rank}")
    alpha = config.get("lora_alpha", rank)
    if not isinstance(alpha, int | float):
        raise LoRAAdapterError(f"adapter {name!r}: lora_alpha must be a number, got {alpha!r}")
    for key, what in (
        ("use_dora", "DoRA"),
        ("rank_pattern", "per-module ranks (rank_pattern)"),
        ("alpha_pattern", "per-module alphas (alpha_pattern)"),
        ("modules_to_save", "fully trained modules (modules_to_save)"),
        ("fan_in_fan_out", "fan_in_fan_out weights (GPT-2 style Conv1D)"),
        ("lora_bias", "a bias on lora_B (lora_bias)"),
        ("use_qalora", "QALoRA (use_qalora)"),
        ("layer_replication", "layer replication (layer_replication)"),
        ("trainable_token_indices", "trained token embeddings (trainable_token_indices)"),
        ("target_parameters", "adapted parameters (target_parameters, e.g. MoE experts)"),
    ):
        if config.get(key):
            raise LoRAAdapterError(f"adapter {name!r}: {what} is not supported")
    if config.get("bias", "none") != "none":
        raise LoRAAdapterError(
            f"adapter {name!r}: trained biases (bias={config['bias']!r}) are not supported"
        )
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(scaling)


def _read_weights(
    name: str, weights_path: Path, shapes: ModelShapes, max_rank: int, scaling: float
) -> dict[tuple[int, str], LoRAWeights]:
    """Every tensor's name and shape checked (from the header), this rank's slices read."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(weights_path), framework="pt")
    except Exception as exc:  # the library raises several types for a damaged file
        raise _damaged(name, exc) from None
    weights: dict[tuple[int, str], LoRAWeights] = {}
    with handle:
        for (layer, module), keys in sorted(_pairs(name, list(handle.keys()), shapes).items()):
            a_slice, b_slice = handle.get_slice(keys["A"]), handle.get_slice(keys["B"])
            proj = _check_shapes(
                name, layer, module, a_slice.get_shape(), b_slice.get_shape(), shapes, max_rank
            )
            if not shapes.holds_layer(layer):
                continue
            cols = proj.in_cols  # row-parallel: this rank's input columns of A
            rows = proj.part_rows[MODULES[module][1]] if proj.part_rows else None  # column-parallel: of B
            try:
                a = a_slice[:, cols[0] : cols[0] + cols[1]] if cols else a_slice[:]
                b = b_slice[rows[0] : rows[0] + rows[1]] if rows else b_slice[:]
            except Exception as exc:  # (a file cut short after its header)
                raise _damaged(name, exc) from None
            weights[(layer, module)] = LoRAWeights(a.float().contiguous(), (b.float() * scaling).contiguous())
    return weights


def _damaged(name: str, exc: Exception) -> LoRAAdapterError:
    return LoRAAdapterError(f"adapter {name!r}: {WEIGHTS_FILE} is not a valid safetensors file ({exc})")


def _pairs(name: str, keys: list[str], shapes: ModelShapes) -> dict[tuple[int, str], dict[str, str]]:
    """The file's tensor names by (layer, module) and A / B; names that are not served refused."""
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in keys:
        match = _KEY.match(key)
        if match is None:
            raise LoRAAdapterError(
                f"adapter {name!r}: tensor {key!r} is not a LoRA weight of a decoder projection "
                f"({', '.join(MODULES)})"
            )
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if module not in MODULES:
            raise LoRAAdapterError(
                f"adapter {name!r}: target module {module!r} is not one this model serves LoRA on ({', '.join(MODULES)})"
            )
        if layer >= shapes.num_layers:
            raise LoRAAdapterError(
                f"adapter {name!r}: tensor {key!r} is for layer {layer}, the model has {shapes.num_layers}"
            )
        pairs.setdefault((layer, module), {})[which] = key
    if not pairs:
        raise LoRAAdapterError(f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights")
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoRAAdapterError(
                f"adapter {name!r}: layer {layer} {module} has lora_A or lora_B but not both"
            )
    return pairs


def _check_shapes(
    name: str,
    layer: int,
    module: str,
    a_shape: list[int],
    b_shape: list[int],
    shapes: ModelShapes,
    max_rank: int,
) -> ProjectionShape:
    """The projection `module` belongs to, once its A and B shapes are the model's."""
    fused, part = MODULES[module]
    proj = shapes.projections.get(fused)
    if proj is None:
        raise LoRAAdapterError(
            f"adapter {name!r}: target module {module!r} is not a dense projection of every layer of "
            "this model (a mixture-of-experts MLP has none): the model lacks it"
        )
    rank = a_shape[0] if a_shape else 0
    want_a, want_b = (rank, proj.in_features), (proj.part_out[part], rank)
    if tuple(a_shape) != want_a or tuple(b_shape) != want_b:
        raise LoRAAdapterError(
            f"adapter {name!r}: layer {layer} {module} has lora_A {tuple(a_shape)} and lora_B "
            f"{tuple(b_shape)}, this model needs {want_a} and {want_b} (hidden size "
            f"{shapes.hidden_size}): was it trained for a different base model?"
        )
    if rank > max_rank:
        raise LoRAAdapterError(
            f"adapter {name!r}: layer {layer} {module} has rank {rank}, above --max-lora-rank {max_rank}"
        )
    return proj
