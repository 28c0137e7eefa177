"""The LoRA side of a projection: y += (x @ A_slot^T) @ B_slot^T for each row's adapter slot.

`LoRAMapping` holds the step's rows grouped by slot in persistent device tensors (written before
every forward by `LoRAPool.prepare`), so that a captured CUDA graph reads the step's mapping at
replay; `LoRAProjection` is one fused projection's slice of the slot pool. The kernels launch only
in steps with rows of an adapter (`LoRAMapping.active`): a step of base rows only runs exactly what
a worker without LoRA runs. The decode graphs come in both variants (model_runner.py), and the
"lora" one serves any mix of adapters.

The shrink reads only the projection's input, so a projection issues it first and its base GEMM
after: while a CUDA graph is captured, the shrink goes on a side stream, which makes it a parallel
branch of the graph that runs beside the GEMM (a decode GEMM streams its weight, the shrink a few
hundred KB), and the expand joins both (`TANDEM_LORA_OVERLAP=0`: one after the other). Eager
forwards keep one stream: the fork's events would cost host time every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kernels import KernelOps
from services.common import switches


class LoRAMapping:
    """Rows of the current step grouped by adapter slot (layout: kernels/reference.py)."""

    def __init__(self, num_slots: int, max_num_tokens: int, device: torch.device) -> None:
        self.num_slots = num_slots
        self.sorted_token_ids = torch.zeros(max_num_tokens, dtype=torch.int32, device=device)  # [max T]
        self.seg_starts = torch.zeros(num_slots, dtype=torch.int32, device=device)  # [S]
        self.seg_lens = torch.zeros(num_slots, dtype=torch.int32, device=device)  # [S]
        # the step's mapping on the host: a pipeline stage narrows it to each micro-batch's rows
        self._step: tuple[list[int], list[int], list[int]] = ([], [0] * num_slots, [0] * num_slots)
        # Whether the forward being issued has rows of an adapter: the projections launch the LoRA
        # kernels only then (layers/linear.py), and a decode step replays the graph variant
        # captured with them or without them (model_runner.py).
        self.active = False
        # whether the device mapping may hold rows: a step of base rows only skips its copies when
        # the device's mapping is empty already (and empties it otherwise: anything that launches
        # the kernels in such a step, `launching`, must find no rows)
        self._device_rows = False

    def set(self, sorted_token_ids: list[int], seg_starts: list[int], seg_lens: list[int]) -> None:
        self._step = (sorted_token_ids, seg_starts, seg_lens)
        self._write(sorted_token_ids, seg_starts, seg_lens)

    def select_rows(self, start: int, end: int) -> None:
        """Map only the step's rows [start, end), renumbered from 0: the micro-batch a pipeline
        stage runs next (services/worker/pipeline.py). `restore` maps the whole step again."""
        ids, starts, lens = self._step
        sub_ids: list[int] = []
        sub_starts: list[int] = []
        sub_lens: list[int] = []
        for s0, n in zip(starts, lens, strict=True):
            rows = [r - start for r in ids[s0 : s0 + n] if start <= r < end]
            sub_starts.append(len(sub_ids))
            sub_lens.append(len(rows))
            sub_ids += rows
        self._write(sub_ids, sub_starts, sub_lens)

    def restore(self) -> None:
        self._write(*self._step)

    @contextlib.contextmanager
    def launching(self, active: bool) -> Iterator[None]:
        """Issue the LoRA kernels (or not) whatever the step's rows, then go back to the step's own
        choice: CUDA graph capture of each variant (its inputs are padding), the memory profile
        (which must count the kernels' buffers)."""
        saved, self.active = self.active, active
        try:
            yield
        finally:
            self.active = saved

    def _write(self, sorted_token_ids: list[int], seg_starts: list[int], seg_lens: list[int]) -> None:
        if len(sorted_token_ids) > self.sorted_token_ids.shape[0]:
            raise ValueError(
                f"{len(sorted_token_ids)} rows exceed the LoRA mapping's {self.sorted_token_ids.shape[0]}"
            )
        self.active = bool(sorted_token_ids)
        if not sorted_token_ids and not self._device_rows:  # base rows only, and so is the device's
            return
        self._device_rows = bool(sorted_token_ids)
        # non_blocking from pageable memory: staged at once, ordered after the work already queued
        # (an earlier step still reading these buffers finishes first)
        if sorted_token_ids:  # (only the rows of an adapter: a step of the base model copies none)
            self.sorted_token_ids[: len(sorted_token_ids)].copy_(
                torch.tensor(sorted_token_ids, dtype=torch.int32), non_blocking=True
            )
        packed = torch.tensor([seg_starts, seg_lens], dtype=torch.int32)
        self.seg_starts.copy_(packed[0], non_blocking=True)
        self.seg_lens.copy_(packed[1], non_blocking=True)


class LoRAProjection:
    """One fused projection's adapters: lora_a [S, parts * R, in] (part j's A in rows j*R..j*R+r),
    lora_b [S, out, R] (each output column's B of its own part, in ranks 0..r): one shrink and one
    expand cover q, k and v, or gate and up, at once, and B stores no zeros for the other parts."""

    def __init__(
        self,
        ops: KernelOps,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        mapping: LoRAMapping,
        part_starts: tuple[int, ...] = (),  # first output column of each fused part
        part_rank: int = 0,  # R: part j's A rows (t's rank columns) are [j*R, (j+1)*R)
        side_stream: torch.cuda.Stream | None = None,  # the shrink's branch in captured graphs
    ) -> None:
        self.ops = ops
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.mapping = mapping
        self.part_starts = part_starts
        self.part_rank = part_rank
        self.side_stream = side_stream

    def shrink(self, x: torch.Tensor) -> torch.Tensor:
        """The rows' x [T, in] @ A^T partial sums; issue it before the base projection (module
        docstring: in a captured graph it then runs beside the GEMM) and hand it to `expand`."""
        m = self.mapping
        side = self.side_stream
        if side is None or not torch.cuda.is_current_stream_capturing():
            return self.ops.lora_shrink(x, self.lora_a, m.sorted_token_ids, m.seg_starts, m.seg_lens)
        side.wait_stream(torch.cuda.current_stream(x.device))  # (x is ready: the fork)
        with torch.cuda.stream(side):
            return self.ops.lora_shrink(x, self.lora_a, m.sorted_token_ids, m.seg_starts, m.seg_lens)

    def expand(self, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # y [T, out] += t @ B^T
        m = self.mapping
        if self.side_stream is not None and torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream(y.device).wait_stream(self.side_stream)  # (the join)
        self.ops.lora_expand(
            y, t, self.lora_b, m.sorted_token_ids, m.seg_starts, m.seg_lens, self.part_starts, self.part_rank
        )
        return y


def side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The stream LoRA shrinks are captured on beside the base GEMMs (None: one stream)."""
    return torch.cuda.Stream(device) if device.type == "cuda" and switches.LORA_OVERLAP.value else None
