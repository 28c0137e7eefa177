"""Environment switches: the `TANDEM_*` variables that are not command-line options.

Options (`--model`, `--kv-cache-dtype`, ...) each read `TANDEM_<OPTION>` through the config system
(config.py); those are not switches. A switch is for what has no option because it is read where
no config reaches (a kernel module at import, the healthcheck command of an image) or is a
kill switch for an operator. Every one is declared here, once, with its type, default and why it
exists; `tandem worker --list-switches` prints this table, and docs/worker.md repeats it.

A switch's `value` is read from the environment once per process (on first use). Kernels import
this module too: it imports nothing of tandem's.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")
# TANDEM_QUANT_FUSE: the tuner's measured choice, the one fused launch always, the unfused sequence
QUANT_FUSE_MODES = ("auto", "always", "never")


class SwitchError(ValueError):
    """A switch set to a value its type does not take."""


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected one of {', '.join(_TRUE + _FALSE)}")


def _parse_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("expected a positive number of seconds")
    return value


def _parse_quant_fuse(text: str) -> str:
    value = text.strip().lower()
    if value not in QUANT_FUSE_MODES:
        raise ValueError(f"expected one of {', '.join(QUANT_FUSE_MODES)}")
    return value


def _parse_nonnegative_seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("expected a number of seconds >= 0")
    return value


@dataclass(frozen=True)
class Switch(Generic[T]):
    name: str  # the environment variable
    type_name: str  # "bool", "path", ... as the table shows it
    default: T
    reason: str  # one line: why this is a switch (and why it stays)
    parse: Callable[[str], T]

    def read(self, env: Mapping[str, str] | None = None) -> T:
        """The value in `env` (default os.environ); unset or empty: the default."""
        raw = (os.environ if env is None else env).get(self.name, "")
        if raw == "":
            return self.default
        try:
            return self.parse(raw)
        except ValueError as exc:
            raise SwitchError(f"{self.name}={raw!r}: {exc}") from None

    @functools.cached_property
    def value(self) -> T:
        """The process's value, read from os.environ once."""
        return self.read()


