"""Quantized weights in tensor / pipeline-parallel groups (gloo on the CPU): with the same
--quantization, a T = 2 (or P = 2) group's greedy tokens equal T = 1's and its logprobs are within
1e-4. Each rank quantizes only its shard: column-parallel rows with their own scales, row-parallel
columns with the per-channel scale of the WHOLE row (one all-reduce at load), so the sharded
weights are exactly T = 1's; a group size that would straddle two ranks is refused at start."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from services.worker.config import WorkerConfig
from services.worker.model_config import ModelConfigError
from services.worker.request import SamplingParams
from services.worker.tp_launch import check_group
from tests.parallel.conftest import run_group
from tests.worker.worker_testlib import RefModel, prompts_of_lengths

LENGTHS = [1, 7, 17, 29, 5, 12]  # in flight together; the long ones are chunked (budget 16)
MAX_TOKENS = 8


def check_quantized_group(
    ref: RefModel, tmp_path: Path, quant: list[str], tp: int = 2, pp: int = 1, max_tokens: int = MAX_TOKENS
) -> None:
    """The group's tokens and logprobs against T = 1 under the same quantization flags (`quant`:
    worker options, e.g. ["--quantization", "int8"], or [] for a pre-quantized checkpoint)."""
    prompts = prompts_of_lengths(LENGTHS, ref.vocab_size, seed=5)
    options = ["--model", str(ref.path), "--device", "cpu", "--kv-cache-memory", "4MiB"]
    options += ["--max-num-batched-tokens", "16", "--cpu-threads", "1", *quant]
    got = run_group(
        tmp_path,
        {"prompts": prompts, "max_tokens": max_tokens, "logprobs": 3},
        *options,
        "--tensor-parallel-size",
        str(tp),
        "--pipeline-parallel-size",
        str(pp),
    )
    flags = dict(zip(quant[0::2], quant[1::2], strict=True))
    single = ref.engine(
        kv_cache_memory="4MiB",
        max_num_batched_tokens=16,
        quantization=flags.get("--quantization", "none"),
        quantization_group_size=int(flags.get("--quantization-group-size", 0)),
    )
    base = single.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=3))
    for i, (prompt, result) in enumerate(zip(prompts, base, strict=True)):
        assert got["tokens"][i]["0"] == result.token_ids[0], f"T={tp} P={pp} {quant}: prompt of {len(prompt)}"
        ours = got["logprobs"][i]
        theirs = [lp.logprob for lp in result.logprobs[0]]
        assert len(ours) == len(theirs)
        assert max((abs(a - b) for a, b in zip(ours, theirs, strict=True)), default=0.0) < 1e-4


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("llama_gqa", ["--quantization", "int8"]),  # per channel: o_proj / down scales over the whole row
        ("llama_gqa", ["--quantization", "int8", "--quantization-group-size", "32"]),
        ("qwen2", ["--quantization", "fp8"]),  # weight-only on the CPU; qkv bias, tied embeddings
        ("llama_gqa", ["--quantization", "int4", "--quantization-group-size", "32"]),
    ],
)
def test_quantized_t2_equals_t1(
    tp_refs: dict[str, RefModel], name: str, quant: list[str], tmp_path: Path
) -> None:
    check_quantized_group(tp_refs[name], tmp_path, quant)


def test_quantized_pipeline_p2_equals_t1(tp_refs: dict[str, RefModel], tmp_path: Path) -> None:
    check_quantized_group(tp_refs["llama_gqa"], tmp_path, ["--quantization", "int8"], tp=1, pp=2)


@pytest.mark.slow
def test_quantized_t2_times_p2_equals_t1(tp_refs: dict[str, RefModel], tmp_path: Path) -> None:
    check_quantized_group(tp_refs["qwen2"], tmp_path, ["--quantization", "fp8"], tp=2, pp=2)


def test_group_straddling_two_ranks_is_refused_at_start(tp_refs: dict[str, RefModel]) -> None:
    """o_proj's K = 64 splits into 32 columns a rank: a group of 64 would straddle two ranks."""
    path = str(tp_refs["llama_gqa"].path)
    for quant, group in (("int8", 64), ("int4", 0)):  # int4's default group is 128
        config = WorkerConfig(
            model=path,
            device="cpu",
            quantization=quant,  # type: ignore[arg-type]
            quantization_group_size=group,
            tensor_parallel_size=2,
        )
        with pytest.raises(
            ModelConfigError, match=r"group size (64|128) does not divide the 32 input columns of o_proj"
        ):
            check_group(config)
    # T = 1 has no such limit from the split (and 32 divides every rank's columns)
    check_group(
        WorkerConfig(
            model=path, device="cpu", quantization="int8", quantization_group_size=32, tensor_parallel_size=2
        )
    )


