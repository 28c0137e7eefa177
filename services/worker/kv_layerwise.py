"""Layer-wise push: a prefill's KV becomes readable layer by layer while the prefill still runs.

    gateway ── PrefillStream ──▶ prefill worker P: admits the prompt, opens its KV handle
            ◀── event 1: the handle ──┘        (kv_handles.py) with a LayerProgress, and sends
    gateway ── Generate(kv_source=handle) ──▶ D  the handle at once
    D ── FetchKV(handle) ──▶ P: streams every (layers, blocks) span as soon as P's forward has
                               written it (kv_transfer.ready_spans), while P computes the later
                               layers; its last message carries the sampled first token
    D decodes when the last layer and the first token have landed.

The model runner's attention layers call `LayerSignal.written(layer)` right after writing a
layer's KV; while a step that computes a layer-wise prompt runs, the signal advances that prompt's
`LayerProgress` (prompt tokens whose KV each layer holds). On CUDA each advance records an event on
the compute stream, and the reader waits for it on a side stream before copying (the host runs
ahead of the device); on the CPU the write is done when `written` runs. The handle pins the
prompt's blocks as they are allocated, so a reader never sees a block reused (kv_handles.py).

This is the pull-based analogue of vLLM's KV connectors (`save_kv_layer` after each attention
layer, `wait_for_layer_load` before it on the consumer) and of Mooncake's layer-wise connector:
the prefill side does not push bytes into the decode worker's memory, it makes each layer
readable, and the decode worker's open FetchKV stream takes it as soon as it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# (layer_start, layer_end, block_start, block_end): layers [l0, l1) x the prompt's blocks [b0, b1)
Span = tuple[int, int, int, int]


class LayerwiseFailed(Exception):
    """The prefill behind a layer-wise handle ended without its KV (aborted, preempted)."""


@dataclass(frozen=True)
class Readiness:
    """A consistent snapshot of a handle's progress (`LayerProgress.snapshot`)."""

    ready_blocks: tuple[int, ...]  # per layer: leading blocks whose KV that layer holds in full
    block_ids: tuple[int, ...]  # the handle's blocks known so far
    event: Any  # CUDA: an event after which every write counted here is done; None on the CPU
    complete: bool  # the prefill finished: everything is ready and `first` is set
    # the sampled first token (complete only): the engine's ChoiceOutput, carried as is (this module
    # sits below outputs.py, whose RequestOutput holds a HeldKV)
    first: object | None
    error: str  # set when the prefill ended without its KV


