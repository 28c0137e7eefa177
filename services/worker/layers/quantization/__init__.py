"""Weight formats of `Linear` layers: a `QuantMethod` per format (base.py).

`--quantization int8 | fp8 | int4` quantizes a full-precision checkpoint at load time (int8.py, fp8.py).
Every projection of the decoder layers is quantized; the embedding and the LM head stay in the
model dtype, and so do MoE experts (their fused kernel reads full-precision weights).
Pre-quantized checkpoints (config.json `quantization_config`) load through their own methods
(checkpoint_formats.py: AWQ, GPTQ, compressed-tensors, FP8); an unsupported scheme is an error
naming it. Their LM head is quantized, by the same method, when the checkpoint quantizes it
(`checkpoint_quantizes_lm_head`); a tied LM head is then untied from the (full-precision) embedding.
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
    "checkpoint_quant_method",
    "checkpoint_quantization",
    "checkpoint_quantizes_lm_head",
    "make_quant_method",
    "model_quantization",
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


def quantize_linears(model: nn.Module, method: QuantMethod, lm_head: bool = False) -> int:
    """Give every decoder-layer `Linear` the method (on the meta device, before the weights
    exist), and the LM head too with `lm_head` (a checkpoint that quantizes it); the number of
    layers it applies to."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, Linear) and (lm_head or name.split(".")[-1] not in _KEEP_FULL_PRECISION):
            try:
                module.set_quant_method(method)
            except ValueError as exc:
                raise UnsupportedQuantizationError(f"{name}: {exc}") from exc
            count += 1
    return count


def model_quantization(model: nn.Module) -> str:
    """The weight format of a model's projections: "none" or its QuantMethod's name."""
    for module in model.modules():
        if isinstance(module, Linear) and module.quant_method is not None:
            return module.quant_method.name
    return "none"


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


def checkpoint_quant_method(model_dir: str, flag: str) -> QuantMethod | None:
    """The QuantMethod of a pre-quantized checkpoint (config.json `quantization_config`), None
    for a full-precision one; an unsupported scheme is an error naming it."""
    from services.worker.layers.quantization.checkpoint_formats import checkpoint_method

    qcfg = checkpoint_quantization(model_dir)
    if qcfg is None:
        return None
    if qcfg.get("quant_method") == "mxfp4":
        # gpt-oss as shipped: only the experts are MXFP4, dequantized as they load (mxfp4.py,
        # models/gpt_oss.py); every Linear is full precision
        return None
    scheme = describe_scheme(qcfg)
    if flag != "none":
        raise UnsupportedQuantizationError(
            f"{model_dir}: the checkpoint is already quantized ({scheme}); drop --quantization {flag}"
        )
    try:
        return checkpoint_method(qcfg, scheme)
    except ValueError as exc:
        raise UnsupportedQuantizationError(
            f"{model_dir}: unsupported quantization_config {scheme}: {exc} "
            "(supported: awq gemm 4-bit, gptq 4/8-bit, compressed-tensors fp8 / int8 / pack-quantized, "
            "fp8 per-channel or block-wise)"
        ) from exc


def checkpoint_quantizes_lm_head(model_dir: str) -> bool:
    """Whether a pre-quantized checkpoint quantizes its LM head (checkpoint_formats.py
    `quantizes_lm_head`); an error naming the scheme when it quantizes the embedding."""
    from services.worker.layers.quantization.checkpoint_formats import quantizes_lm_head

    qcfg = checkpoint_quantization(model_dir)
    if qcfg is None or qcfg.get("quant_method") == "mxfp4":
        return False
    try:
        return quantizes_lm_head(qcfg)
    except ValueError as exc:
        raise UnsupportedQuantizationError(
            f"{model_dir}: unsupported quantization_config {describe_scheme(qcfg)}: {exc}"
        ) from exc
