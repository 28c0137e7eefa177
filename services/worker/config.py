"""Options of `tandem worker`: one frozen dataclass whose field docstrings are the --help text."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from services.common.service_config import ServiceConfig

_SIZE_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3}


def parse_size(text: str) -> int:
    """Bytes from "1073741824", "512MiB", "2GiB", "1.5G" (case-insensitive; a trailing B is optional)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]i?)?b?\s*", text.lower())
    if not match:
        raise ValueError(f"--kv-cache-memory: invalid size {text!r} (e.g. 2GiB, 512MiB or a byte count)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])


@dataclass(frozen=True)
class WorkerConfig(ServiceConfig):
    """A tandem model worker: one model replica, its paged KV cache, scheduler and kernels. Besides these options (each also read from TANDEM_<OPTION>), a few environment switches exist (TANDEM_PDL, TANDEM_FOLD_NORMS, ...): `tandem worker --list-switches` prints them with their defaults and reasons."""

    model: str = ""
    """Hugging Face model directory (config.json and *.safetensors)."""
    tokenizer: str = ""
    """tokenizer.json (or a directory holding one) for guided decoding; empty: the model directory (without one, guided requests are refused)."""
    served_model_name: str = ""
    """Model name reported by Info; defaults to the model directory's name."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight and activation dtype; auto is float32 on CPU and bfloat16 on GPU."""
    load_format: Literal["auto", "dummy"] = "auto"
    """auto loads the safetensors weights; dummy fills random weights for the real config (benchmarks)."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    block_size: int = 16
    """Tokens per KV cache block."""
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    """KV cache element type: auto = the model dtype; fp8 = float8 e4m3 (a plain cast, no scales): twice the tokens in the same memory and half the bytes decode attention reads, at a K/V rounding of 1/16."""
    quantization: Literal["none", "int8", "fp8", "int4"] = "none"
    """Quantize the full-precision checkpoint's decoder projections at load time, layer by layer: int8 = weight-only INT8 with per-channel scales (W8A16); fp8 = float8 e4m3 weights with per-channel scales, W8A8 with dynamic per-token activation scales on GPUs with FP8 (compute capability >= 8.9), weight-only elsewhere; int4 = 4-bit round-to-nearest, group 128 (W4A16, uncalibrated). The embedding and LM head stay in --dtype. Pre-quantized checkpoints are detected from config.json (docs/quantization.md)."""
    quantization_group_size: int = 0
    """With --quantization int8: one scale per group of this many input columns (e.g. 128) instead of per output channel (0); with int4 the group size (0 = 128)."""
    kv_cache_memory: str = ""
    """KV cache size in bytes (e.g. 2GiB, 512MiB, 1073741824); empty: a fraction of free device memory."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's total memory this worker may use (weights, activations and KV cache)."""
    cpu_kv_cache_fraction: float = 0.1
    """Without --kv-cache-memory on CPU: fraction of available host memory for the KV cache."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step (prefill chunks plus decodes)."""
    max_num_seqs: int = 256
    """Largest number of sequences (choices) computed in one step."""
    max_model_len: int = 0
    """Largest prompt + output length; 0: the model's max_position_embeddings."""
    enable_prefix_caching: bool = True
    """Reuse the KV of full blocks whose token prefix was seen before."""
    attention_backend: Literal["auto", "triton", "reference"] = "auto"
    """Kernel implementations: triton on CUDA when supported, reference (PyTorch) otherwise."""
    enforce_eager: bool = False
    """Never capture CUDA graphs; by default decode steps replay graphs captured at start-up on CUDA."""
    prefill_graph_max_tokens: int = 2048
    """CUDA: steps that carry prompt tokens (prefill chunks, mixed with decodes or not), of 17 up to this many tokens (at most --max-num-batched-tokens), replay piecewise CUDA graphs captured at start-up for a ladder of token counts: every op but attention in graphs, attention eager between them (docs/worker.md); it takes most of a short step's host launch work away. 0 (or --enforce-eager): they run eagerly."""
    tune_decode_attention: bool = False
    """CUDA: time the paged decode attention kernel's launch configs per attention shape and decode batch at start-up and keep the fastest (docs/gpu.md); costs start-up time (a compile per candidate and shape: up to a minute for a model with two attention shapes), gains a few percent of the attention at most where measured. Off: each shape runs the kernel's default config."""
    async_scheduling: Literal["auto", "on", "off"] = "auto"
    """Plan and launch decode step N+1 while step N runs on the device (its input ids come from N's sampled-token tensor); auto: on for CUDA, off on CPU."""
    seed: int = 0
    """Seed of the seeds drawn for requests that come without one, and of dummy weights."""
    cpu_threads: int = 0
    """Torch intra-op threads on the CPU; 0 = auto: 1 for tiny models (hidden size <= 256, where threads only add synchronisation), else torch's default."""
    task: Literal["generate", "embed"] = "generate"
    """What this worker serves: generate (Generate / Prefill: text) or embed (Embed: pooling mode for decoder embedding models such as Qwen3-Embedding; the final-norm hidden state of each prompt's last token, L2-normalised; no KV is kept after a request). Each refuses the other's rpcs with FAILED_PRECONDITION."""
    role: Literal["unified", "prefill", "decode", "encode"] = "unified"
    """Worker role: unified (prefill and decode), prefill (serves Prefill / FetchKV), decode (Generate with a kv_source) or encode (only an image-in model's vision encoder: serves Encode; docs/multimodal.md)."""
    encoder_cache_size: int = 64
    """Image-in models: images whose embeddings this worker keeps (least recently used out), so that a later turn's image is not encoded again and may come as its hash alone (Info reports the size; the gateway remembers at most this many images per worker). 0: none kept."""
    kv_handle_ttl: float = 30.0
    """Prefill role: seconds a prefilled prompt's KV is kept for a decode worker to fetch before it is freed."""
    kv_advertise_address: str = ""
    """Address decode workers use to reach this worker's FetchKV ("" = the bound --address)."""
    max_pending_requests: int = 1024
    """Generate / Prefill calls this worker holds at once (running, queued or compiling); one more is refused with RESOURCE_EXHAUSTED, which a gateway takes as back-pressure (another worker, else 429). 0: no limit."""
    kv_chunk_bytes: int = 1024 * 1024
    """Target size of one FetchKV chunk (a layer range x a block range) in bytes (1 MiB was fastest, docs/disaggregation.md)."""
    kv_fetch_streams: int = 0
    """Decode side, gRPC transport: parallel FetchKV streams (each a range of layers, on its own connection) one fetch may use, so reading, sending and writing overlap across them on spare cores; a prefill worker that predates them sends one stream (docs/disaggregation.md). 0 = auto: one per 4 CPU cores, 1 to 4; 1: one stream."""
    kv_wire_helpers: int = -1
    """gRPC transport: helper processes (0 to 7) that carry a parallel fetch's further streams on both sides (serving them as a prefill worker, reading them as a decode worker), so that one fetch's bytes cross grpcio in several processes instead of one (docs/disaggregation.md); each holds 8 slots of --kv-chunk-bytes in shared memory (/dev/shm). With --kv-fetch-streams 0 a decode worker then asks for one stream per helper and one more. They serve TCP addresses of single-rank workers. -1 = auto: a prefill or decode worker on a GPU gets one per 4 cores beyond the first 4, at most 3; other workers none. 0: off."""
    tensor_parallel_size: int = 1
    """Ranks the model is split over (Megatron-style tensor parallelism, docs/parallel.md); this process is rank 0 and starts the others itself, one per GPU (cuda:0..T-1) or all on the CPU."""
    pipeline_parallel_size: int = 1
    """Pipeline stages the layers are split into (each stage T ranks; --tensor-parallel-size x this = ranks in all, docs/parallel.md)."""
    pipeline_batches: int = 0
    """Batches of different steps a pipeline-parallel group (--pipeline-parallel-size P > 1) keeps in flight, each of other sequences, so that stage 0 computes step n+1's batch while the later stages compute step n's (vLLM's virtual engines; docs/parallel.md); 0 = auto: P (1 with --speculative, whose drafts run one step at a time); 1 = one step at a time, split into P micro-batches that drain the pipeline at its end."""
    pipeline_trace: str = ""
    """Folder where each pipeline stage appends when it starts and ends each micro-batch (JSON lines per rank; tests and profiling, docs/parallel.md); "" = off."""
    nnodes: int = 1
    """Hosts the tensor-parallel group spans (each runs `tandem worker` with the same options and its --node-rank; --tensor-parallel-size / --nnodes ranks per host)."""
    node_rank: int = 0
    """This host's index in the group: 0 runs rank 0 and serves gRPC; the others run headless."""
    master_addr: str = "127.0.0.1"
    """Address of node 0 that every rank meets at (--nnodes > 1)."""
    master_port: int = 0
    """Port on --master-addr for the group's rendezvous (required with --nnodes > 1; 0 = a free port on one host)."""
    distributed_executor_backend: Literal["mp", "ray"] = "mp"
    """How the group's other ranks start: mp = child processes of this one (or --nnodes hosts); ray = Ray actors on a Ray cluster (--ray-address, else a local one), placed one per GPU (docs/parallel.md)."""
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    """The library of the model's collectives in a group: auto = NCCL on CUDA, gloo on the CPU; gloo on CUDA runs them through host memory (slow: for agreement runs, where the ranks may share GPUs: rank r uses cuda:(r mod GPUs), which NCCL refuses; no CUDA graphs). The control plane is gloo either way."""
    ray_address: str = ""
    """--distributed-executor-backend ray: the Ray cluster to join (as `ray.init(address=...)`: host:port of its head, or "auto"); "" = start a local one."""
    distributed_timeout: float = 300.0
    """Seconds a tensor-parallel collective may wait for the other ranks before the group gives up and exits (a dead or stuck rank never hangs the worker); with --distributed-executor-backend ray also how long to wait for the cluster's nodes and the placement."""
    kv_offload_memory: str = ""
    """Host memory for prefix blocks evicted from the device KV cache (pinned on CUDA), e.g. 4 (GiB) or 512MiB; they come back with one host-to-device copy on a prefix hit. Empty or 0: off. In a parallel group each rank holds this much for its own shard of the blocks."""
    kv_transport: Literal["auto", "cuda-ipc", "nixl", "grpc"] = "auto"
    """How KV moves between prefill and decode workers: auto = the fastest both ends support (CUDA IPC on one host, then NIXL on CUDA when the nixl package is installed, then gRPC); a named one is tried first, then gRPC (nixl on the CPU: UCX shared memory / TCP, for tests)."""
    kv_fetch_stall_timeout: float = 10.0
    """Decode role: seconds a KV fetch may go without progress before it is abandoned and the prompt computed here."""
    kv_events_buffer: int = 4096
    """Prefix-cache events (SubscribeKvEvents) kept for subscribers that reconnect; one further behind gets a snapshot."""
    speculative: Literal["off", "prompt-lookup", "draft-model", "eagle"] = "off"
    """Speculative decoding (docs/speculative.md): prompt-lookup proposes the tokens that followed the latest earlier occurrence of the output's last n-gram in the prompt and output; draft-model runs --speculative-model in this worker; eagle runs the EAGLE / EAGLE-3 head --speculative-model on the target's hidden states. Verification keeps the output distribution exact (greedy output is token-identical)."""
    speculative_model: str = ""
    """Draft model directory (same tokenizer and vocabulary as --model; alone it implies --speculative draft-model), or with --speculative eagle an EAGLE / EAGLE-3 head trained for --model."""
    num_speculative_tokens: int = 4
    """Most tokens proposed per sequence and step (K); with --speculative-adaptive the step's K is chosen in 0..K."""
    prompt_lookup_min: int = 2
    """Shortest n-gram prompt lookup matches."""
    prompt_lookup_max: int = 4
    """Longest n-gram prompt lookup matches (tried first)."""
    speculative_adaptive: bool = True
    """Choose each step's K by a cost model of the verification (docs/speculative.md); off: always --num-speculative-tokens."""
    speculative_token_cost: float = 0.0
    """Adaptive K: cost of one more token in a forward relative to a step's fixed cost; 0 = auto (1/256 on CUDA, 1/64 on CPU)."""
    speculative_cuda_graphs: bool = True
    """CUDA graphs for the verification forward (K + 1 rows per sequence) and the draft model's / EAGLE head's forwards, as for decode steps; off (or --enforce-eager): they run eagerly."""
    lora_modules: tuple[str, ...] = ()
    """LoRA adapters to serve from the start, as NAME=DIR (a PEFT adapter directory: adapter_config.json + adapter_model.safetensors); a request selects one by its name (docs/lora.md). More can be loaded at run time (LoadLoRA)."""
    max_loras: int = 0
    """Adapters one step can apply at once (device slots, least recently used evicted to host memory); 0 = 4 when --lora-modules is given or --enable-lora is set, else LoRA is off."""
    max_lora_rank: int = 16
    """Largest adapter rank served (each slot is allocated for it)."""
    enable_lora: bool = False
    """Serve LoRA adapters even when none is given at start (they are loaded at run time)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("--model is required (a Hugging Face model directory)")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a positive power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not 0.0 < self.cpu_kv_cache_fraction <= 1.0:
            raise ValueError(f"--cpu-kv-cache-fraction must be in (0, 1], got {self.cpu_kv_cache_fraction}")
        if self.prefill_graph_max_tokens < 0:
            raise ValueError(f"--prefill-graph-max-tokens must be >= 0, got {self.prefill_graph_max_tokens}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(f"--max-num-batched-tokens must be > 0, got {self.max_num_batched_tokens}")
        if self.encoder_cache_size < 0:
            raise ValueError(f"--encoder-cache-size must be >= 0, got {self.encoder_cache_size}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"--max-num-seqs must be > 0, got {self.max_num_seqs}")
        if self.cpu_threads < 0:
            raise ValueError(f"--cpu-threads must be >= 0, got {self.cpu_threads}")
        if self.max_model_len < 0:
            raise ValueError(f"--max-model-len must be >= 0, got {self.max_model_len}")
        if self.quantization_group_size < 0 or (
            self.quantization_group_size and self.quantization not in ("int8", "int4")
        ):
            raise ValueError(
                f"--quantization-group-size must be >= 0 and is for --quantization int8 / int4, got {self.quantization_group_size}"
            )
        if self.kv_cache_memory:
            parse_size(self.kv_cache_memory)
        if self.kv_handle_ttl <= 0:
            raise ValueError(f"--kv-handle-ttl must be > 0, got {self.kv_handle_ttl}")
        if self.max_pending_requests < 0:
            raise ValueError(f"--max-pending-requests must be >= 0, got {self.max_pending_requests}")
        if self.kv_chunk_bytes <= 0:
            raise ValueError(f"--kv-chunk-bytes must be > 0, got {self.kv_chunk_bytes}")
        if not -1 <= self.kv_wire_helpers <= 7:
            raise ValueError(f"--kv-wire-helpers must be in [0, 7] or -1 (auto), got {self.kv_wire_helpers}")
        if not 0 <= self.kv_fetch_streams <= 8:
            raise ValueError(f"--kv-fetch-streams must be in [0, 8] (0 = auto), got {self.kv_fetch_streams}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"--pipeline-parallel-size must be >= 1, got {self.pipeline_parallel_size}")
        if self.pipeline_batches < 0:
            raise ValueError(f"--pipeline-batches must be >= 0, got {self.pipeline_batches}")
        if self.pipeline_batches > 1 and self.speculative_method != "off":
            raise ValueError(
                f"--pipeline-batches {self.pipeline_batches} with --speculative: a drafted step runs one at a time (use 1)"
            )
        if self.task == "embed" and self.role != "unified":
            raise ValueError(
                f"--task embed with --role {self.role}: embeddings are computed in one worker (no disaggregation)"
            )
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"--node-rank must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes}), got {self.node_rank}"
            )
        if self.world_size % self.nnodes:
            raise ValueError(
                f"the group's {self.world_size} ranks (--tensor-parallel-size x --pipeline-parallel-size) "
                f"must be a multiple of --nnodes {self.nnodes}"
            )
        if self.nnodes > 1 and not 0 < self.master_port < 65536:
            raise ValueError(f"--nnodes {self.nnodes} needs --master-port (node 0's rendezvous port)")
        if self.distributed_executor_backend == "ray" and self.nnodes > 1:
            raise ValueError(
                "--distributed-executor-backend ray with --nnodes: Ray places the ranks on its nodes itself; drop --nnodes"
            )
        if self.ray_address and self.distributed_executor_backend != "ray":
            raise ValueError("--ray-address is for --distributed-executor-backend ray")
        if self.distributed_timeout <= 0:
            raise ValueError(f"--distributed-timeout must be > 0, got {self.distributed_timeout}")
        if self.distributed_backend == "nccl" and self.device == "cpu":
            raise ValueError("--distributed-backend nccl needs --device cuda (the CPU runs gloo)")
        if self.kv_offload_memory:
            self.kv_offload_bytes  # noqa: B018 - validates
        if self.kv_fetch_stall_timeout <= 0:
            raise ValueError(f"--kv-fetch-stall-timeout must be > 0, got {self.kv_fetch_stall_timeout}")
        if self.kv_events_buffer <= 0:
            raise ValueError(f"--kv-events-buffer must be > 0, got {self.kv_events_buffer}")
        self._check_speculative()
        if self.max_loras < 0 or self.max_lora_rank <= 0:
            raise ValueError(
                f"--max-loras must be >= 0 and --max-lora-rank > 0, got {self.max_loras} and {self.max_lora_rank}"
            )
        for spec in self.lora_modules:
            name, sep, path = spec.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"--lora-modules: expected NAME=DIR, got {spec!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def _check_speculative(self) -> None:
        method = self.speculative_method
        if method == "off":
            return
        if method == "eagle" and not self.speculative_model:
            raise ValueError(
                "--speculative eagle needs --speculative-model HEAD_DIR (an EAGLE / EAGLE-3 checkpoint)"
            )
        if method == "draft-model" and not self.speculative_model:
            raise ValueError("--speculative draft-model needs --speculative-model DIR")
        if method == "prompt-lookup" and self.speculative_model:
            raise ValueError("--speculative prompt-lookup takes no --speculative-model")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"--num-speculative-tokens must be in 1..16, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                f"--prompt-lookup-min ({self.prompt_lookup_min}) must be >= 1 and <= --prompt-lookup-max ({self.prompt_lookup_max})"
            )
        if self.speculative_token_cost < 0:
            raise ValueError(f"--speculative-token-cost must be >= 0, got {self.speculative_token_cost}")
        if self.task == "embed":
            raise ValueError("--speculative with --task embed: an embedding worker generates no tokens")

    @property
    def speculative_method(self) -> str:
        """--speculative, with --speculative-model alone meaning draft-model."""
        if self.speculative == "off" and self.speculative_model:
            return "draft-model"
        return self.speculative

    @property
    def lora_slots(self) -> int:
        """Device slots for LoRA adapters; 0 = LoRA off."""
        if self.max_loras:
            return self.max_loras
        return 4 if self.lora_modules or self.enable_lora else 0

    @property
    def lora_adapters(self) -> list[tuple[str, str]]:
        """--lora-modules as (name, directory) pairs."""
        return [(n.strip(), p.strip()) for n, _, p in (s.partition("=") for s in self.lora_modules)]

    @property
    def world_size(self) -> int:
        """Ranks in this worker's group."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def batches_in_flight(self) -> int:
        """--pipeline-batches resolved: how many batches of different steps every rank of the
        group keeps in the pipeline at once (1: one step at a time, and always with P = 1)."""
        if self.pipeline_parallel_size == 1:
            return 1
        if self.pipeline_batches:
            return self.pipeline_batches
        return 1 if self.speculative_method != "off" else self.pipeline_parallel_size

    @property
    def kv_offload_bytes(self) -> int:
        """--kv-offload-memory in bytes: a plain number is GiB."""
        text = self.kv_offload_memory.strip()
        if not text:
            return 0
        try:
            return int(float(text) * 2**30)
        except ValueError:
            pass
        try:
            return parse_size(text)
        except ValueError:
            raise ValueError(
                f"--kv-offload-memory: invalid size {text!r} (e.g. 4 for 4 GiB, or 512MiB)"
            ) from None

    @property
    def kv_cache_bytes(self) -> int | None:
        return parse_size(self.kv_cache_memory) if self.kv_cache_memory else None
