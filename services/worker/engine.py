"""The engine: requests in, one step at a time, outputs out. Synchronous; one thread owns it.

    engine = Engine(WorkerConfig(model="../shared/models/stories260K"))
    engine.add_request(EngineRequest("r1", (1, 403, 407), SamplingParams(temperature=0)))
    while engine.has_unfinished():
        for out in engine.step(): ...

`generate(prompts, params)` runs a whole batch to completion (tests, benchmarks).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kernels import get_ops
from services.worker import fan_out, parallel
from services.worker.async_step import StepHandle
from services.worker.block_manager import BlockManager
from services.worker.config import WorkerConfig
from services.worker.errors import task_mismatch
from services.worker.guided import GrammarCompiler, GuidedUnavailableError
from services.worker.kv_cache import KVCache, available_host_bytes, block_bytes
from services.worker.kv_events import KvEventLog
from services.worker.kv_handles import HeldKV, KVHandleError, KVHandleStore
from services.worker.kv_layerwise import LayerProgress, LayerSignal
from services.worker.kv_offload import HostKVTier
from services.worker.kv_transfer import KVReservation, Span
from services.worker.layers.quantization import model_quantization, weight_bytes
from services.worker.lora.adapter import LoRAAdapterError
from services.worker.lora.registry import LoRARegistry
from services.worker.model_config import ModelConfig, ModelConfigError, load_model_config
from services.worker.model_runner import ModelRunner
from services.worker.models import IMAGE_MODELS
from services.worker.outputs import ChoiceOutput, RequestOutput, Usage
from services.worker.request import (
    EngineRequest,
    InvalidRequestError,
    Request,
    SamplingParams,
    TokenLogprob,
    validate_request,
)
from services.worker.scheduler import SampledToken, Scheduler, SchedulerOutput
from services.worker.speculative.draft_model import DraftModelProposer
from services.worker.speculative.eagle import EagleProposer
from services.worker.speculative.prompt_lookup import PromptLookupProposer
from services.worker.speculative.speculator import Proposer, Speculator
from services.worker.tp_group import BindKV, CaptureGraphs, DrivenKVCache, Profile, StepDriver

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelConfigError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return DTYPES[name]


def resolve_kv_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """--kv-cache-dtype: the model dtype, or float8 e4m3 (cast on write, widened on read)."""
    return torch.float8_e4m3fn if name == "fp8" else dtype


def resolve_max_model_len(cfg: ModelConfig, requested: int) -> int:
    # Sliding-window layers mask the keys that left their window (the attention ops), so the
    # window does not bound the context; the KV of those keys stays allocated (docs/worker.md).
    return requested or cfg.max_position_embeddings


@dataclass(frozen=True)
class LaunchedStep:
    """A step enqueued on the device whose tokens the host has not read yet (async scheduling)."""

    out: SchedulerOutput
    handle: StepHandle


@dataclass(frozen=True)
class InFlightBatch:
    """A batch a pipeline-parallel group has in flight (--pipeline-batches): stage 0 ran its layers
    over it; `finish()` receives it back from the last stage and samples (ModelRunner.launch_in_flight)."""

    out: SchedulerOutput
    finish: Callable[[], StepHandle]


@dataclass
class GenerateResult:
    """Everything one request produced (the `generate` helper's return)."""

    request_id: str
    token_ids: dict[int, list[int]] = field(default_factory=dict)  # choice index -> tokens
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    finish_reasons: dict[int, str] = field(default_factory=dict)
    stop_token_ids: dict[int, int | None] = field(default_factory=dict)
    usage: Usage | None = None
    num_outputs: int = 0  # engine outputs (stream chunks) it took
    error: str | None = None  # the engine failed the request (e.g. guided decoding)


TINY_HIDDEN_SIZE = 256


class Engine:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.model_config = cfg = load_model_config(config.model)
        self.device = resolve_device(config.device)
        self.bind_device()
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, self.dtype)
        if self.device.type == "cpu":
            # Process-wide: one engine per worker process. A tiny model's matmuls are far too small
            # to split, and extra threads only contend with the styler and gateway beside it
            # (measured far slower under load with 2 threads for stories260K, docs/worker.md).
            threads = config.cpu_threads or (1 if cfg.hidden_size <= TINY_HIDDEN_SIZE else 0)
            if threads:
                torch.set_num_threads(threads)
        self.max_model_len = resolve_max_model_len(cfg, config.max_model_len)
        self.served_model_name = config.served_model_name or Path(config.model).resolve().name
        self.ops = get_ops(config.attention_backend, self.device)
        self.runner = ModelRunner(
            cfg,
            self.ops,
            self.device,
            self.dtype,
            self.max_model_len,
            config.block_size,
            config.load_format,
            config.seed,
            config.quantization,
            config.quantization_group_size,
            max_loras=config.lora_slots,
            max_lora_rank=config.max_lora_rank,
            max_num_tokens=max(config.max_num_batched_tokens, config.max_num_seqs),
            pooling=config.task == "embed",
            pipeline_trace=config.pipeline_trace,
            encoder_cache_size=config.encoder_cache_size,
            pipeline_batches=config.batches_in_flight,
            tune_decode_attention=config.tune_decode_attention,
        )
        # Rank 0 of a tensor-parallel group: the other ranks run each forward it runs (tp_group.py).
        state = parallel.current()
        self.tp_size, self.pp_size = state.tp_size, state.pp_size
        # (ranks on other hosts of an --nnodes group have no watcher here: their loss shows in a ping)
        watched = config.nnodes == 1 or config.distributed_executor_backend == "ray"
        # (batches in flight: the later stages take a Forward when done with the batch before, which
        # rank 0 does not wait for; every rank queues the commands alike, tp_follow.py)
        parallel.queue_commands(state.world_size > 1 and config.batches_in_flight > 1)
        self.driver = StepDriver(config.distributed_timeout, watched) if state.world_size > 1 else None
        self.runner.model.driver = self.driver
        # LoRA adapters by name (lora/registry.py): those of --lora-modules now, more over LoadLoRA;
        # in a group every rank loads its shard of each.
        pool = self.runner.lora
        self.loras = LoRARegistry(
            pool.shapes if pool else None,
            config.max_lora_rank,
            config.lora_slots,
            self.driver.share_lora if self.driver is not None else None,
        )
        for name, path in config.lora_adapters:
            try:
                self.loras.load(name, path)
            except LoRAAdapterError as exc:
                raise ModelConfigError(f"--lora-modules: {exc}") from None
        # Bytes of the weights as stored (quantized ones at their size; Info reports it). On CUDA
        # the KV cache is what is left after the profiled peak, so it grows into what quantization freed.
        self.weight_bytes = weight_bytes(self.runner.model)
        self.quantization = model_quantization(self.runner.model)  # --quantization or the checkpoint's
        # a draft model's weights load before the KV cache is sized (the profile counts them)
        self.draft_model = (
            DraftModelProposer(
                config.speculative_model,
                cfg,
                config.tokenizer,
                self.ops,
                self.device,
                self.dtype,
                self.max_model_len,
                config.block_size,
                config.seed,
                config.load_format,
            )
            if config.speculative_method == "draft-model"
            else None
        )
        # an EAGLE head reads the target's hidden states (set up before the profile and the graphs)
        self.eagle = (
            EagleProposer(
                config.speculative_model,
                cfg,
                config.tokenizer,
                self.runner,
                self.ops,
                self.device,
                self.dtype,
                self.max_model_len,
                config.block_size,
                config.max_num_batched_tokens,
                config.seed,
                config.load_format,
            )
            if config.speculative_method == "eagle"
            else None
        )
        num_blocks = self._num_kv_blocks()
        # A group captures too, every rank the same ladder (CaptureGraphs below), when its model
        # collectives can be captured: NCCL's can, gloo's (host memory, host synchronisation)
        # cannot; nor do pipeline stages (their micro-batches' point-to-point sends are eager).
        group_graphs = self.driver is None or (state.graphs_capturable and state.pp_size == 1)
        graphs = self.device.type == "cuda" and not config.enforce_eager and group_graphs
        if self.device.type == "cuda" and not config.enforce_eager and not group_graphs:
            log.info(
                "CUDA graphs off in this group (%s): its collectives run eager",
                "pipeline stages"
                if state.pp_size > 1
                else f"{state.backend}'s collectives cannot be captured",
            )
        # Speculative decoding's forwards in graphs too (speculative/verify_graph.py): K + 1 rows
        # per sequence for the verification and a draft's catch-up (not in a group: 0 there)
        spec_k = self._speculative_graph_k()
        if self.draft_model is not None:
            # (in a group too: the draft is rank 0's alone, its forwards broadcast nothing)
            draft_graphs = self.device.type == "cuda" and not config.enforce_eager
            draft_k = config.num_speculative_tokens if draft_graphs and config.speculative_cuda_graphs else 0
            self.draft_model.bind_kv_cache(
                num_blocks, config.max_num_seqs if draft_graphs else 0, draft_k, config.max_num_batched_tokens
            )
        if self.eagle is not None:
            # (not in a group: the head shares the target's vocabulary-parallel embedding)
            self.eagle.bind_kv_cache(
                num_blocks,
                config.max_num_seqs if graphs and spec_k else 0,
                spec_k,
                config.max_num_batched_tokens,
            )
        # The host KV tier's slots (--kv-offload-memory, kv_offload.py), as many on every rank of a
        # group, each its own shard's bytes: rank 0's shard is the largest (the first stages take
        # the remainder layers), so every rank's fits the flag's bytes.
        host_blocks = config.kv_offload_bytes // block_bytes(cfg, config.block_size, self.kv_dtype)
        if self.driver is not None:
            self.driver.send(BindKV(num_blocks, host_blocks))
            self.kv_cache: KVCache = DrivenKVCache(
                cfg, num_blocks, config.block_size, self.kv_dtype, self.device
            )
            self.kv_cache.driver = self.driver
        else:
            self.kv_cache = KVCache(cfg, num_blocks, config.block_size, self.kv_dtype, self.device)
        self.runner.bind_kv_cache(self.kv_cache)
        if graphs and self.driver is not None:
            # Every rank captures the same decode ladder in the same order meanwhile; rank 0's
            # forwards broadcast nothing while it captures (the broadcast is a host call a graph
            # cannot hold: each replay sends a Forward with the graph size instead,
            # model_runner.py). The speculative forwards' graphs stay off in a group (spec_k 0).
            capture = CaptureGraphs(config.max_num_seqs, self.max_model_len)
            with self.driver.command(capture), self.driver.detached():
                self.runner.capture_cuda_graphs(config.max_num_seqs, self.max_model_len)
        elif graphs:
            self.runner.capture_cuda_graphs(
                config.max_num_seqs, self.max_model_len, spec_k, config.max_num_batched_tokens
            )
        if graphs and self.driver is None and config.prefill_graph_max_tokens > 0:
            # prompt-carrying steps: piecewise graphs, attention eager between them (prefill_graph.py)
            why = self.runner.capture_prefill_graphs(
                min(config.prefill_graph_max_tokens, config.max_num_batched_tokens)
            )
            if why:
                log.warning("piecewise CUDA graphs for prompt-carrying steps off: %s", why)
            self.runner.prefill_graphs_off = why
        self.kv_events = KvEventLog(config.kv_events_buffer) if config.enable_prefix_caching else None
        replay = self.driver.stage_host_kv if self.driver is not None else None  # the ranks copy too
        self.kv_offload = HostKVTier(self.kv_cache.tensor, host_blocks, replay) if host_blocks > 0 else None
        # Blocks out of the window are freed when every layer slides, except on a prefill worker,
        # which hands a prompt's whole KV to a decode worker (kv_handles holds every block).
        window = cfg.uniform_sliding_window if config.role != "prefill" else 0
        self.block_manager = BlockManager(
            num_blocks,
            config.block_size,
            config.enable_prefix_caching,
            self.kv_events,
            self.kv_offload,
            sliding_window=window,
        )
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_batched_tokens, config.max_num_seqs, config.lora_slots
        )
        # (a group's ranks build their block tables from the host's; a window frees beams' blocks)
        self.scheduler.beams_ahead = self.driver is None and window == 0
        self.speculator = self._build_speculator()
        self.requests: dict[str, Request] = {}
        # Disaggregation: decode-side requests whose prompt KV is being fetched (not scheduled yet),
        # and prefill-side KV kept for decode workers.
        self.fetching: dict[str, Request] = {}
        # Outputs made between steps (a fetched request's first token), delivered before the next step's
        self._early_outputs: list[RequestOutput] = []
        self.kv_handles = KVHandleStore(self.block_manager, config.kv_handle_ttl)
        # Layer-wise push (kv_layerwise.py): the handles of prefills still running, by request id.
        # Rank 0's hook sees only its own shard's writes, so a parallel group does not offer it.
        self.layer_signal = LayerSignal(self.device)
        self.runner.bind_layer_signal(self.layer_signal)
        self.supports_layerwise = self.driver is None and config.task == "generate"
        # Images this worker keeps embeddings of, which a caller may then send as their hash alone
        # (Info); 0 where images are refused (a text model, a parallel group)
        takes_images = isinstance(self.runner.model, IMAGE_MODELS) and self.driver is None
        self.encoder_cache_size = config.encoder_cache_size if takes_images else 0
        self._layerwise: dict[str, HeldKV] = {}
        self.grammars, self.guided_unavailable = self._load_grammar_compiler()
        self._arrivals = itertools.count()
        # the seeds of requests that come without one (--seed makes a worker's run reproducible)
        self._seeds = random.Random(config.seed)
        # Async scheduling: the decode step launched ahead, read by the next step() call.
        self.async_scheduling = config.async_scheduling == "on" or (
            config.async_scheduling == "auto" and self.device.type == "cuda"
        )
        self._launched: LaunchedStep | None = None
        # Pipeline parallelism: batches of different steps in flight at once (pipeline.py), oldest first
        self.pipeline_batches = config.batches_in_flight
        self._in_flight: deque[InFlightBatch] = deque()
        if self.pipeline_batches > 1:
            self.async_scheduling = False  # (the batches in flight keep the stages busy instead)
        self.num_continuations = 0  # steps launched before the previous one's tokens were read
        self.num_discarded_rows = 0  # rows of those computed for sequences that had already finished

    # ---- setup ---------------------------------------------------------------------------------
    def _build_speculator(self) -> Speculator | None:
        config = self.config
        proposer: Proposer
        draft_cost = 0.0
        target_params = sum(p.numel() for p in self.runner.model.parameters())
        if self.draft_model is not None:
            proposer = self.draft_model
            draft_cost = self.draft_model.num_params / max(target_params, 1)
        elif self.eagle is not None:
            proposer = self.eagle
            draft_cost = self.eagle.num_params / max(target_params, 1)
        elif config.speculative_method == "prompt-lookup":
            proposer = PromptLookupProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        else:
            return None
        token_cost = config.speculative_token_cost or (1 / 256 if self.device.type == "cuda" else 1 / 64)
        return Speculator(
            proposer,
            self.block_manager,
            config.num_speculative_tokens,
            self.max_model_len,
            config.max_num_batched_tokens,
            config.speculative_adaptive,
            token_cost,
            draft_cost,
        )

    def _speculative_graph_k(self) -> int:
        """K for the speculative forwards' CUDA graphs (0: none), the reason logged when off."""
        config = self.config
        if config.speculative_method == "off" or self.device.type != "cuda":
            return 0
        reason = ""
        if config.enforce_eager:
            reason = "--enforce-eager"
        elif not config.speculative_cuda_graphs:
            reason = "--no-speculative-cuda-graphs"
        elif self.driver is not None:  # (a draft model's own graphs stay: it is rank 0's alone)
            reason = "a tensor- / pipeline-parallel group replays only decode graphs (docs/parallel.md)"
        if reason:
            log.info("CUDA graphs off for speculative decoding's verification and draft forwards: %s", reason)
            return 0
        return config.num_speculative_tokens

    def _num_kv_blocks(self) -> int:
        cfg, bs = self.model_config, self.config.block_size
        per_block = block_bytes(cfg, bs, self.kv_dtype)
        if self.draft_model is not None:  # the draft's cache has as many blocks: the budget is shared
            per_block += self.draft_model.block_bytes()
        if self.eagle is not None:  # (so has an EAGLE head's)
            per_block += self.eagle.block_bytes()
        blocks_per_seq = math.ceil(self.max_model_len / bs)
        budget = self.config.kv_cache_bytes
        if budget is None and self.device.type == "cuda":
            peak = self._profile_peak_bytes()
            total = torch.cuda.get_device_properties(self.device).total_memory
            # Ranks of a gloo group sharing a GPU (tp_launch.local_gpu; Ray gives each its own)
            # share its memory: each takes its part of the budget (their peaks are alike).
            sharing = 1
            if parallel.current().gloo_on_cuda and self.config.distributed_executor_backend == "mp":
                per_node = self.config.world_size // self.config.nnodes
                sharing = -(-per_node // max(torch.cuda.device_count(), 1))
            budget = int(total * self.config.gpu_memory_utilization / sharing) - peak
        elif budget is None:
            budget = int(available_host_bytes() * self.config.cpu_kv_cache_fraction)
        num_blocks = min(budget // per_block, blocks_per_seq * self.config.max_num_seqs + 1)
        if num_blocks < blocks_per_seq:
            raise ModelConfigError(
                f"the KV cache ({num_blocks} blocks of {bs} tokens, {budget} bytes) cannot hold one sequence of "
                f"--max-model-len {self.max_model_len}; give it more memory or lower --max-model-len"
            )
        return int(num_blocks)

    def _profile_peak_bytes(self) -> int:
        tokens, seqs = self.config.max_num_batched_tokens, self.config.max_num_seqs
        if self.driver is None:
            return self.runner.profile_peak_bytes(tokens, seqs)
        self.driver.send(Profile(tokens, seqs))  # every rank runs the same profiling forward
        with self.driver.detached():
            return self.runner.profile_peak_bytes(tokens, seqs)

    def _load_grammar_compiler(self) -> tuple[GrammarCompiler | None, str]:
        """Guided decoding needs the model's tokenizer.json (--tokenizer, default the model
        directory). Without one the worker serves unguided requests and refuses guided ones; an
        explicit --tokenizer that cannot be loaded is a start-up error."""
        path = self.config.tokenizer or self.config.model
        cfg = self.model_config
        try:
            return GrammarCompiler.load(path, cfg.vocab_size, cfg.eos_token_ids), ""
        except GuidedUnavailableError as exc:
            if self.config.tokenizer:
                raise ModelConfigError(f"--tokenizer {self.config.tokenizer}: {exc}") from None
            log.info("guided decoding off: %s (give --tokenizer)", exc)
            return (
                None,
                f"guided decoding needs the model's tokenizer; this worker has none ({exc}; see --tokenizer)",
            )

    def compile_grammar(self, req: EngineRequest) -> EngineRequest:
        """`req` with its guided constraint compiled (cached); raises GuidedUnavailableError
        without a tokenizer, InvalidRequestError for a bad constraint. Thread-safe."""
        spec = req.sampling.guided
        if spec is None or req.grammar is not None:
            return req
        if self.grammars is None:
            raise GuidedUnavailableError(self.guided_unavailable)
        return replace(req, grammar=self.grammars.compile(spec))

    # ---- requests ------------------------------------------------------------------------------
    def bind_device(self) -> None:
        """Make this engine's GPU the calling thread's current device. Triton launches on the
        current device, and torch's current device is per thread: a worker on cuda:1 must set it
        in every thread that runs the model (here, and in the engine thread)."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def add_request(self, req: EngineRequest, schedule: bool = True) -> Request:
        """Queue a request (or only create it, `schedule=False`, for add_fetching_request); raises
        InvalidRequestError for bad parameters or a duplicate id. The one validation of a request
        on the worker (the gRPC servicer only converts it)."""
        if req.pooling != (self.config.task == "embed"):
            raise InvalidRequestError("task", task_mismatch(self.config.task))
        max_tokens = validate_request(req, self.model_config.vocab_size, self.max_model_len)
        if req.sampling.seed is None:  # drawn once: all sampling draws are keyed by a seed (sampling_rng.py)
            req = replace(req, sampling=replace(req.sampling, seed=self._seeds.getrandbits(64)))
        if req.request_id in self.requests or req.request_id in self.fetching:
            raise InvalidRequestError("request_id", f"{req.request_id!r} is already running")
        if req.images:
            if not isinstance(self.runner.model, IMAGE_MODELS):
                raise InvalidRequestError("images", f"{self.model_config.path} takes no images")
            if self.tp_size * self.pp_size > 1:  # the image rows' forward is rank 0's alone
                raise InvalidRequestError(
                    "images", "image inputs are not served by a tensor- or pipeline-parallel worker yet"
                )
            # hash-only images resolved now, held by the request until it runs (mm_inputs.py)
            live = (x for r in self.requests.values() for x in r.req.images)
            req = replace(req, images=self.runner.encoder_cache.admit(req.images, live))
            for i, image in enumerate(req.images):
                self.runner.model.check_image(i, image)
        num_seqs = req.sampling.num_sequences
        field_name = "sampling.n" if num_seqs == req.sampling.n else "sampling.best_of"
        if num_seqs > self.config.max_num_seqs:
            raise InvalidRequestError(
                field_name, f"{num_seqs} sequences exceed --max-num-seqs {self.config.max_num_seqs}"
            )
        prompt_blocks = math.ceil(
            (len(req.prompt_token_ids) + len(req.generated_token_ids)) / self.config.block_size
        )
        if prompt_blocks + num_seqs - 1 > self.block_manager.num_blocks:
            raise InvalidRequestError(
                field_name, f"{num_seqs} sequences do not fit the KV cache of this worker"
            )
        if req.lora_name and req.lora is None:  # raises LoRANotFoundError (gRPC NOT_FOUND)
            req = replace(req, lora=self.loras.get(req.lora_name))
        req = self.compile_grammar(req)  # already done by the gRPC servicer, off this thread
        request = Request(req, max_tokens, self.model_config.eos_token_ids, next(self._arrivals))
        fan_out.attach(request, self.model_config.vocab_size)
        if req.kv_handle_id:
            self._open_layerwise(request)
        if schedule:
            self.schedule_request(request)
        return request

    def _open_layerwise(self, request: Request) -> None:
        req = request.req
        if not (req.hold_kv and self.supports_layerwise):
            raise InvalidRequestError(
                "layerwise", "layer-wise push needs a Prefill on a worker that offers it"
            )
        progress = LayerProgress(self.kv_cache.tensor.shape[0], request.prompt_len, self.config.block_size)
        try:
            handle = self.kv_handles.open(req.kv_handle_id, request.request_id, request.prompt_len, progress)
        except KVHandleError as exc:
            raise InvalidRequestError("layerwise", str(exc)) from None
        self._layerwise[request.request_id] = handle

    def schedule_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    # ---- disaggregated decode: the prompt's KV comes from a prefill worker (kv_transfer.py) ----
    def add_fetching_request(self, req: EngineRequest) -> Request:
        """Accept a request whose prompt KV will be fetched: it gets blocks for its prompt and
        waits, unscheduled, for `kv_fetched` or `kv_fetch_failed`. With too few free blocks it is
        simply scheduled to compute its prompt here. Raises InvalidRequestError as add_request."""
        request = self.add_request(req, schedule=False)
        if self.scheduler.reserve_fetch(request):
            self.fetching[request.request_id] = request
        else:
            self.schedule_request(request)
        return request

    def fetch_reservation(self, request_id: str) -> KVReservation | None:
        """What `add_fetching_request` reserved (None: the request computes its prompt itself)."""
        request = self.fetching.get(request_id)
        if request is None:
            return None
        seq = request.sequences[0]
        return KVReservation(seq.num_computed_tokens, len(seq.block_ids), self.fetch_wants_first(request))

    def write_fetched_kv(self, request_id: str, span: Span, tensor: torch.Tensor) -> bool:
        """Copy a received KV chunk (layers [l0, l1) x the prompt's blocks [b0, b1)) into the
        request's blocks; False when the request is gone (aborted meanwhile)."""
        request = self.fetching.get(request_id)
        if request is None:
            return False
        l0, l1, b0, b1 = span
        self.kv_cache.write_blocks(l0, l1, request.sequences[0].block_ids[b0:b1], tensor)
        return True

    def copy_peer_kv(self, request_id: str, span: Span, remote: torch.Tensor, src_ids: list[int]) -> bool:
        """Copy a CUDA IPC fetch's blocks (layers [l0, l1) of the prompt's blocks [b0, b1), at
        `src_ids` in the peer's cache `remote`) into the request's blocks, device to device; False
        when the request is gone (aborted meanwhile)."""
        request = self.fetching.get(request_id)
        if request is None:
            return False
        l0, l1, b0, b1 = span
        self.kv_cache.copy_blocks_from(remote, src_ids, request.sequences[0].block_ids[b0:b1], (l0, l1))
        return True

    def kv_first_token(self, request_id: str, first: ChoiceOutput) -> bool:
        """A layer-wise fetch brought the prefill's first token (`KVChunk.first`), which may come
        before the rest of the fetch has landed (the writes in flight, the CUDA IPC copy, NIXL
        reads): it becomes the request's first generated token now (guided decoding advances,
        max_tokens counts it) and goes out at once, from this thread, in order with the
        request's later outputs (`take_outputs`). A token that ends the choice (its finish
        reason set) ends the request here and frees its reserved blocks. If the fetch then
        fails, the request computes its prompt and this token, and continues from it: the
        client has seen it. False (nothing changed) when the request takes no token from its
        fetch (gone, several choices, a token already given) or refuses it (guided decoding):
        it then samples its own first token."""
        request = self.fetching.get(request_id)
        if request is None or not self.fetch_wants_first(request) or not first.token_ids:
            return False
        final = first.finish_reason is not None
        try:
            request.add_generated(first.token_ids, final=final)
        except InvalidRequestError as exc:  # (the prefill worker sampled under the same rules)
            log.warning("request %s: the prefill's first token %s: %s", request_id, first.token_ids, exc)
            return False
        seq = request.sequences[0]
        seq.new_token_ids = list(first.token_ids)
        seq.new_logprobs = list(first.logprobs or ())
        if final:  # nothing to decode: its blocks go back now (their KV may be incomplete: uncached)
            del self.fetching[request_id]
            self.requests[request_id] = request  # (_output pops it)
            self.scheduler.finish_sequence(seq, first.finish_reason or "stop")
            seq.stop_token_id = first.stop_token_id
        self._early_outputs.append(self._output(request))
        return True

    def take_outputs(self) -> list[RequestOutput]:
        """Outputs made between steps (`kv_first_token`); the caller delivers them before the
        next step's, so each request's outputs stay in order."""
        outputs, self._early_outputs = self._early_outputs, []
        return outputs

    def kv_fetched(self, request_id: str) -> None:
        """The whole prompt's KV is in place: the request is scheduled to decode, from the
        prefill's first token when `kv_first_token` gave it one, else from its last prompt token
        (computed again here: each choice samples its own first token)."""
        request = self.fetching.pop(request_id, None)
        if request is None:
            return
        self.requests[request_id] = request
        self.scheduler.add_fetched(request)

    @staticmethod
    def fetch_wants_first(request: Request) -> bool:
        """Whether a fetching request takes its first token from the fetch (one choice, none given)."""
        return request.sampling.num_sequences == 1 and not request.req.generated_token_ids

    def kv_fetch_failed(self, request_id: str) -> None:
        """The fetch failed: the request is scheduled to compute its prompt here."""
        request = self.fetching.pop(request_id, None)
        if request is not None:
            self.requests[request_id] = request
            self.scheduler.add_unfetched(request)

    def pin_fetch_blocks(self, request_id: str) -> tuple[int, ...] | None:
        """The blocks reserved for a fetch, pinned until `unpin_blocks` (a NIXL read writes them
        off this thread: an abort meanwhile must not hand them to another request)."""
        request = self.fetching.get(request_id)
        if request is None:
            return None
        blocks = tuple(request.sequences[0].block_ids)
        for block in blocks:
            self.block_manager.pin_block(block)
        return blocks

    def unpin_blocks(self, blocks: tuple[int, ...]) -> None:
        for block in blocks:
            self.block_manager.unpin_block(block)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output, None if unknown."""
        request = self.requests.get(request_id) or self.fetching.pop(request_id, None)
        if request is None:
            return None
        self.requests[request_id] = request  # _output pops it
        self.scheduler.abort(request)
        if self.speculator is not None:
            self.speculator.release(request.sequences)
        self._drop_dead_launch()
        return self._output(request)

    @property
    def in_flight(self) -> list[SchedulerOutput]:
        """The batches a pipeline-parallel group has in flight, oldest first (--pipeline-batches)."""
        return [batch.out for batch in self._in_flight]

    def has_unfinished(self) -> bool:
        # (a batch in flight is received back even when all its requests were aborted meanwhile)
        return bool(self.requests) or bool(self._in_flight)

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.pipeline_batches > 1:
            return self._step_pipelined()
        # Speculative decoding: a step with drafts is synchronous (its drafts need the tokens so
        # far on the host); a plain one may run async; a step launched ahead is read first.
        k = 0
        if self.speculator is not None:
            running = self.scheduler.running
            k = self.speculator.decide(len(running))
            if k and self.async_scheduling and not self.speculator.may_propose(running):
                k = 0  # (prompt lookup finds nothing to copy: stay async)
        if self.async_scheduling and k == 0:
            return self._step_async()
        if self._launched is not None:
            return self._step_async(launch_next=False)
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:  # nothing to compute, but a pending copy-on-fork must not be lost
            self.kv_cache.copy_blocks(scheduled.block_copies)
        elif self.speculator is not None:
            self.speculator.plan(scheduled, k)
        sampled = self._launch(scheduled).result() if not scheduled.is_empty else []
        outputs = self._apply(scheduled, sampled)
        if self.speculator is not None:
            self.speculator.observe(scheduled, sampled)
        return outputs

    def _apply(self, scheduled: SchedulerOutput, sampled: list[list[SampledToken]]) -> list[RequestOutput]:
        touched = self.scheduler.update(scheduled, sampled)
        if self.scheduler.failed:  # guided decoding failed for a choice: end the whole request
            for request in self.scheduler.take_failed():
                self.scheduler.abort(request)
        if self.speculator is not None:  # a draft model's blocks of finished sequences go back
            self.speculator.release([item.seq for item in scheduled.scheduled if item.seq.is_finished])
            self.speculator.after_step()
        outputs = [self._output(request) for request in sorted(touched, key=lambda r: r.arrival)]
        return [out for out in outputs if out.choices or out.finished]  # a prefill chunk: nothing to say

    def _step_async(self, launch_next: bool = True) -> list[RequestOutput]:
        """Async scheduling: step N is launched (now, or by the previous call); while it runs, step
        N+1 is planned assuming every decode goes on and launched with its input ids taken from
        N's sampled tokens on the device; only then are N's tokens read (the one wait) and applied.
        Rows of N+1 whose sequence finished at N (stop token, abort) are discarded when N+1 is
        read. Returns step N's outputs, like the synchronous step. `launch_next=False`: N is read
        and applied and nothing is launched after it (the next step is synchronous)."""
        current, self._launched = self._launched, None
        if current is None:
            scheduled = self.scheduler.schedule()
            if scheduled.is_empty:
                self.kv_cache.copy_blocks(scheduled.block_copies)
                return self._apply(scheduled, [])
            current = LaunchedStep(scheduled, self._launch(scheduled))
        following = self.scheduler.schedule_continuation(current.out) if launch_next else None
        if following is not None:
            self._launched = LaunchedStep(following, self._launch(following, current.handle))
            self.num_continuations += 1
        out, sampled = current.out, current.handle.result()
        live = [i for i, item in enumerate(out.scheduled) if not item.seq.is_finished]
        if len(live) < len(out.scheduled):  # finished at the step before (or aborted): discard
            self.num_discarded_rows += len(out.scheduled) - len(live)
            out = replace(out, scheduled=[out.scheduled[i] for i in live])
            sampled = [sampled[i] for i in live]
        outputs = self._apply(out, sampled)
        self._drop_dead_launch()
        return outputs

    def _step_pipelined(self) -> list[RequestOutput]:
        """A pipeline-parallel group with P batches in flight (vLLM's virtual engines, V1's batch
        queue): batches are scheduled and started on stage 0 until P are in flight, each of other
        requests than the batches in flight (a sequence is never in two) and of about 1/P of the
        requests; then the oldest is received back from the last stage, sampled and applied, as
        a synchronous step would. Its sequences go into the batch the next call starts, while the
        later stages still compute the batches started after it. Returns the oldest's outputs."""
        while len(self._in_flight) < self.pipeline_batches:
            busy = {item.seq.request for batch in self._in_flight for item in batch.out.scheduled}
            share = -(-len(self.requests) // self.pipeline_batches)
            scheduled = self.scheduler.schedule(busy, max_requests=max(share, 1))
            if scheduled.is_empty:  # nothing more to start, but a pending copy-on-fork must not be lost
                self.kv_cache.copy_blocks(scheduled.block_copies)
                break
            self._in_flight.append(InFlightBatch(scheduled, self.runner.launch_in_flight(scheduled)))
        if not self._in_flight:
            return []
        batch = self._in_flight.popleft()
        out, sampled = batch.out, batch.finish().result()
        live = [i for i, item in enumerate(out.scheduled) if not item.seq.is_finished]
        if len(live) < len(out.scheduled):  # aborted while in flight: its outputs were given then
            self.num_discarded_rows += len(out.scheduled) - len(live)
            out = replace(out, scheduled=[out.scheduled[i] for i in live])
            sampled = [sampled[i] for i in live]
        return self._apply(out, sampled)

    def _launch(self, scheduled: SchedulerOutput, prev: StepHandle | None = None) -> StepHandle:
        """runner.launch, with the layer-wise prompts in the step armed on the layer signal."""
        if not self._layerwise:
            return self.runner.launch(scheduled, prev)
        self._arm_layerwise(scheduled)
        try:
            return self.runner.launch(scheduled, prev)
        finally:
            self.layer_signal.disarm()

    def _arm_layerwise(self, scheduled: SchedulerOutput) -> None:
        """Before a launch: each layer-wise prompt in the step pins its (new) blocks to its handle
        and will count this step's tokens layer by layer. A prompt whose blocks were taken back
        (preempted) fails its handle: the KV its reader would see is gone."""
        for request_id, handle in self._layerwise.items():
            request = self.requests.get(request_id)
            assert handle.progress is not None
            if handle.progress.done:  # failed, or released by its reader (the fetch gave up)
                continue
            seq = request.sequences[0] if request is not None else None
            if seq is None or tuple(seq.block_ids[: len(handle.block_ids)]) != handle.block_ids:
                self.kv_handles.fail(handle, "the prefill was preempted on the prefill worker")
        entries: list[tuple[LayerProgress, int]] = []
        for item in scheduled.scheduled:
            held = self._layerwise.get(item.seq.request.request_id)
            if held is None or held.progress is None or held.progress.done:
                continue
            self.kv_handles.adopt(held, item.seq.block_ids)
            held.progress.computed_before(item.start)
            entries.append((held.progress, item.start + item.num_new_tokens))
        self.layer_signal.arm(entries)

    def _finish_layerwise(self, request: Request, choices: list[ChoiceOutput]) -> HeldKV | None:
        """A layer-wise prefill ended: its handle completes with the first token (its blocks stay,
        pinned by the handle alone), or fails when the prefill was aborted or preempted. It
        stays in `_layerwise` until here, failed or not, so that no ordinary handle is made."""
        handle = self._layerwise.pop(request.request_id, None)
        if handle is None:
            return None
        assert handle.progress is not None
        seq = request.sequences[0]
        first = next((c for c in choices if c.index == seq.choice_index), None)
        if handle.progress.done or seq.finish_reason == "abort" or first is None or not first.token_ids:
            self.kv_handles.fail(handle, "the prefill was aborted on the prefill worker")
        elif tuple(seq.block_ids[: len(handle.block_ids)]) != handle.block_ids and seq.block_ids:
            self.kv_handles.fail(handle, "the prefill was preempted on the prefill worker")
        else:
            if seq.finish_reason == "prefilled":
                self.kv_handles.adopt(handle, seq.block_ids)
            self.kv_handles.complete(handle, first)
        if seq.finish_reason == "prefilled":  # the sequence's own references go (the handle's stay)
            self.block_manager.free_sequence(seq)
        return handle

    def _drop_dead_launch(self) -> None:
        """Forget the launched step when every sequence in it has finished: nobody reads it (its
        device work completes in stream order before anything reuses the freed blocks)."""
        launched = self._launched
        if launched is not None and all(item.seq.is_finished for item in launched.out.scheduled):
            self.num_discarded_rows += len(launched.out.scheduled)
            self._launched = None

    def _output(self, request: Request) -> RequestOutput:
        if request.ranked is not None:  # best_of / beam search: nothing until the n best are known
            ranked = request.ranked.output(request)
            if ranked.finished:
                self.requests.pop(request.request_id, None)
            return ranked
        choices = []
        want_logprobs = request.sampling.logprobs is not None
        kv_handle = None
        layerwise = request.request_id in self._layerwise
        for seq in request.sequences:
            if seq.finish_reason == "prefilled" and not seq.finish_reported and not layerwise:
                # The prompt's blocks (the sampled token has no KV yet) now belong to a KV handle.
                kv_handle = self.kv_handles.hold(request.request_id, seq.block_ids, request.prompt_len)
                seq.block_ids, seq.block_hashes = [], []
            finishing = seq.finish_reason is not None and not seq.finish_reported
            if not seq.new_token_ids and not finishing:
                continue
            choices.append(
                ChoiceOutput(
                    index=seq.choice_index,
                    token_ids=tuple(seq.new_token_ids),
                    logprobs=tuple(seq.new_logprobs) if want_logprobs else None,
                    finish_reason=seq.finish_reason
                    if finishing and seq.finish_reason != "prefilled"
                    else None,
                    stop_token_id=seq.stop_token_id if finishing else None,
                )
            )
            seq.new_token_ids, seq.new_logprobs = [], []
            seq.finish_reported = seq.finish_reported or finishing
        prompt_logprobs = None
        if request.sampling.prompt_logprobs is not None and choices and not request.prompt_logprobs_sent:
            prompt_logprobs = tuple(request.prompt_logprobs)
            request.prompt_logprobs_sent = True
        finished = request.is_finished
        if finished and layerwise:
            kv_handle = self._finish_layerwise(request, choices)
        usage = None
        if finished:
            self.requests.pop(request.request_id, None)
            usage = Usage(
                request.prompt_len, request.num_completion_tokens, request.num_cached_prompt_tokens or 0
            )
        embedding = None
        if finished and request.embedding is not None:  # (the step that made it has been read)
            embedding = tuple(request.embedding.tolist())
            request.embedding = None
        return RequestOutput(
            request.request_id,
            tuple(choices),
            finished,
            usage,
            prompt_logprobs=prompt_logprobs,
            kv_handle=kv_handle,
            error=request.error if finished else None,
            embedding=embedding,
        )

    # ---- stats ---------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], prefix: str = "gen"
    ) -> list[GenerateResult]:
        """Run `prompts` together to completion (tests and benchmarks)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        return self.run(
            [
                EngineRequest(f"{prefix}-{i}", tuple(prompt), sp)
                for i, (prompt, sp) in enumerate(zip(prompts, params_list, strict=True))
            ]
        )

    def run(self, requests: list[EngineRequest]) -> list[GenerateResult]:
        """Run `requests` together to completion, their results in their order (tests, benchmarks)."""
        results = {}
        for req in requests:
            self.add_request(req)
            results[req.request_id] = GenerateResult(req.request_id)
        while self.has_unfinished():
            for out in self.step():
                collect(results[out.request_id], out)
        return list(results.values())

    def embed(self, prompts: list[list[int]], prefix: str = "emb") -> list[tuple[float, ...]]:
        """Embeddings of `prompts`, computed together (tests and benchmarks; --task embed)."""
        results: dict[str, tuple[float, ...] | None] = {}
        for i, prompt in enumerate(prompts):
            rid = f"{prefix}-{i}"
            self.add_request(EngineRequest(rid, tuple(prompt), pooling=True))
            results[rid] = None
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out.embedding
        missing = [rid for rid, vector in results.items() if vector is None]
        if missing:
            raise RuntimeError(f"no embedding for {missing}")
        return [vector for vector in results.values() if vector is not None]


def collect(result: GenerateResult, out: RequestOutput) -> None:
    """Fold one engine output into a GenerateResult."""
    result.num_outputs += 1
    for choice in out.choices:
        result.token_ids.setdefault(choice.index, []).extend(choice.token_ids)
        if choice.logprobs is not None:
            result.logprobs.setdefault(choice.index, []).extend(choice.logprobs)
        if choice.finish_reason is not None:
            result.finish_reasons[choice.index] = choice.finish_reason
            result.stop_token_ids[choice.index] = choice.stop_token_id
    if out.usage is not None:
        result.usage = out.usage
    if out.error is not None:
        result.error = out.error
