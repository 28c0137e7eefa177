"""Pre-quantized checkpoints whose LM head is quantized too (GPTQ `lm_head: true`; compressed-tensors
config groups targeting "Linear" with no `ignore` of lm_head; `fp8` / `awq` with a
`modules_to_not_convert` that does not name it): the LM head loads through the same QuantMethod as
the decoder's projections. The worker's dequantized LM head equals this file's dequantization of
what it wrote, and its greedy tokens (8 requests in flight) equal transformers' running all the
dequantized weights in fp32. A tied LM head is untied (the embedding stays full precision); a
checkpoint that quantizes the embedding is refused naming it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from services.worker.config import WorkerConfig
from services.worker.engine import Engine
from services.worker.layers.quantization import UnsupportedQuantizationError
from services.worker.layers.quantization.checkpoint_formats import quantizes_lm_head
from tests.worker.test_checkpoint_formats import FORMATS, PROJ, _ct_config
from tests.worker.worker_testlib import TINY_BUILDERS, check_greedy


def head_config(fmt: str) -> dict[str, Any]:
    """FORMATS[fmt]'s quantization_config, saying that the LM head is quantized too."""
    qcfg = copy.deepcopy(FORMATS[fmt][0])
    if qcfg["quant_method"] == "gptq":
        qcfg["lm_head"] = True
    elif qcfg["quant_method"] == "compressed-tensors":
        qcfg["ignore"] = []  # targets ["Linear"] then cover the LM head
    else:  # fp8, awq: transformers' rule
        qcfg["modules_to_not_convert"] = []
    return qcfg


def write_quantized_head_checkpoint(hf: Any, dest: Path, fmt: str) -> Any:
    """`hf` written in `fmt` with its LM head quantized too (untied if it was tied); returns
    transformers' model with every quantized weight replaced by its dequantization."""
    _, writer = FORMATS[fmt]
    hf.save_pretrained(str(dest))  # config.json, generation_config.json; the weights rewritten below
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"] = head_config(fmt)
    (dest / "config.json").write_text(json.dumps(config))
    ref = copy.deepcopy(hf)
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, param in hf.state_dict().items():
            module, _, suffix = name.rpartition(".")
            short = module.rsplit(".", 1)[-1]
            if suffix == "weight" and (short in PROJ or module == "lm_head"):
                layer = int(module.split(".")[2]) if short in PROJ else 0
                written, deq = writer(module, param.float(), layer)
                tensors.update(written)
                if module == "lm_head":  # its own parameter: a tied embedding keeps its weight
                    ref.lm_head.weight = nn.Parameter(deq)
                else:
                    ref.get_submodule(module).weight.copy_(deq)
            else:
                tensors[name] = param.contiguous()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"))
    return ref


@pytest.mark.parametrize("fmt", ["gptq-4bit-asym", "awq", "ct-w4a16", "ct-fp8", "ct-int8", "block-fp8"])
def test_quantized_lm_head_loads_and_matches_transformers(tmp_path: Path, fmt: str) -> None:
    torch.manual_seed(0)
    hf = TINY_BUILDERS["llama"]().eval()
    ref = write_quantized_head_checkpoint(hf, tmp_path, fmt)
    engine = Engine(WorkerConfig(model=str(tmp_path), device="cpu", kv_cache_memory="16MiB"))
    head = engine.runner.model.lm_head
    assert head.quant_method is not None and not hasattr(head, "weight")
    assert head.quant_method is engine.runner.model.model.layers[0].self_attn.qkv_proj.quant_method
    torch.testing.assert_close(
        head.quant_method.dequantized_weight(head), ref.lm_head.weight.detach(), atol=1e-6, rtol=1e-5
    )
    check_greedy(engine, ref, hf.config.vocab_size)


