"""Pre-quantized checkpoints (services/worker/layers/quantization/checkpoint_formats.py), detected
from config.json's `quantization_config` with no flag.

Each tiny checkpoint is written here to its format's documented layout (GPTQ v1 with and without
act-order, 4- and 8-bit, symmetric and not; AWQ GEMM; compressed-tensors pack-quantized W4A16,
float-quantized FP8 and int-quantized INT8; block-wise FP8) from a random tiny Llama. The worker's
dequantized weights must equal this file's own dequantization of what it wrote, and its greedy
tokens (8 requests in flight) those of transformers running those dequantized weights in fp32.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.layers.quantization import UnsupportedQuantizationError
from tests.worker.worker_testlib import TINY_BUILDERS, check_greedy

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FP8 = torch.float8_e4m3fn


def _pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Unsigned codes -> int32 words of 32 / bits values along dim (value i at bits * i)."""
    per = 32 // bits
    c = codes.to(torch.int64)
    if dim == 0:
        c = c.reshape(c.shape[0] // per, per, c.shape[1]).permute(0, 2, 1)
    else:
        c = c.reshape(c.shape[0], c.shape[1] // per, per)
    words = sum(c[..., i] << (bits * i) for i in range(per))
    return words.to(torch.int32)  # wraps past 2^31 like the packers' int32 arithmetic


def _int_groups(w: torch.Tensor, bits: int, group_ids: torch.Tensor, groups: int, sym: bool):
    """Codes [N, K] (unsigned), scales [N, G] fp16, zeros [N, G] (unsigned) of w over the groups."""
    n, _ = w.shape
    qmax = (1 << bits) - 1
    scales, zeros = torch.zeros(n, groups), torch.zeros(n, groups)
    for g in range(groups):
        cols = w[:, group_ids == g]
        if sym:
            scales[:, g] = cols.abs().amax(1) / ((qmax - 1) / 2)
            zeros[:, g] = (qmax + 1) // 2
        else:
            lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
            scales[:, g] = (hi - lo) / qmax
            zeros[:, g] = torch.round(-lo / scales[:, g]).clamp(0, qmax)
    scales = scales.half()
    s, z = scales.float()[:, group_ids], zeros[:, group_ids]
    codes = torch.round(w / s + z).clamp(0, qmax)
    return codes.to(torch.int32), scales, zeros.to(torch.int32)


def _deq(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_ids: torch.Tensor
) -> torch.Tensor:
    return (codes.float() - zeros.float()[:, group_ids]) * scales.float()[:, group_ids]


# Each writer: (checkpoint name, weight [N, K] fp32, layer index) -> (tensors, dequantized weight)
Writer = Callable[[str, torch.Tensor, int], tuple[dict[str, torch.Tensor], torch.Tensor]]


def gptq_writer(bits: int, group: int, sym: bool, act_order: bool) -> Writer:
    def write(name: str, w: torch.Tensor, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        k = w.shape[1]
        if act_order:  # one column order per layer input (q/k/v and gate/up share theirs)
            gen = torch.Generator().manual_seed(1000 * layer + k)
            perm = torch.randperm(k, generator=gen)
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perm] = (torch.arange(k) // group).to(torch.int32)
        else:
            g_idx = (torch.arange(k) // group).to(torch.int32)
        codes, scales, zeros = _int_groups(w, bits, g_idx.long(), k // group, sym)
        tensors = {
            f"{name}.qweight": _pack_int32(codes.t(), bits, dim=0),
            f"{name}.qzeros": _pack_int32((zeros - 1).t(), bits, dim=1),  # v1 stores zero - 1
            f"{name}.scales": scales.t().contiguous(),
            f"{name}.g_idx": g_idx,
        }
        return tensors, _deq(codes, scales, zeros, g_idx.long())

    return write


def awq_writer(name: str, w: torch.Tensor, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    k = w.shape[1]
    gid = torch.arange(k) // 32
    codes, scales, zeros = _int_groups(w, 4, gid, k // 32, sym=False)

    def pack(values: torch.Tensor) -> torch.Tensor:  # [R, N] -> [R, N / 8], AWQ's interleave
        v = values.to(torch.int64).reshape(values.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]
        return sum(v[..., i] << (4 * i) for i in range(8)).to(torch.int32)

    tensors = {
        f"{name}.qweight": pack(codes.t()),
        f"{name}.qzeros": pack(zeros.t()),
        f"{name}.scales": scales.t().contiguous(),
    }
    return tensors, _deq(codes, scales, zeros, gid)


def ct_w4a16_writer(name: str, w: torch.Tensor, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    k = w.shape[1]
    gid = torch.arange(k) // 32
    codes, scales, zeros = _int_groups(w, 4, gid, k // 32, sym=True)  # stored as q + 8
    tensors = {
        f"{name}.weight_packed": _pack_int32(codes, 4, dim=1),
        f"{name}.weight_scale": scales,
        f"{name}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }
    return tensors, _deq(codes, scales, zeros, gid)


def ct_fp8_writer(name: str, w: torch.Tensor, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    scale = w.abs().amax(1, keepdim=True) / 448.0
    q = (w / scale).to(FP8)
    return {f"{name}.weight": q, f"{name}.weight_scale": scale}, q.float() * scale


def ct_int8_writer(name: str, w: torch.Tensor, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    scale = w.abs().amax(1, keepdim=True) / 127.0
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return {f"{name}.weight": q, f"{name}.weight_scale": scale}, q.float() * scale


def block_fp8_writer(name: str, w: torch.Tensor, layer: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    b = 32
    n, k = w.shape
    blocks = w.reshape(n // b, b, k // b, b)
    scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # [N / b, K / b]
    q = (blocks / scale[:, None, :, None]).to(FP8).reshape(n, k)
    deq = (q.float().reshape(n // b, b, k // b, b) * scale[:, None, :, None]).reshape(n, k)
    return {f"{name}.weight": q, f"{name}.weight_scale_inv": scale}, deq


def _ct_config(fmt: str, weights: dict[str, Any], acts: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
        "ignore": ["lm_head"],
    }


FORMATS: dict[str, tuple[dict[str, Any], Writer]] = {
    "gptq-4bit-asym": (
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False},
        gptq_writer(4, 32, False, False),
    ),
    "gptq-4bit-act-order": (
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True},
        gptq_writer(4, 32, True, True),
    ),
    "gptq-8bit": (
        {"quant_method": "gptq", "bits": 8, "group_size": 64, "desc_act": False, "sym": True},
        gptq_writer(8, 64, True, False),
    ),
    "awq": (
        {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True},
        awq_writer,
    ),
    "ct-w4a16": (
        _ct_config(
            "pack-quantized",
            {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32, "symmetric": True},
            None,
        ),
        ct_w4a16_writer,
    ),
    "ct-fp8": (
        _ct_config(
            "float-quantized",
            {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True},
            {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True},
        ),
        ct_fp8_writer,
    ),
    "ct-int8": (
        _ct_config(
            "int-quantized",
            {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
            {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True},
        ),
        ct_int8_writer,
    ),
    "block-fp8": (
        {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [32, 32]},
        block_fp8_writer,
    ),
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    torch.manual_seed(0)
    hf = TINY_BUILDERS["llama"]().eval()
    path = tmp_path_factory.mktemp("ckpt-llama")
    hf.save_pretrained(str(path))
    return path, hf


def write_checkpoint(src: Path, hf: Any, dest: Path, fmt: str) -> Any:
    """The checkpoint in `fmt` at dest; returns transformers' model with the dequantized weights."""
    qcfg, writer = FORMATS[fmt]
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qcfg
    (dest / "config.json").write_text(json.dumps(config))
    for extra in ("generation_config.json",):
        if (src / extra).is_file():
            (dest / extra).write_text((src / extra).read_text())
    ref = copy.deepcopy(hf)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in hf.state_dict().items():
            module, _, suffix = name.rpartition(".")
            if suffix == "weight" and module.rsplit(".", 1)[-1] in PROJ:
                layer = int(module.split(".")[2])
                written, deq = writer(module, param.float(), layer)
                tensors.update(written)
                ref.get_submodule(module).weight.copy_(deq)
            else:
                tensors[name] = param.contiguous()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"))
    return ref


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_checkpoint_loads_to_its_dequantized_weights_and_greedy_tokens(
    tiny_llama: tuple[Path, Any], tmp_path: Path, fmt: str
) -> None:
    src, hf = tiny_llama
    ref = write_checkpoint(src, hf, tmp_path, fmt)
    engine = Engine(WorkerConfig(model=str(tmp_path), device="cpu", kv_cache_memory="16MiB"))
    model = engine.runner.model
    cfg = model.config
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    for ours, theirs in zip(model.model.layers, ref.model.layers, strict=True):
        qkv = ours.self_attn.qkv_proj.quant_method.dequantized_weight(ours.self_attn.qkv_proj)
        expected = torch.cat(
            [theirs.self_attn.q_proj.weight, theirs.self_attn.k_proj.weight, theirs.self_attn.v_proj.weight]
        )
        torch.testing.assert_close(qkv, expected.detach(), atol=1e-6, rtol=1e-5)
        assert qkv.shape == (q + 2 * kv, cfg.hidden_size)
        down = ours.mlp.down_proj
        torch.testing.assert_close(
            down.quant_method.dequantized_weight(down),
            theirs.mlp.down_proj.weight.detach(),
            atol=1e-6,
            rtol=1e-5,
        )
        gate_up = ours.mlp.gate_up_proj
        torch.testing.assert_close(
            gate_up.quant_method.dequantized_weight(gate_up)[inter:],
            theirs.mlp.up_proj.weight.detach(),
            atol=1e-6,
            rtol=1e-5,
        )
    assert model.lm_head.quant_method is None
    # decode steps fold the norms into the quantized GEMMs, except where the format has no fused
    # GEMM (act-order gathers x's columns per call; block FP8 is dequantized per call)
    assert model.norms_folded == (fmt not in ("gptq-4bit-act-order", "block-fp8"))
    check_greedy(engine, ref, hf.config.vocab_size, fmt)


@pytest.mark.parametrize(
    ("qcfg", "named"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "awq version 'gemv'"),
        ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "gptq with 3-bit"),
        (
            _ct_config(
                "nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "tensor_group"}, None
            ),
            "nvfp4-pack-quantized",
        ),
    ],
)
def test_unsupported_scheme_is_an_error_naming_it(
    tiny_llama: tuple[Path, Any], tmp_path: Path, qcfg: dict[str, Any], named: str
) -> None:
    src, _ = tiny_llama
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = qcfg
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError, match=named):
        Engine(WorkerConfig(model=str(tmp_path), device="cpu", kv_cache_memory="16MiB"))


def test_flag_on_a_quantized_checkpoint_is_refused(tiny_llama: tuple[Path, Any], tmp_path: Path) -> None:
    src, hf = tiny_llama
    write_checkpoint(src, hf, tmp_path, "awq")
    with pytest.raises(UnsupportedQuantizationError, match="already quantized"):
        Engine(WorkerConfig(model=str(tmp_path), device="cpu", kv_cache_memory="16MiB", quantization="int8"))