# ---- pre-quantized checkpoints ------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(
    tp_refs: dict[str, RefModel], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], RefModel]:
    """fmt -> the tiny GQA Llama written in that format (tests/worker/test_checkpoint_formats.py's
    writers: each format's documented layout), made once per format."""
    from tests.worker.test_checkpoint_formats import write_checkpoint

    ref, made = tp_refs["llama_gqa"], {}

    def get(fmt: str) -> RefModel:
        if fmt not in made:
            dest = tmp_path_factory.mktemp(f"tp-ckpt-{fmt}")
            made[fmt] = replace(ref, path=dest, hf=write_checkpoint(ref.path, ref.hf, dest, fmt))
        return made[fmt]

    return get


@pytest.mark.parametrize(
    "fmt",
    [
        "gptq-4bit-asym",  # qweight packed along K (row-parallel: whole words), qzeros along N
        "awq",  # packed along N, 8 columns a word (k/v: 16 rows a rank)
        "ct-w4a16",  # weight_packed along K, weight_shape rewritten per slice
        "ct-int8",  # per-channel scales follow the rows, replicated over the columns
        pytest.param("ct-fp8", marks=pytest.mark.slow),
    ],
)
def test_checkpoint_t2_equals_t1(checkpoints: Callable[[str], RefModel], fmt: str, tmp_path: Path) -> None:
    check_quantized_group(checkpoints(fmt), tmp_path, [])


@pytest.mark.parametrize(
    ("fmt", "error"),
    [
        ("gptq-8bit", r"gptq group size 64 does not divide the 32 input columns of o_proj"),
        ("gptq-4bit-act-order", r"act-order \(desc_act\) checkpoint cannot be split"),
        ("block-fp8", r"32-row FP8 blocks do not divide the 16 rows of k_proj / v_proj"),
    ],
)
def test_checkpoint_that_cannot_split_is_refused_at_start(
    checkpoints: Callable[[str], RefModel], fmt: str, error: str
) -> None:
    config = WorkerConfig(model=str(checkpoints(fmt).path), device="cpu", tensor_parallel_size=2)
    with pytest.raises(ModelConfigError, match=error):
        check_group(config)


# ---- a checkpoint whose LM head is quantized too ---------------------------------------------------
@pytest.mark.parametrize("fmt", ["ct-w4a16", "ct-int8"])
def test_quantized_lm_head_t2_equals_t1(
    tp_refs: dict[str, RefModel], fmt: str, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The LM head quantized by the checkpoint (compressed-tensors, no `ignore`), vocabulary 321:
    each rank reads its 161 / 160 rows of the packed head (the last rank's padding row zero) and
    the logits are all-gathered as for a full-precision head: T = 2 equals T = 1."""
    from tests.worker.test_quantized_lm_head import write_quantized_head_checkpoint

    ref = tp_refs["llama_gqa"]
    dest = tmp_path_factory.mktemp(f"tp-head-{fmt}")
    hf = write_quantized_head_checkpoint(ref.hf, dest, fmt)
    check_quantized_group(replace(ref, path=dest, hf=hf), tmp_path, [])


def test_quantized_lm_head_that_cannot_split_is_refused_at_start(
    tp_refs: dict[str, RefModel], tmp_path: Path
) -> None:
    """A GPTQ LM head packs its zero points 8 vocabulary rows a word: 321 rows over 2 ranks (161 a
    rank) would cut a word."""
    import json

    src = tp_refs["llama_gqa"].path
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "lm_head": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match=r"LM head comes in units of 8 vocabulary rows .* 161 rows"):
        check_group(WorkerConfig(model=str(tmp_path), device="cpu", tensor_parallel_size=2))
