"""A launched engine step whose sampled tokens may still be on the device (async scheduling).

`ModelRunner.launch` enqueues a step's device work and returns a `StepHandle` at once; the host
reads the tokens with `result()` (the step's one synchronisation). In between, the engine plans
and launches the next decode step, whose input ids are gathered on the device from this step's
`token_ids` tensor, so step N+1's host work overlaps step N's device work.

On CUDA the tokens travel back through `TokenReadback`: an asynchronous device->host copy into one
of two pinned buffers, then an event; a step's graph outputs may be overwritten by the next
replay, the pinned copy is taken before it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.worker.beam_select import BeamSelection, BeamStepResult
from services.worker.request import TokenLogprob
from services.worker.scheduler import SampledToken


class StepHandle:
    """One launched step: `result()` gives, per scheduled entry, its sampled token then one per
    forked child (empty when the entry did not sample), waiting for the device the first time."""

    def __init__(
        self,
        num_scheduled: int,
        row_entries: list[int],  # [R] scheduled entry of each sampled row
        token_ids: torch.Tensor | None,  # [R] int64 on the step's device; None when nothing sampled
        read: Callable[[], tuple[list[int], list[TokenLogprob | None]]] | None,
        # beam search selected on the device (beam_select.py): row -> its request's candidates,
        # read after `read` (the same synchronisation)
        read_beams: Callable[[], dict[int, BeamStepResult]] | None = None,
    ) -> None:
        self.num_scheduled = num_scheduled
        self.row_entries = row_entries
        self.token_ids = token_ids
        self._read = read
        self._read_beams = read_beams
        # the step's beam selection on the device: a beam step launched ahead starts from it
        self.beam_selection: BeamSelection | None = None
        self._results: list[list[SampledToken]] | None = None

    def result(self) -> list[list[SampledToken]]:
        if self._results is None:
            results: list[list[SampledToken]] = [[] for _ in range(self.num_scheduled)]
            if self._read is not None:
                ids, logprobs = self._read()
                beams = self._read_beams() if self._read_beams is not None else {}
                for row, (entry, token, logprob) in enumerate(
                    zip(self.row_entries, ids, logprobs, strict=True)
                ):
                    results[entry].append(SampledToken(token, logprob, beams.get(row)))
            self._results, self._read, self._read_beams = results, None, None
        return self._results


class TokenReadback:
    """Device->host copies of sampled token ids, two pinned buffers used in turn.

    At most two steps are ever unread (the one being read and the one launched before reading
    it), and a buffer's previous step was read before the buffer is reused; a step dropped unread
    is older in stream order than the copy that reuses its buffer."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers = [torch.empty(256, dtype=torch.int64, pin_memory=True) for _ in range(2)]
        self._events = [torch.cuda.Event() for _ in range(2)]
        self._turn = 0

    def start(self, token_ids: torch.Tensor) -> Callable[[], list[int]]:
        """Enqueue the copy of `token_ids` ([R] int64 on the device); the returned function waits
        for it and gives the ids."""
        turn, self._turn = self._turn, self._turn ^ 1
        rows = token_ids.shape[0]
        if self._buffers[turn].shape[0] < rows:
            self._buffers[turn] = torch.empty(
                max(rows, 2 * self._buffers[turn].shape[0]), dtype=torch.int64, pin_memory=True
            )
        host = self._buffers[turn][:rows]
        host.copy_(token_ids, non_blocking=True)
        event = self._events[turn]
        event.record()

        def read() -> list[int]:
            event.synchronize()
            return host.tolist()

        return read