PDL: Switch[bool] = Switch(
    "TANDEM_PDL",
    "bool",
    True,
    "kill switch for programmatic dependent launch (kernels/triton/pdl.py), a Hopper feature that "
    "depends on driver and Triton; 0 runs every kernel as a plain launch (and is the A/B baseline "
    "of benchmarks/pdl_decode_run.sh)",
    _parse_bool,
)
FOLD_NORMS: Switch[bool] = Switch(
    "TANDEM_FOLD_NORMS",
    "bool",
    True,
    "folding the layer norms into qkv/gate_up rounds W*g once, so logits differ slightly from the "
    "checkpoint's own forward; 0 keeps the norms separate (exact comparisons, numerics bisection)",
    _parse_bool,
)
LORA_OVERLAP: Switch[bool] = Switch(
    "TANDEM_LORA_OVERLAP",
    "bool",
    True,
    "kill switch and A/B baseline of the LoRA shrink as a parallel branch of the captured CUDA "
    "graphs, beside the base projection's GEMM (services/worker/layers/lora.py); 0 runs it after",
    _parse_bool,
)
TRACE_FILE: Switch[str] = Switch(
    "TANDEM_TRACE_FILE",
    "path",
    "",
    "debugging and tests: also append every finished span as one JSON line to this file (the "
    "OTEL_* variables, read by the OpenTelemetry SDK, choose the real exporters)",
    str,
)
HEALTHCHECK_TARGET: Switch[str] = Switch(
    "TANDEM_HEALTHCHECK_TARGET",
    "address",
    "",
    "what `python -m services.common.healthcheck` probes when run by an image's HEALTHCHECK, which "
    "passes no arguments; empty: found from the service's own command line",
    str,
)
HEALTHCHECK_TIMEOUT: Switch[float] = Switch(
    "TANDEM_HEALTHCHECK_TIMEOUT",
    "seconds",
    3.0,
    "how long that healthcheck waits for an answer (an image's HEALTHCHECK passes no arguments)",
    _parse_seconds,
)
HEAP_PROFILE: Switch[str] = Switch(
    "TANDEM_HEAP_PROFILE",
    "path",
    "",
    "debugging slow leaks: trace allocations (tracemalloc) and write a heap snapshot to this "
    "directory on each SIGUSR2 (services/common/heap_profile.py); it slows a service severalfold",
    str,
)
GIL_SWITCH_INTERVAL: Switch[float] = Switch(
    "TANDEM_GIL_SWITCH_INTERVAL",
    "seconds",
    0.0,
    "an A/B of the worker's GIL hand-off (sys.setswitchinterval) between its engine thread and its "
    "gRPC event loop (benchmarks/serving_bench.py); 0 keeps Python's default",
    _parse_nonnegative_seconds,
)
GENERATE_MUX: Switch[bool] = Switch(
    "TANDEM_GENERATE_MUX",
    "bool",
    True,
    "an operator's kill switch and the A/B baseline of the gateway's one GenerateMany stream per "
    "worker connection (gateway/generate_mux.py); 0 sends each request as its own Generate rpc",
    _parse_bool,
)
KEEP_LARGE_BUFFERS: Switch[bool] = Switch(
    "TANDEM_KEEP_LARGE_BUFFERS",
    "bool",
    False,
    "an A/B of the worker's malloc settings for buffers of megabytes (services/common/large_buffers.py: "
    "gRPC KV chunks reused, not mapped and unmapped per chunk, one arena); 0 keeps glibc's defaults",
    _parse_bool,
)
FP8_KV_FP16_DOTS: Switch[bool] = Switch(
    "TANDEM_FP8_KV_FP16_DOTS",
    "bool",
    True,
    "the A/B baseline of decode attention's fp16 dots over an fp8 KV cache with bf16 queries "
    "(kernels/triton/decode_attention.py `fp16_dots`); 0 widens the cache to bf16 as before",
    _parse_bool,
)
ENGINE_HANDOFF: Switch[float] = Switch(
    "TANDEM_ENGINE_HANDOFF",
    "seconds",
    0.0,
    "how long the worker's engine thread waits, after each step, for the event loop to take the "
    "step's outputs before it goes on (services/worker/async_engine.py); 0 does not wait",
    _parse_nonnegative_seconds,
)
BEAM_ONE_LAUNCH: Switch[bool] = Switch(
    "TANDEM_BEAM_ONE_LAUNCH",
    "bool",
    True,
    "the A/B baseline of beam search's selection in one launch on CUDA "
    "(kernels/triton/beam_topk_candidates.py); 0 runs row_topk and beam_candidates as two",
    _parse_bool,
)
GENERATE_SINK: Switch[bool] = Switch(
    "TANDEM_GENERATE_SINK",
    "bool",
    True,
    "the A/B baseline of a GenerateMany session's mid-stream outputs sent from the callback that "
    "delivers the engine step (services/worker/rpc.py `take`); 0 wakes the session's task for each",
    _parse_bool,
)
ADMISSION_WAIT: Switch[float] = Switch(
    "TANDEM_ADMISSION_WAIT",
    "seconds",
    0.0,
    "how long the worker's engine thread waits, before its next step, for the GenerateMany sessions "
    "just read off a stream to reach the engine (services/worker/async_engine.py); 0 (the default) "
    "does not wait",
    _parse_nonnegative_seconds,
)
QUANT_FUSE: Switch[str] = Switch(
    "TANDEM_QUANT_FUSE",
    "mode",
    "auto",
    "the A/B of the quantized GEMM's fused decode variants (kernels/triton/quant_gemm.py "
    "`keep_fused`): auto keeps what the tuner measured faster, always the one fused launch, never "
    "the unfused sequence (norm kernel, GEMM, SiLU kernel or residual add)",
    _parse_quant_fuse,
)
GC_FREEZE: Switch[bool] = Switch(
    "TANDEM_GC_FREEZE",
    "bool",
    True,
    "the A/B baseline of freezing each service's start-up heap once it is ready "
    "(services/common/gc_heap.py: the collector no longer walks it); 0 leaves Python's collector as it is",
    _parse_bool,
)
PACKED_TOKENS: Switch[bool] = Switch(
    "TANDEM_PACKED_TOKENS",
    "bool",
    True,
    "the A/B baseline of GenerateMany's packed tokens (gateway/generate_mux.py): 0 makes the gateway "
    "leave accepts_packed_tokens unset, so the worker sends every chunk as a GenerateSessionResponse",
    _parse_bool,
)
SWITCHES: tuple[Switch[bool] | Switch[str] | Switch[float], ...] = (
    PDL,
    FOLD_NORMS,
    LORA_OVERLAP,
    TRACE_FILE,
    HEALTHCHECK_TARGET,
    HEALTHCHECK_TIMEOUT,
    HEAP_PROFILE,
    GIL_SWITCH_INTERVAL,
    ENGINE_HANDOFF,
    GENERATE_MUX,
    KEEP_LARGE_BUFFERS,
    FP8_KV_FP16_DOTS,
    BEAM_ONE_LAUNCH,
    GENERATE_SINK,
    ADMISSION_WAIT,
    QUANT_FUSE,
    GC_FREEZE,
    PACKED_TOKENS,
)


def read_all() -> None:
    """Read every switch of this process now; raises SwitchError naming the first bad one."""
    for switch in SWITCHES:
        _ = switch.value


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value) if value != "" else "(unset)"


def table(env: Mapping[str, str] | None = None) -> str:
    """The switches as a plain-text table: name, type, default, the value in `env`, and why."""
    env = os.environ if env is None else env
    rows = [("switch", "type", "default", "now", "why")]
    for switch in SWITCHES:
        try:
            now = _shown(switch.read(env))
        except SwitchError as exc:
            now = f"invalid ({exc})"
        rows.append((switch.name, switch.type_name, _shown(switch.default), now, switch.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)) + "  " + row[4]
        for row in rows
    )
