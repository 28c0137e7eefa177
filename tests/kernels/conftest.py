"""Kernel tests run the Triton kernels on the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined, i.e. before
`kernels.triton` is imported; conftest runs before the test modules of this folder.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
