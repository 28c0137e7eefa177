"""A follower rank's loop (ranks 1..T x P - 1): load this rank's slice of the model, then run
rank 0's broadcast commands until the group goes down.

Its own module so that both launchers, local processes (tp_launch.py) and Ray actors
(ray_executor.py), run it without importing each other.
"""

from __future__ import annotations

import collections

import torch

from kernels import get_ops
from services.worker import kv_reshard, parallel
from services.worker.config import WorkerConfig
from services.worker.engine import resolve_device, resolve_dtype, resolve_kv_dtype, resolve_max_model_len
from services.worker.kv_cache import KVCache
from services.worker.kv_offload import HostKVBuffer
from services.worker.kv_reshard import ReadKV, WriteKV
from services.worker.layers.attention import AttentionMetadata
from services.worker.lora.adapter import LoRAAdapter, LoRAAdapterError, load_adapter
from services.worker.model_config import load_model_config
from services.worker.model_runner import ModelRunner
from services.worker.pipeline import StageForward
from services.worker.tp_group import (
    BindKV,
    CaptureGraphs,
    CopyBlocks,
    Embed,
    Forward,
    HostKVCopies,
    LoadLoRA,
    Logits,
    Profile,
)


def replay_graph(runner: ModelRunner, cmd: Forward) -> None:
    """Replay this rank's decode graph of rank 0's size on the step's inputs."""
    graphs = runner.graphs
    num_seqs = cmd.positions.shape[0]
    if graphs is None or graphs.padded_size(num_seqs) != cmd.graph_size:
        # (replaying another size would leave the ranks' collectives unmatched: a hang)
        raise RuntimeError(
            f"rank 0 replays its decode graph of {cmd.graph_size} rows; this rank's ladder "
            f"{None if graphs is None else graphs.batch_sizes} does not match"
        )
    graphs.run(
        cmd.input_ids.tolist(),
        cmd.positions.tolist(),
        cmd.slot_mapping.tolist(),
        cmd.seq_lens.tolist(),
        cmd.block_tables.to(torch.int32),
    )


def follow(config: WorkerConfig) -> int:
    """Ranks 1..T-1: load this rank's slice of the model, then run rank 0's commands forever."""
    cfg = load_model_config(config.model)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    max_model_len = resolve_max_model_len(cfg, config.max_model_len)
    runner = ModelRunner(
        cfg,
        get_ops(config.attention_backend, device),
        device,
        dtype,
        max_model_len,
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
        pipeline_batches=config.batches_in_flight,
    )
    model = runner.model
    kv: KVCache | None = None
    host: HostKVBuffer | None = None  # this rank's shard of the host KV tier (--kv-offload-memory)
    # this rank's shards of the adapters rank 0 holds, by lora_id (tp_group.py LoadLoRA)
    adapters: dict[int, LoRAAdapter] = {}
    state = parallel.current()
    ranks = kv_reshard.rank_kv(cfg, state.tp_size, state.pp_size)
    batches = config.batches_in_flight
    parallel.queue_commands(batches > 1)  # as rank 0 does (Engine)
    in_flight: collections.deque[StageForward] = collections.deque()  # started, not finished
    with torch.inference_mode():
        while True:
            cmd = parallel.broadcast_object()
            if isinstance(cmd, Forward):
                for lora_id in cmd.released_loras:
                    adapters.pop(lora_id, None)
                if cmd.lora is not None:
                    assert runner.lora is not None
                    runner.lora.apply(cmd.lora, adapters)
                for copy in cmd.host_kv:  # rank 0's host tier copies, before the forward reads them
                    assert host is not None
                    host.copy(copy)
                if cmd.graph_size:  # rank 0 replays its decode graph of this size: so does this rank
                    replay_graph(runner, cmd)
                    continue
                meta = AttentionMetadata(
                    positions=cmd.positions.to(device),
                    slot_mapping=cmd.slot_mapping.to(device),
                    block_tables=cmd.block_tables.to(device),
                    cu_seqlens_q=cmd.cu_seqlens_q.to(device),
                    seq_lens=cmd.seq_lens.to(device),
                    max_seqlen_q=cmd.max_seqlen_q,
                    cos_sin_cache=runner.cos_sin_cache,
                    num_decode_rows=cmd.num_decode_rows,
                )
                if batches == 1:
                    model(cmd.input_ids.to(device), meta)
                    continue
                # Batches of different steps in flight (pipeline.py): this stage's layers now; a
                # batch is finished (its sends waited for; stage 0: received back and normed) once
                # rank 0 started as many batches after it, by when rank 0 has finished it.
                while len(in_flight) >= batches:
                    in_flight.popleft().finish()
                in_flight.append(model.model.start_stage(cmd.input_ids.to(device), meta))
            elif isinstance(cmd, Logits):
                if parallel.current().pp_rank == 0:  # stage 0 holds the LM head
                    model.compute_logits(cmd.hidden.to(device))
            elif isinstance(cmd, Embed):  # (stage 0's embedding; its all-reduce is that stage's)
                if parallel.current().pp_rank == 0:
                    model.model.embed_tokens(cmd.input_ids.to(device))
            elif isinstance(cmd, CopyBlocks):
                assert kv is not None
                kv.copy_blocks(cmd.copies)
            elif isinstance(cmd, HostKVCopies):
                assert host is not None
                for copy in cmd.copies:
                    host.copy(copy)
            elif isinstance(cmd, BindKV):
                kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, dtype)
                kv = KVCache(cfg, cmd.num_blocks, config.block_size, kv_dtype, device)
                runner.bind_kv_cache(kv)
                if cmd.host_blocks > 0:
                    host = HostKVBuffer(kv.tensor, cmd.host_blocks)
            elif isinstance(cmd, ReadKV | WriteKV):  # disaggregation: this rank's heads
                assert kv is not None
                kv_reshard.serve(kv.tensor, ranks, cmd)
            elif isinstance(cmd, CaptureGraphs):  # the same ladder as rank 0, in the same order
                runner.capture_cuda_graphs(cmd.max_num_seqs, cmd.max_model_len)
            elif isinstance(cmd, Profile):
                runner.profile_peak_bytes(cmd.num_tokens, cmd.num_seqs)
            elif isinstance(cmd, LoadLoRA):
                assert runner.lora is not None
                loaded: LoRAAdapter | None = None
                error: str | None = None
                try:
                    loaded = load_adapter(
                        cmd.name, cmd.path, runner.lora.shapes, config.max_lora_rank, cmd.lora_id
                    )
                except LoRAAdapterError as exc:
                    error = str(exc)
                except Exception as exc:  # (rank 0 waits for this rank's answer: always give one)
                    error = f"adapter {cmd.name!r}: {exc}"
                # one rank's failure fails the load on every rank
                if not any(parallel.all_gather_object(error)) and loaded is not None:
                    adapters[cmd.lora_id] = loaded
