"""Loading Hugging Face directories: sharded safetensors, dummy weights, and clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.common.config import ConfigError, build_parser, config_from_namespace
from services.worker.config import WorkerConfig, parse_size
from services.worker.engine import Engine
from services.worker.loader import WeightLoadError
from services.worker.model_config import ModelConfigError, load_model_config
from services.worker.request import SamplingParams


def copy_single_file_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_and_llama3_rope_config(tiny_model_dirs: dict[str, Path]) -> None:
    path = tiny_model_dirs["llama"]
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    cfg = load_model_config(str(path))
    assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"
    assert cfg.num_kv_heads == 2 and not cfg.tie_word_embeddings
    qwen2 = load_model_config(str(tiny_model_dirs["qwen2"]))
    assert qwen2.attention_bias and not qwen2.o_proj_bias and qwen2.tie_word_embeddings
    assert load_model_config(str(tiny_model_dirs["qwen3"])).qk_norm


def test_dummy_weights_for_a_real_config(stories_dir: Path) -> None:
    engine = Engine(
        WorkerConfig(model=str(stories_dir), load_format="dummy", kv_cache_memory="8MiB", device="cpu")
    )
    (result,) = engine.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert len(result.token_ids[0]) == 5


def _mutate(stories_dir: Path, tmp_path: Path, edit: object) -> Path:
    dst = copy_single_file_model(stories_dir, tmp_path / "model")
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)  # type: ignore[operator]
    (dst / "model.safetensors").chmod(0o644)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(stories_dir: Path, tmp_path: Path) -> None:
    path = _mutate(stories_dir, tmp_path, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(
        WeightLoadError, match=r"missing tensor\(s\) model\.layers\.2\.self_attn\.k_proj\.weight"
    ):
        Engine(WorkerConfig(model=str(path), kv_cache_memory="8MiB", device="cpu"))


def test_mismatched_and_unexpected_tensors_are_named(stories_dir: Path, tmp_path: Path) -> None:
    def widen(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)

    path = _mutate(stories_dir, tmp_path, widen)
    with pytest.raises(WeightLoadError, match=r"model\.layers\.0\.mlp\.up_proj\.weight' has shape \(3, 3\)"):
        Engine(WorkerConfig(model=str(path), kv_cache_memory="8MiB", device="cpu"))

    def extra(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.mystery.weight"] = torch.zeros(3)

    path2 = _mutate(stories_dir, tmp_path / "b", extra)
    with pytest.raises(WeightLoadError, match=r"unexpected tensor 'model\.layers\.0\.mystery\.weight'"):
        Engine(WorkerConfig(model=str(path2), kv_cache_memory="8MiB", device="cpu"))


def test_unsupported_architecture_is_named(stories_dir: Path, tmp_path: Path) -> None:
    dst = copy_single_file_model(stories_dir, tmp_path / "model")
    cfg_path = dst / "config.json"
    cfg_path.chmod(0o644)
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match="unsupported architecture 'GPTNeoXForCausalLM'"):
        Engine(WorkerConfig(model=str(dst), kv_cache_memory="8MiB", device="cpu"))
    with pytest.raises(ModelConfigError, match=r"no config\.json"):
        load_model_config(str(tmp_path))


def test_worker_options() -> None:
    assert (
        parse_size("2GiB") == 2 * 1024**3
        and parse_size("512MiB") == 512 * 1024**2
        and parse_size("1000") == 1000
    )
    parser = build_parser(WorkerConfig, "tandem worker")
    with pytest.raises(ConfigError, match="--block-size"):
        config_from_namespace(WorkerConfig, parser.parse_args(["--model", "m", "--block-size", "12"]), env={})
    with pytest.raises(ConfigError, match="--kv-cache-memory"):
        config_from_namespace(
            WorkerConfig, parser.parse_args(["--model", "m", "--kv-cache-memory", "lots"]), env={}
        )
    with pytest.raises(ConfigError, match="--model is required"):
        config_from_namespace(WorkerConfig, parser.parse_args([]), env={})
    cfg = config_from_namespace(
        WorkerConfig, parser.parse_args(["--model", "m", "--no-enable-prefix-caching"]), env={}
    )
    assert not cfg.enable_prefix_caching and cfg.block_size == 16


def test_tandem_worker_reports_a_bad_model_dir_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.worker.main import main

    assert main(["--model", str(tmp_path)], "tandem worker") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tandem worker: error:") and "no config.json" in err and "\n" not in err


def test_building_a_model_runs_no_initialiser(stories_dir: Path) -> None:
    """The modules are built on meta with their parameter initialisers skipped, and made real with
    `materialize`, not `to_empty`: an initialiser or `empty_like` on a meta tensor goes through
    torch's reference decompositions, whose first use imports torch._dynamo or sympy (time in every
    worker's start-up). In a fresh process, as a worker starts."""
    code = (
        "import sys\n"
        "from services.worker.config import WorkerConfig\n"
        "from services.worker.engine import Engine\n"
        f"Engine(WorkerConfig(model={str(stories_dir)!r}, device='cpu', kv_cache_memory='1MiB'))\n"
        "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)\n"
    )
    repo = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": repo},
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["False", "False"], "building the model imported torch._dynamo / sympy"