def test_tied_lm_head_quantized_by_the_checkpoint_is_untied(tmp_path: Path) -> None:
    """Qwen2 (tied embeddings, qkv bias), GPTQ with `lm_head: true`: the LM head is the
    checkpoint's quantized one, the embedding the full-precision tensor."""
    torch.manual_seed(0)
    hf = TINY_BUILDERS["qwen2"]().eval()
    assert hf.config.tie_word_embeddings
    ref = write_quantized_head_checkpoint(hf, tmp_path, "gptq-4bit-asym")
    engine = Engine(WorkerConfig(model=str(tmp_path), device="cpu", kv_cache_memory="16MiB"))
    model = engine.runner.model
    assert model.lm_head.quant_method is not None
    torch.testing.assert_close(model.model.embed_tokens.weight, hf.model.embed_tokens.weight.detach())
    torch.testing.assert_close(
        model.lm_head.quant_method.dequantized_weight(model.lm_head),
        ref.lm_head.weight.detach(),
        atol=1e-6,
        rtol=1e-5,
    )
    check_greedy(engine, ref, hf.config.vocab_size)


def test_quantized_lm_head_without_its_tensors_is_a_clear_error(tmp_path: Path) -> None:
    """The config says the LM head is quantized but the checkpoint has only its bf16 weight."""
    torch.manual_seed(0)
    hf = TINY_BUILDERS["llama"]().eval()
    qcfg, writer = FORMATS["gptq-4bit-asym"]
    hf.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {**qcfg, "lm_head": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors: dict[str, torch.Tensor] = {}
    for name, param in hf.state_dict().items():
        module, _, suffix = name.rpartition(".")
        if suffix == "weight" and module.rsplit(".", 1)[-1] in PROJ:
            tensors.update(writer(module, param.detach().float(), int(module.split(".")[2]))[0])
        else:
            tensors[name] = param.detach().contiguous()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(Exception, match=r"unexpected tensor 'lm_head.weight' for gptq weights"):
        Engine(WorkerConfig(model=str(tmp_path), device="cpu", kv_cache_memory="16MiB"))


@pytest.mark.parametrize(
    ("qcfg", "head"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 32}, False),
        ({"quant_method": "gptq", "bits": 4, "group_size": 32, "lm_head": True}, True),
        (_ct_config("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"}, None), False),
        ({**_ct_config("pack-quantized", {"num_bits": 4, "type": "int"}, None), "ignore": []}, True),
        (
            {
                **_ct_config("pack-quantized", {"num_bits": 4, "type": "int"}, None),
                "ignore": ["re:.*lm_head"],
            },
            False,
        ),
        (
            {
                **_ct_config("pack-quantized", {"num_bits": 4, "type": "int"}, None),
                "config_groups": {"g": {"targets": ["re:.*layers.*", "lm_head"]}},
                "ignore": [],
            },
            True,
        ),
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, False),  # transformers' default skip
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]},
            False,
        ),
        (
            {"quant_method": "fp8", "weight_block_size": [128, 128], "modules_to_not_convert": ["mlp.gate"]},
            True,
        ),
        ({"quant_method": "fp8", "ignored_layers": []}, True),
        ({"quant_method": "awq", "bits": 4, "modules_to_not_convert": None}, False),
    ],
)
def test_which_configs_quantize_the_lm_head(qcfg: dict[str, Any], head: bool) -> None:
    assert quantizes_lm_head(qcfg) is head


@pytest.mark.parametrize("targets", [["Linear", "Embedding"], ["Linear", "re:.*embed_tokens"]])
def test_quantized_embedding_is_refused_naming_it(tmp_path: Path, targets: list[str]) -> None:
    torch.manual_seed(0)
    hf = TINY_BUILDERS["llama"]().eval()
    hf.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    qcfg = _ct_config("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"}, None)
    qcfg["config_groups"]["group_0"]["targets"] = targets
    config["quantization_config"] = qcfg
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedQuantizationError, match=r"quantize the token embedding \(model.embed_tokens\)"
    ):
        Engine(WorkerConfig(model=str(tmp_path), device="cpu", kv_cache_memory="16MiB"))
