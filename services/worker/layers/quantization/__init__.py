"""Weight formats of `Linear` layers: a `QuantMethod` per format (base.py).

`--quantization int8 | fp8 | int4` quantizes a full-precision checkpoint at load time (int8.py, fp8.py).
Every projection of the decoder layers is quantized; the embedding and the LM head stay in the
model dtype, and so do MoE experts (their fused kernel reads full-precision weights).
Pre-quantized checkpoints (config.json `quantization_config`) are detected by
`checkpoint_quantization` and, until their formats land, refused with an error naming the scheme.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from services.worker.layers.linear import Linear
from services.worker.layers.quantization.base import QuantMethod, weight_bytes
from services.worker.layers.quantization.fp8 import Fp8Method
from services.worker.layers.quantization.int4 import Int4Method
from services.worker.layers.quantization.int8 import Int8Method

__all__ = [
    "QUANTIZATIONS",
    "QuantMethod",
    "UnsupportedQuantizationError",
    "checkpoint_quantization",
    "make_quant_method",
    "quantize_linears",
    "weight_bytes",
]

QUANTIZATIONS = ("none", "int8", "fp8", "int4")
# Modules kept in the model dtype: the LM head (often tied to the embedding, and the logits'
# precision matters most for sampling).
_KEEP_FULL_PRECISION = ("lm_head",)


class UnsupportedQuantizationError(ValueError):
    """A quantization scheme this worker cannot load (the message names it)."""


def make_quant_method(name: str, group_size: int = 0) -> QuantMethod | None:
    if name == "none":
        return None
    if name == "int8":
        return Int8Method(group_size)
    if name == "int4":
        return Int4Method(group_size)
    if name == "fp8":
        if group_size:
            raise UnsupportedQuantizationError(
                "--quantization fp8 is per channel; --quantization-group-size is for int8 / int4"
            )
        return Fp8Method()
    raise UnsupportedQuantizationError(
        f"unknown --quantization {name!r}; choose one of {', '.join(QUANTIZATIONS)}"
    )


def quantize_linears(model: nn.Module, method: QuantMethod) -> int:
    """Give every decoder-layer `Linear` the method (on the meta device, before the weights
    exist); the number of layers it applies to."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name.split(".")[-1] not in _KEEP_FULL_PRECISION:
            module.set_quant_method(method)
            count += 1
    return count


def checkpoint_quantization(model_dir: str) -> dict[str, Any] | None:
    """config.json's `quantization_config` (a pre-quantized checkpoint), or None."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    qcfg = json.loads(path.read_text()).get("quantization_config")
    return qcfg if isinstance(qcfg, dict) else None


def describe_scheme(qcfg: dict[str, Any]) -> str:
    """A short name of a checkpoint's scheme for error messages, e.g. "awq (4-bit, group 128)"."""
    method = str(qcfg.get("quant_method", "unknown"))
    details = [f"{qcfg['bits']}-bit" for _ in [0] if "bits" in qcfg]
    if "group_size" in qcfg:
        details.append(f"group {qcfg['group_size']}")
    if "fmt" in qcfg:
        details.append(str(qcfg["fmt"]))
    if "weight_block_size" in qcfg:
        details.append(f"blocks {qcfg['weight_block_size']}")
    return f"{method} ({', '.join(details)})" if details else method


def reject_prequantized(model_dir: str) -> None:
    qcfg = checkpoint_quantization(model_dir)
    if qcfg is not None:
        raise UnsupportedQuantizationError(
            f"{model_dir}: pre-quantized checkpoint with quantization_config {describe_scheme(qcfg)} "
            "is not supported by this worker (supported: full-precision checkpoints, quantized at load "
            "with --quantization int8 | fp8)"
        )
