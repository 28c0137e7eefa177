"""This rank's slice of a projection's weight (tensor parallelism), in the unpacked [N, K] weight's
coordinates: what the loader reads and a quantization format slices its packed tensors by."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    """This rank's slice of a projection, in its unpacked [N, K] weight's coordinates."""

    dim: int  # 0: output rows (column-parallel); 1: input columns (row-parallel)
    start: int
    size: int

    def describe(self) -> str:
        what = "output rows" if self.dim == 0 else "input columns"
        return f"{what} [{self.start}, {self.start + self.size})"
