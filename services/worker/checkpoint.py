"""A checkpoint's tensors as the loader reads them: the safetensors files of a model directory,
each tensor read lazily (whole or one rank's slice), and the error a bad checkpoint raises.

Its own module so that model families (which remap checkpoint tensors) and the loader (which
builds the families) both import it without importing each other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from services.worker.model_config import ModelConfigError


class WeightLoadError(ModelConfigError):
    """A checkpoint tensor is missing, unexpected or of the wrong shape."""


def safetensors_files(model_dir: str) -> list[Path]:
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted({root / name for name in weight_map.values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(
            f"{model_dir}: no *.safetensors weights (use --load-format dummy for random ones)"
        )
    for f in files:
        if not f.is_file():
            raise WeightLoadError(f"{f}: listed in model.safetensors.index.json but missing")
    return files


class CheckpointTensor:
    """One checkpoint tensor, read whole or as a slice along one dimension (safetensors reads
    only the slice's bytes), or an in-memory tensor behind the same interface."""

    def __init__(self, source: Any, shape: tuple[int, ...], whole: Any) -> None:
        self._source = source  # a safetensors slice, or a torch.Tensor
        self.shape = shape
        self._whole = whole  # () -> torch.Tensor

    @classmethod
    def of(cls, tensor: torch.Tensor) -> CheckpointTensor:
        return cls(tensor, tuple(tensor.shape), lambda: tensor)

    def read(self, dim: int, start: int, size: int) -> torch.Tensor:
        if not self.shape or (start == 0 and size == self.shape[dim]):
            return self._whole()  # type: ignore[no-any-return]
        if isinstance(self._source, torch.Tensor):
            return self._source.narrow(dim, start, size)
        index = (*(slice(None) for _ in range(dim)), slice(start, start + size))
        return self._source[index]  # type: ignore[no-any-return]


def iter_checkpoint(model_dir: str) -> Iterator[tuple[str, str, CheckpointTensor]]:
    """(file name, tensor name, tensor on CPU, read lazily) for every tensor, one at a time."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                sl = f.get_slice(name)
                yield (
                    path.name,
                    name,
                    CheckpointTensor(sl, tuple(sl.get_shape()), lambda f=f, n=name: f.get_tensor(n)),
                )