class LayerProgress:
    """How far a layer-wise prefill has written its prompt's KV. Written by the engine thread
    (`adopt`, `layers_written`, `complete`, `fail`), read by the FetchKV stream (`snapshot`)."""

    def __init__(self, num_layers: int, num_tokens: int, block_size: int) -> None:
        self.num_layers = num_layers
        self.num_tokens = num_tokens
        self.block_size = block_size
        self._ready = [0] * num_layers  # prompt tokens whose KV each layer holds
        self._block_ids: list[int] = []
        self._event: Any = None
        self._complete = False
        self._first: object | None = None
        self._error = ""
        self._lock = threading.Lock()
        # (notify, per_layer): a per-layer listener hears every advance, the others only the end
        self._listeners: list[tuple[Callable[[], object], bool]] = []

    # ---- engine thread ---------------------------------------------------------------------------
    def adopt(self, block_ids: list[int]) -> list[int]:
        """Blocks of the prompt not known yet (the caller references them for the handle)."""
        with self._lock:
            new = list(block_ids[len(self._block_ids) :])
            self._block_ids.extend(new)
        return new

    @property
    def block_ids(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._block_ids)

    def computed_before(self, num_tokens: int) -> None:
        """Tokens [0, num_tokens) hold their KV in every layer (a prefix-cache hit, an earlier
        chunk)."""
        self._advance(range(self.num_layers), num_tokens, None)

    def layers_written(
        self, layers: tuple[int, ...], num_tokens: int, event: Any, notify: bool = True
    ) -> None:
        """Several layers of one step at once (`event` after the last of them); `notify` False:
        nobody listens per layer, a reader that comes later finds them in its snapshot."""
        self._advance(layers, num_tokens, event, notify)

    def _advance(
        self, layers: range | tuple[int, ...], num_tokens: int, event: Any, notify: bool = True
    ) -> None:
        with self._lock:
            for layer in layers:
                self._ready[layer] = max(self._ready[layer], min(num_tokens, self.num_tokens))
            if event is not None:
                self._event = event
        if notify:
            self._notify(per_layer=True)

    def complete(self, first: object) -> None:
        """The prefill finished (its step's tokens were read, so its KV is on the device)."""
        with self._lock:
            self._ready = [self.num_tokens] * self.num_layers
            self._event = None
            self._complete = True
            self._first = first
        self._notify()

    def fail(self, reason: str) -> None:
        with self._lock:
            if self._complete or self._error:
                return
            self._error = reason
        self._notify()

    @property
    def wants_layers(self) -> bool:
        """Whether a reader takes layers as they come (else only the end matters: CUDA IPC)."""
        return any(per_layer for _, per_layer in self._listeners)

    @property
    def done(self) -> bool:
        with self._lock:
            return self._complete or bool(self._error)

    # ---- readers -------------------------------------------------------------------------------
    def listen(self, notify: Callable[[], object], per_layer: bool = True) -> Callable[[], None]:
        """Call `notify` (from the engine thread) after every change, or, not `per_layer`, only
        when the prefill completed or failed; returns the unsubscribe."""
        entry = (notify, per_layer)
        with self._lock:
            self._listeners.append(entry)

        def unsubscribe() -> None:
            with self._lock:
                if entry in self._listeners:
                    self._listeners.remove(entry)

        return unsubscribe

    def snapshot(self) -> Readiness:
        bs = self.block_size
        num_blocks = -(-self.num_tokens // bs)
        with self._lock:
            ready = tuple(num_blocks if r >= self.num_tokens else r // bs for r in self._ready)
            return Readiness(
                ready, tuple(self._block_ids), self._event, self._complete, self._first, self._error
            )

    def _notify(self, per_layer: bool = False) -> None:
        with self._lock:
            listeners = [notify for notify, wants in self._listeners if wants or not per_layer]
        for notify in listeners:
            notify()


class LayerSignal:
    """The attention layers' hook: `written(layer)` after each layer's KV write. Armed by the
    engine around the launch of a step that computes layer-wise prompts, with each prompt's
    progress and the token count its KV reaches after this step.

    A signal costs the launching thread a CUDA event and wakes the readers' event loop, which
    then takes the GIL from the thread launching the forward's kernels. So while no armed prompt
    has a reader that takes layers as they come (none yet, or a CUDA IPC fetch, which waits for
    the end), nobody is woken, and on CUDA the layers are not even counted (counting one needs an
    event after its writes): the next signal of the step covers them (the device runs a step's
    layers in order), `LayerProgress.complete` covers everything. On the CPU the writes are done
    when `written` is called, so they are counted silently and a reader that comes later finds
    them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._armed: list[tuple[LayerProgress, int]] = []
        self._unsignalled: list[int] = []  # this step's layers written while nobody wanted them
        self.num_signals = 0  # (tests)

    def arm(self, entries: list[tuple[LayerProgress, int]]) -> None:
        self._armed = entries
        self._unsignalled = []

    def disarm(self) -> None:
        self._armed = []
        self._unsignalled = []

    def written(self, layer: int) -> None:
        if not self._armed:
            return
        if not any(progress.wants_layers for progress, _ in self._armed):
            if self.device.type == "cuda":
                self._unsignalled.append(layer)
            else:
                for progress, num_tokens in self._armed:
                    progress.layers_written((layer,), num_tokens, None, notify=False)
            return
        layers = (*self._unsignalled, layer)
        self._unsignalled = []
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.num_signals += 1
        for progress, num_tokens in self._armed:
            progress.layers_written(layers, num_tokens, event)


def wait_ready(event: Any) -> None:
    """Make the current stream (a reader's side stream) wait for the writes an event covers."""
    if event is not None:
        torch.cuda.current_stream().wait_event(event)
