"""Turns a SchedulerOutput into one forward pass and sampled tokens.

Flat inputs (all sequences' new tokens back to back, prefill chunks and decodes alike):
input_ids / positions / slot_mapping [T], block_tables [B, max_blocks], cu_seqlens_q [B+1],
seq_lens [B]. Logits are computed only for the last token of sequences that sample; a sequence
whose prompt forks into n choices contributes that row n times, one per choice.

The model's device math goes through the KernelOps bundle given at construction: the PyTorch
reference on CPU, Triton kernels on CUDA (`--attention-backend`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import KernelOps
from services.common import switches
from services.worker import parallel, prefill_graph
from services.worker.async_step import StepHandle, TokenReadback
from services.worker.beam_select import BeamSelection, BeamStepResult, unpack
from services.worker.beam_step import BeamStep
from services.worker.cuda_graph import NO_VARIANTS, CudaGraphRunner, DecodeOutputs, GraphVariants
from services.worker.guided import apply_token_mask, guided_rows
from services.worker.host_staging import block_slots, host_tensor, padded_rows, stage
from services.worker.kernel_tuning import tune_kernels
from services.worker.kv_cache import KVCache
from services.worker.kv_layerwise import LayerSignal
from services.worker.layers.attention import AttentionMetadata
from services.worker.loader import build_model
from services.worker.lora.pool import LoRAPool
from services.worker.mm_inputs import EncoderCache, ImageInput
from services.worker.model_config import ModelConfig
from services.worker.models import IMAGE_MODELS
from services.worker.models.llama import LlamaModel
from services.worker.models.llava import ImageEmbeddingRows
from services.worker.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from services.worker.mrope import image_positions, rope_images, text_positions
from services.worker.pipeline import StageTrace
from services.worker.prefill_graph import PrefillGraphs
from services.worker.request import Sequence, TokenLogprob
from services.worker.sampler import (
    Sampler,
    SamplingMetadata,
    logprob_table,
    token_logprobs,
    unpack_logprobs,
)
from services.worker.sampling_rng import draw_table
from services.worker.scheduler import SampledToken, SchedulerOutput
from services.worker.speculative.verify import verify_step
from services.worker.speculative.verify_graph import VerifyGraphRunner, verify_graph_sizes

log = logging.getLogger(__name__)

# Decode graphs of up to this many rows also run the LM head and a greedy argmax, so an all-greedy
# small-batch step replays one graph and reads back only the token ids. Their logits stay alive
# as graph outputs ([rows, vocab] in the model dtype, 1 + 2 + 4 + 8 rows: ~4.6 MB for a 152k vocab).
GRAPH_LOGITS_MAX_ROWS = 8


@dataclass(frozen=True)
class _StepInputs:
    """One step's flat host inputs (module docstring) and the rows its sampling reads."""

    ids: list[int] | torch.Tensor  # [T] host ids, or [T] int64 on the device (a continuation)
    positions: list[int]
    slots: list[int]
    block_tables: torch.Tensor  # [B, max_blocks] int32 on the host (on the device with beams ahead)
    cu_seqlens: list[int]
    seq_lens: list[int]
    max_seqlen_q: int
    max_blocks: int
    logits_rows: list[int]  # the rows whose logits are sampled
    rows: list[tuple[Sequence, int]]  # per sampled row: the sequence whose params apply, its entry
    pooled: list[tuple[int, int]]  # pooling entries that reach their last prompt token, and its row
    mm: ImageEmbeddingRows | None  # image embedding rows of the step's prompt chunks
    drafted: bool  # speculative decoding: some entry carries drafts
    ahead: list[int]  # beam entries launched ahead of reading the step before (their tables on the device)


def leading_single_tokens(cu_seqlens: list[int]) -> int:
    """How many sequences at the front of the batch have one new token each (decodes: the scheduler
    puts running sequences first)."""
    k = 0
    while k + 1 < len(cu_seqlens) and cu_seqlens[k + 1] - cu_seqlens[k] == 1:
        k += 1
    return k


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        ops: KernelOps,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        block_size: int,
        load_format: str = "auto",
        seed: int = 0,
        quantization: str = "none",
        quantization_group_size: int = 0,
        max_loras: int = 0,
        max_lora_rank: int = 16,
        max_num_tokens: int = 0,
        pooling: bool = False,
        pipeline_trace: str = "",
        encoder_cache_size: int = 64,
        pipeline_batches: int = 1,
        tune_decode_attention: bool = False,
    ) -> None:
        self.cfg = cfg
        self.ops = ops
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        # (with LoRA too: the pool folds the norms' weights into the adapters' A, lora/pool.py)
        self.model = build_model(
            cfg,
            ops,
            device,
            dtype,
            load_format,
            seed,
            quantization,
            quantization_group_size,
            pooling=pooling,
        )
        # Multi-LoRA: the device slots of adapter weights, and each step's rows -> slots (lora/pool.py)
        self.lora: LoRAPool | None = None
        if max_loras:
            self.lora = LoRAPool(
                self.model,
                ops,
                max_loras,
                max_lora_rank,
                max(max_num_tokens, 1),
                dtype,
                device,
                cfg.hidden_size,
            )
        if isinstance(getattr(self.model, "model", None), LlamaModel):
            # batches of different steps in flight in a pipeline-parallel group (pipeline.py)
            self.model.model.pipeline_batches = pipeline_batches
        if pipeline_trace and isinstance(getattr(self.model, "model", None), LlamaModel):
            state = parallel.current()
            self.model.model.trace = StageTrace(pipeline_trace, state.rank, state.pp_rank)
        self.encoder_cache = EncoderCache(encoder_cache_size)  # image embeddings by hash (multimodal models)
        # M-RoPE (Qwen2.5-VL): the vision tower's merge size, which lays out images' positions
        self.mrope_merge = (
            self.model.spatial_merge_size if isinstance(self.model, Qwen2_5_VLForConditionalGeneration) else 0
        )
        rope_len = max(max_model_len, 1)
        self.cos_sin_cache = self.model.build_rope_cache(rope_len, dtype, device)
        # CUDA: time cuBLAS against the kernel bundle's skinny GEMM for each decode-sized projection
        # (kernels/triton/skinny_gemm.py), and `_scaled_mm` against the Triton FP8 GEMM for each
        # W8A8 projection (kernels/triton/fp8_gemm.py), before anything else takes the memory.
        self.linear_report: list[str] = (
            tune_kernels(
                self.model,
                self.ops,
                device,
                dtype,
                GRAPH_LOGITS_MAX_ROWS,
                decode_attention=tune_decode_attention,
            )
            if device.type == "cuda"
            else []
        )
        self.sampler = Sampler(ops.exponential_race)
        # beam search's device work around each step
        on_cuda = device.type == "cuda"
        self.beams = BeamStep(
            device,
            block_size,
            ops.row_topk if on_cuda else None,
            ops.beam_candidates if on_cuda else None,
            ops.beam_ahead if on_cuda else None,
            ops.beam_topk_candidates if on_cuda and switches.BEAM_ONE_LAUNCH.value else None,
        )
        self.kv_cache: KVCache | None = None
        self.graphs: CudaGraphRunner | None = None  # decode-step CUDA graphs (capture_cuda_graphs)
        # speculative decoding: graphs of the verification forward (K + 1 rows per sequence), or of
        # a draft model's catch-up forward (speculative/verify_graph.py)
        self.verify_graphs: VerifyGraphRunner | None = None
        # steps that carry prompt tokens: piecewise graphs, attention eager (capture_prefill_graphs)
        self.prefill_graphs: PrefillGraphs | None = None
        self.prefill_graphs_off = "not captured"  # why they are off ("" when on)
        self._greedy_columns: dict[int, _ColumnRows] = {}  # placeholders for all-greedy steps, by S
        self._readback: TokenReadback | None = None  # CUDA: pinned buffers the sampled ids come back through
        # EAGLE heads (speculative/eagle.py): called after each forward with the step, the rows the
        # head reads (the final hidden states, or the residual streams of LlamaModel.aux_layers)
        # and cu_seqlens, before anything else may overwrite them
        self.feature_sink: Callable[[SchedulerOutput, torch.Tensor, list[int]], None] | None = None

    def _decode_forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> DecodeOutputs:
        """What a decode graph computes: hidden states, and for small batches the LM head + argmax
        (and an EAGLE-3 head's residual streams, when one reads them)."""
        hidden = self.model(input_ids, meta)
        aux = self.model.model.aux_hidden if self.model.model.aux_layers else None
        if input_ids.shape[0] > GRAPH_LOGITS_MAX_ROWS:
            return DecodeOutputs(hidden, None, None, aux)
        logits = self.model.lm_head(hidden)  # [B, vocab] in the model dtype (compute_logits casts)
        if self.model.layout.tp_size > 1:
            # A group's vocabulary-parallel LM head: every rank's slice, gathered inside the graph
            # (every rank's graph runs the same gather), the last rank's padding rows dropped.
            logits = parallel.all_gather_last_dim(logits)[:, : self.cfg.vocab_size]
        greedy = self.ops.argmax(logits) if self.ops.argmax is not None else logits.argmax(dim=-1)
        return DecodeOutputs(hidden, logits, greedy, aux)

    def _verify_forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> DecodeOutputs:
        """What a verification graph computes: hidden states (and an EAGLE-3 head's residual
        streams); the logits of the rows verification samples are computed outside."""
        hidden = self.model(input_ids, meta)
        return DecodeOutputs(
            hidden, None, None, self.model.model.aux_hidden if self.model.model.aux_layers else None
        )

    def bind_kv_cache(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        for i, attn in enumerate(self.model.attention_layers()):
            attn.kv_cache = kv_cache.layer(i)

    def bind_layer_signal(self, signal: LayerSignal) -> None:
        """Layer-wise push: every attention layer tells `signal` when its KV is written."""
        for i, attn in enumerate(self.model.attention_layers()):
            attn.layer_signal = signal
            attn.layer_index = i

    def capture_cuda_graphs(
        self, max_num_seqs: int, max_model_len: int, speculative_tokens: int = 0, max_num_tokens: int = 0
    ) -> bool:
        """Capture decode-step graphs for batch sizes up to max_num_seqs, and with
        `speculative_tokens` K > 0 the graphs of forwards of up to K + 1 rows per sequence
        (verification, a draft's catch-up: speculative/verify_graph.py) of at most
        `max_num_tokens` rows; False when these kernels cannot be captured (the reference
        attention synchronises with the host)."""
        if self.device.type != "cuda" or not self.ops.graph_capturable(self.cfg.head_dim):
            log.info(
                "CUDA graphs off: kernels %r cannot be captured for head_dim %d",
                self.ops.name,
                self.cfg.head_dim,
            )
            return False
        assert self.kv_cache is not None, "bind the KV cache before capturing"
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = CudaGraphRunner(
            self._decode_forward,
            self.cos_sin_cache,
            max_num_seqs,
            max_blocks,
            self.device,
            variants=self._graph_variants(),
        )
        self.graphs.capture()
        sizes = verify_graph_sizes(max_num_seqs, speculative_tokens, max_num_tokens)
        if sizes:
            self.verify_graphs = VerifyGraphRunner(
                self._verify_forward,
                self.cos_sin_cache,
                sizes,
                max_blocks,
                self.device,
                variants=self._graph_variants(),
            )
            self.verify_graphs.capture()
        return True

    def capture_prefill_graphs(self, max_tokens: int) -> str:
        """Capture the piecewise graphs of prompt-carrying steps of up to `max_tokens` tokens
        (prefill_graph.py); "" when captured, else why not (they then run eagerly)."""
        if self.device.type != "cuda" or not self.ops.graph_capturable(self.cfg.head_dim):
            return f"kernels {self.ops.name!r} cannot be captured for head_dim {self.cfg.head_dim}"
        if self.lora is not None:
            return "adapters (LoRA) are on"
        if self.model.driver is not None:
            return "a parallel group's forwards are driven step by step"
        if self.model.model.aux_layers:
            return "an EAGLE head reads hidden states of inner layers"
        if max_tokens <= prefill_graph.MIN_TOKENS:
            return f"--prefill-graph-max-tokens {max_tokens} <= {prefill_graph.MIN_TOKENS}"
        assert self.kv_cache is not None, "bind the KV cache before capturing"
        graphs = PrefillGraphs(
            self.model,
            self.ops.paged_attention,
            self.cos_sin_cache,
            max_tokens,
            self.cfg.hidden_size,
            self.dtype,
            self.device,
        )
        try:
            graphs.capture()
        except RuntimeError as exc:  # (a forward that synchronises with the host, an unsupported op)
            torch.cuda.synchronize(self.device)
            return f"its forward could not be captured ({exc})"
        self.prefill_graphs = graphs
        return ""

    def _graph_variants(self) -> GraphVariants:
        """With LoRA on, decode (and verification) graphs without the LoRA kernels ("base":
        replayed by the steps of base rows only, which then cost what they cost on a worker without
        LoRA) and with them ("lora": any mix of adapters, read from the pool's persistent mapping)."""
        if self.lora is None:
            return NO_VARIANTS
        mapping = self.lora.mapping
        return GraphVariants(
            ("base", "lora"),
            lambda name: mapping.launching(name == "lora"),
            lambda: "lora" if mapping.active else "base",
        )

    def _lora_launching(self, active: bool) -> contextlib.AbstractContextManager[None]:
        return self.lora.mapping.launching(active) if self.lora is not None else contextlib.nullcontext()

    def small_query_graphs(
        self, num_seqs: int, max_seqlen_q: int, max_blocks: int
    ) -> VerifyGraphRunner | None:
        """The verification graphs when a forward of this shape can replay one (None: eager)."""
        graphs = self.verify_graphs
        if graphs is not None and graphs.can_run(num_seqs, max_seqlen_q, max_blocks):
            return graphs
        return None

    @torch.inference_mode()
    def profile_peak_bytes(self, num_tokens: int, num_seqs: int) -> int:
        """CUDA: peak memory of a forward over `num_tokens` prompt tokens plus `num_seqs` logits rows,
        with the weights loaded, measured on a throwaway KV cache just big enough for it."""
        bs = self.block_size
        num_tokens = max(1, min(num_tokens, self.cos_sin_cache.shape[0]))
        num_blocks = -(-num_tokens // bs)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        scratch = KVCache(self.cfg, num_blocks, bs, self.dtype, self.device)
        for i, attn in enumerate(self.model.attention_layers()):
            attn.kv_cache = scratch.layer(i)
        dev = self.device
        positions = torch.arange(num_tokens, device=dev)
        meta = AttentionMetadata(
            positions=positions,
            slot_mapping=positions.clone(),
            block_tables=torch.arange(num_blocks, dtype=torch.int32, device=dev)[None, :],
            cu_seqlens_q=torch.tensor([0, num_tokens], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=dev),
            max_seqlen_q=num_tokens,
            cos_sin_cache=self.cos_sin_cache,
        )
        with self._lora_launching(True):  # (their buffers count: a step with adapters runs them)
            hidden = self.model(torch.zeros(num_tokens, dtype=torch.int64, device=dev), meta)
        if self.model.layout.first_stage:  # (the later pipeline stages have no LM head)
            logits = self.model.compute_logits(hidden[-1:].expand(num_seqs, -1))
            torch.softmax(logits, dim=-1).sort(dim=-1)
            del logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del scratch, hidden, meta
        for attn in self.model.attention_layers():
            attn.kv_cache = None
        torch.cuda.empty_cache()
        return int(peak)

    def execute(self, out: SchedulerOutput) -> list[list[SampledToken]]:
        """One forward over the scheduled tokens; returns, per scheduled sequence, its sampled
        token then one per forked child (empty when the sequence did not reach its end)."""
        return self.launch(out).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, prev: StepHandle | None = None) -> StepHandle:
        """Enqueue one forward over the scheduled tokens and the sampling; `result()` on the handle
        reads the tokens. A continuation (`out.prev_rows`, async scheduling) takes its input ids
        from `prev`'s sampled tokens on the device, so nothing here waits for `prev` to finish."""
        step = self._step_inputs(out, prev)
        ids, positions, slots, block_tables = step.ids, step.positions, step.slots, step.block_tables
        num_seqs, max_seqlen_q, max_blocks = len(out.scheduled), step.max_seqlen_q, step.max_blocks
        decoded: DecodeOutputs | None = None
        verify = self.small_query_graphs(num_seqs, max_seqlen_q, max_blocks) if step.drafted else None
        if (
            step.mm is None
            and self.graphs is not None
            and self.graphs.can_run(num_seqs, max_seqlen_q, max_blocks)
        ):
            if self.model.driver is not None:  # the other ranks of a group replay the same size
                self.model.driver.forward_graph(
                    ids, positions, slots, step.seq_lens, block_tables, self.graphs.padded_size(num_seqs)
                )
            decoded = self.graphs.run(ids, positions, slots, step.seq_lens, block_tables)
            hidden = decoded.hidden
        elif (
            step.mm is None and verify is not None and isinstance(ids, list)
        ):  # (drafted steps are synchronous)
            decoded = verify.run(ids, positions, slots, step.cu_seqlens, step.seq_lens, block_tables)
            hidden = decoded.hidden
        elif (
            step.mm is None
            and not step.drafted
            and self.prefill_graphs is not None
            and self.prefill_graphs.can_run(len(positions))
        ):
            graphs = self.prefill_graphs
            meta = self._attention_meta(
                graphs.positions, graphs.slots, block_tables, step.cu_seqlens, step.seq_lens, max_seqlen_q
            )
            hidden = graphs.run(ids, positions, slots, meta)
        else:
            hidden = self._forward_eager(
                ids, positions, slots, block_tables, step.cu_seqlens, step.seq_lens, max_seqlen_q, step.mm
            )
        return self._sample_step(out, step, hidden, decoded, prev)

    @torch.inference_mode()
    def launch_in_flight(self, out: SchedulerOutput) -> Callable[[], StepHandle]:
        """A pipeline-parallel group with batches in flight (--pipeline-batches, pipeline.py): the
        other ranks are sent the batch and stage 0 runs its layers over it now; the returned
        function, called once later batches have started, receives the batch back from the last
        stage and runs the LM head and the sampling, as `launch` does (eager: P > 1 has no graphs)."""
        step = self._step_inputs(out, None)
        assert step.mm is None and not step.drafted, "image rows and drafts are not pipelined"
        input_ids, meta = self._eager_inputs(
            step.ids,
            step.positions,
            step.slots,
            step.block_tables,
            step.cu_seqlens,
            step.seq_lens,
            step.max_seqlen_q,
        )
        started = self.model.start_forward(input_ids, meta)

        def finish() -> StepHandle:
            with torch.inference_mode():
                return self._sample_step(out, step, started.finish(), None, None)

        return finish

    def _step_inputs(self, out: SchedulerOutput, prev: StepHandle | None) -> _StepInputs:
        """The step's flat host inputs and rows (pending block copies made first; LoRA's mapping
        prepared and staged for the group)."""
        assert self.kv_cache is not None
        self.kv_cache.copy_blocks(out.block_copies)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        rows: list[tuple[Sequence, int]] = []  # (sequence whose params apply, index of its scheduled entry)
        # pooling requests that reach their last prompt token: (scheduled entry, row of that token)
        pooled: list[tuple[int, int]] = []
        max_blocks = max(len(item.seq.block_ids) for item in out.scheduled)
        # beam search launched ahead: these entries' tables are gathered on the device (BeamStep.ahead)
        ahead = [i for i, item in enumerate(out.scheduled) if item.beam_tail >= 0]
        if ahead:
            max_blocks = max(max_blocks, *(out.scheduled[i].start // bs + 1 for i in ahead))
        # One tensor of padded rows (a torch call per sequence adds up at large batches). When
        # every entry is a beam launched ahead, all tables are gathered on the device: none here.
        all_ahead = len(ahead) == len(out.scheduled)
        block_tables = (
            torch.empty(0, dtype=torch.int32)
            if all_ahead
            else padded_rows([item.seq.block_ids for item in out.scheduled], max_blocks)
        )
        for i, item in enumerate(out.scheduled):
            seq, start, end = item.seq, item.start, item.start + item.num_new_tokens
            if item.pending_tokens:  # its input id is the previous step's sampled token, on the device
                input_ids.append(0)
            else:
                input_ids += seq.token_ids[start:end]
                if item.draft is not None:  # speculative: the drafts follow its last token
                    input_ids += item.draft.token_ids
            images = seq.request.req.images
            if self.mrope_merge and images:  # rotary positions shifted by the images before them
                positions += text_positions(images, self.mrope_merge, start, end)
            else:
                positions += range(start, end)
            blocks = seq.block_ids
            if item.beam_tail >= 0:  # (its table is not known on the host yet: the block it writes)
                slots.append(item.beam_tail * bs + start % bs)
            else:
                slots += block_slots(blocks, bs, start, end)
            cu_seqlens.append(cu_seqlens[-1] + end - start)
            seq_lens.append(end)
            if item.sample and seq.request.req.pooling:
                pooled.append((i, cu_seqlens[-1] - 1))
            elif item.sample:
                for s in (seq, *item.children):
                    logits_rows.append(cu_seqlens[-1] - 1)
                    rows.append((s, i))
        ids: list[int] | torch.Tensor = input_ids
        if out.prev_rows is not None and any(row >= 0 for row in out.prev_rows):
            assert prev is not None and prev.token_ids is not None, "a continuation needs the previous step"
            ids = self._continuation_ids(prev.token_ids, out, input_ids, cu_seqlens)
        if ahead:
            assert prev is not None and prev.beam_selection is not None, (
                "a beam step ahead needs its selection"
            )
            beams = self.beams.ahead(
                out, ahead, prev.beam_selection, ids, cu_seqlens, max_blocks, self.kv_cache
            )
            ids = beams.ids
            if all_ahead:  # (the usual case)
                block_tables = beams.tables
            else:
                device_tables = block_tables.to(self.device, non_blocking=True)
                block_tables = device_tables.index_copy_(0, beams.entries, beams.tables)
        if self.lora is not None:  # each row's adapter slot, in the pool's persistent mapping
            step = self.lora.prepare(
                [(item.seq.request.req.lora, item.num_new_tokens) for item in out.scheduled]
            )
            if self.model.driver is not None:  # the other ranks of a group replay it with the forward
                self.model.driver.stage_lora(step)
        return _StepInputs(
            ids,
            positions,
            slots,
            block_tables,
            cu_seqlens,
            seq_lens,
            max(item.num_new_tokens for item in out.scheduled),
            max_blocks,
            logits_rows,
            rows,
            pooled,
            self._image_rows(out, cu_seqlens),  # None unless a prefill chunk covers image positions
            any(item.draft is not None for item in out.scheduled),
            ahead,
        )

    def _sample_step(
        self,
        out: SchedulerOutput,
        step: _StepInputs,
        hidden: torch.Tensor,
        decoded: DecodeOutputs | None,
        prev: StepHandle | None,
    ) -> StepHandle:
        """After the forward: the features an EAGLE head reads, prompt logprobs, pooling, and the
        sampling of the rows that sample (a handle whose tokens are read when asked)."""
        cu_seqlens, logits_rows, rows = step.cu_seqlens, step.logits_rows, step.rows
        if self.feature_sink is not None:
            features: torch.Tensor | None = hidden
            if self.model.model.aux_layers:
                features = decoded.aux if decoded is not None else self.model.model.aux_hidden
            assert features is not None
            self.feature_sink(out, features, cu_seqlens)
        self._prompt_logprobs(out, hidden, cu_seqlens)
        if step.pooled:
            self._pool(out, hidden, step.pooled)
        if step.drafted:  # speculative decoding
            return verify_step(
                out,
                hidden,
                cu_seqlens,
                self.model.compute_logits,
                self.sampler,
                lambda seqs, drafts: self._sampling_metadata(seqs, drafted=drafts),
            )
        if not rows:
            return StepHandle(len(out.scheduled), [], None, None)
        every_row = logits_rows == list(range(hidden.shape[0]))  # decode steps sample every row
        seqs = [s for s, _ in rows]
        meta = self._sampling_metadata(seqs, [out.scheduled[i].pending_tokens for _, i in rows])
        guided = guided_rows(seqs)  # None unless some row is guided: then the logits path, masked
        entries = [i for _, i in rows]
        if decoded is not None and decoded.logits is not None and every_row:
            if guided is None and self._plain_greedy(meta):  # the graph's argmax is the sampler's answer
                assert decoded.greedy is not None
                return self._handle(len(out.scheduled), entries, decoded.greedy, None, meta)
            logits = decoded.logits.float()
        else:
            if not every_row:
                # (a pinned, non-blocking index: `torch.tensor(..., device=)` would make the host
                # wait here for the whole forward, and with async scheduling for the step before)
                hidden = hidden.index_select(0, self._to_device(logits_rows))
            logits = self.model.compute_logits(hidden)
        if guided is not None:  # before the sampler: penalties, temperature and logprobs see the mask
            logits = apply_token_mask(logits.float(), guided)
        token_ids, raw_logprobs = self.sampler.sample_tensors(logits, meta)
        selection = None
        if raw_logprobs is not None:
            before = prev.beam_selection if step.ahead and prev is not None else None
            selection = self.beams.select(raw_logprobs, out, rows, step.block_tables, before)
        return self._handle(len(out.scheduled), entries, token_ids, raw_logprobs, meta, selection)

    def _pool(self, out: SchedulerOutput, hidden: torch.Tensor, pooled: list[tuple[int, int]]) -> None:
        """Last-token pooling: each pooling entry that computed its last prompt token gets that
        token's hidden state (after the final norm), L2-normalised in float32, on the device."""
        rows = hidden.index_select(0, self._to_device([row for _, row in pooled])).float()
        vectors = torch.nn.functional.normalize(rows, p=2.0, dim=-1)
        for k, (entry, _) in enumerate(pooled):
            out.scheduled[entry].embedding = vectors[k]

    def _continuation_ids(
        self,
        token_ids: torch.Tensor,  # [R] the previous step's sampled tokens, on the device
        out: SchedulerOutput,
        host_ids: list[int],  # [T] input ids, 0 where the token is the previous step's
        cu_seqlens: list[int],
    ) -> torch.Tensor:  # [T] int64 on the device
        """A continuation's input ids, without waiting for the step that samples some of them:
        entry i with prev_rows[i] >= 0 takes token_ids[prev_rows[i]] (one token), the rest the
        host's ids (prompt chunks)."""
        assert out.prev_rows is not None
        pending = [(cu_seqlens[i], row) for i, row in enumerate(out.prev_rows) if row >= 0]
        if len(pending) == len(host_ids):  # decodes only: the sampled tokens in the rows' order
            return self._gather_rows(token_ids, [row for _, row in pending])
        ids = self._to_device(host_ids)
        flat = self._to_device([t for t, _ in pending])
        return ids.index_copy_(0, flat, token_ids.index_select(0, self._to_device([r for _, r in pending])))

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """An int64 host list on the device without waiting for the device (host_staging.py)."""
        return stage(values, self.device)

    def _gather_rows(self, token_ids: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """token_ids[rows] on the device ([R] int64), without waiting for the step that fills them."""
        if rows == list(range(len(rows))):
            return token_ids[: len(rows)]
        return token_ids.index_select(0, self._to_device(rows))

    def _handle(
        self,
        num_scheduled: int,
        entries: list[int],  # [R] scheduled entry of each row
        token_ids: torch.Tensor,  # [R] int64 on the device
        raw_logprobs: torch.Tensor | None,  # [R, V] or None
        meta: SamplingMetadata,
        selection: BeamSelection | None = None,
    ) -> StepHandle:
        """A handle whose tokens are read back only when asked (CUDA: async copy + event)."""
        if self._readback is None and self.device.type == "cuda":
            self._readback = TokenReadback(self.device)
        # Beam selections first: their device->host copies (pinned, asynchronous) are then
        # complete when the ids' event is
        beams_host: list[torch.Tensor] = []
        if selection is not None:
            beams_host = [selection.table.to("cpu", non_blocking=True)]
            if selection.tops is not None:
                beams_host.append(selection.tops.to("cpu", non_blocking=True))
        read_ids = self._readback.start(token_ids) if self._readback is not None else token_ids.tolist

        # rows selected with their beam group report no logprobs of their own
        num_logprobs = meta.num_logprobs
        if selection is not None:
            grouped = {r for g in selection.groups for r in g.rows}
            num_logprobs = [None if r in grouped else k for r, k in enumerate(num_logprobs)]
        # (enqueued now, behind the sampler: read after the ids, it is ready by then)
        table = (
            logprob_table(raw_logprobs, token_ids, num_logprobs)
            if raw_logprobs is not None and any(k is not None for k in num_logprobs)
            else None
        )

        def read() -> tuple[list[int], list[TokenLogprob | None]]:
            ids = read_ids()  # the step's one synchronisation
            if table is None:
                return ids, [None] * len(ids)
            return ids, unpack_logprobs(table.tolist(), num_logprobs)

        def read_beams() -> dict[int, BeamStepResult]:
            assert selection is not None  # (after read(): the copies are done)
            tops = beams_host[1].tolist() if len(beams_host) > 1 else None
            picks = unpack(selection.groups, selection.per_beam, beams_host[0].tolist(), tops)
            return {g.rows[0]: pick for g, pick in zip(selection.groups, picks, strict=True)}

        handle = StepHandle(
            num_scheduled, entries, token_ids, read, read_beams if selection is not None else None
        )
        handle.beam_selection = selection
        return handle

    @staticmethod
    def _plain_greedy(meta: SamplingMetadata) -> bool:
        """All-greedy rows with no bans, biases, penalties or logprobs: the argmax is the sampler's
        answer."""
        return (
            meta.all_greedy
            and not meta.need_penalties
            and not any(meta.banned_ids)
            and not meta.has_logit_bias
            and all(k is None for k in meta.num_logprobs)
        )

    def _prompt_logprobs(self, out: SchedulerOutput, hidden: torch.Tensor, cu_seqlens: list[int]) -> None:
        """Fill `prompt_logprobs` of the scheduled entries that asked for some positions."""
        wanted = [(i, item) for i, item in enumerate(out.scheduled) if item.prompt_logprob_positions]
        if not wanted:
            return
        flat_rows: list[int] = []
        targets: list[int] = []
        ks: list[int | None] = []
        for i, item in wanted:
            assert item.prompt_logprob_positions is not None
            lo, hi = item.prompt_logprob_positions
            flat_rows += range(cu_seqlens[i] + lo - item.start, cu_seqlens[i] + hi - item.start)
            targets += item.seq.token_ids[lo + 1 : hi + 1]
            ks += [item.seq.request.sampling.prompt_logprobs] * (hi - lo)
        logits = self.model.compute_logits(hidden[torch.tensor(flat_rows, device=self.device)])
        raw = torch.log_softmax(logits, dim=-1)
        entries = token_logprobs(raw, torch.tensor(targets, device=self.device), ks)
        offset = 0
        for _, item in wanted:
            assert item.prompt_logprob_positions is not None
            lo, hi = item.prompt_logprob_positions
            item.prompt_logprobs = [e for e in entries[offset : offset + hi - lo] if e is not None]
            offset += hi - lo

    def _forward_eager(
        self,
        input_ids: list[int] | torch.Tensor,  # [T] host ids, or [T] int64 on the device
        positions: list[int],
        slots: list[int],
        block_tables: torch.Tensor,
        cu_seqlens: list[int],
        seq_lens: list[int],
        max_seqlen_q: int,
        mm: ImageEmbeddingRows | None = None,
    ) -> torch.Tensor:
        ids, meta = self._eager_inputs(
            input_ids, positions, slots, block_tables, cu_seqlens, seq_lens, max_seqlen_q
        )
        return self.model(ids, meta) if mm is None else self.model(ids, meta, mm)

    def _eager_inputs(
        self,
        input_ids: list[int] | torch.Tensor,
        positions: list[int],
        slots: list[int],
        block_tables: torch.Tensor,
        cu_seqlens: list[int],
        seq_lens: list[int],
        max_seqlen_q: int,
    ) -> tuple[torch.Tensor, AttentionMetadata]:
        """A forward's input ids and attention metadata on the device."""
        meta = self._attention_meta(
            self._put(positions, torch.int64),
            self._put(slots, torch.int64),
            block_tables,
            cu_seqlens,
            seq_lens,
            max_seqlen_q,
        )
        ids = input_ids if isinstance(input_ids, torch.Tensor) else self._put(input_ids, torch.int64)
        return ids, meta

    def _put(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        # non_blocking: a pageable host->device copy is staged at once and does not wait for
        # the device, where `torch.tensor(..., device=)` would wait for the step ahead of it.
        return host_tensor(values, dtype).to(self.device, non_blocking=True)

    def _attention_meta(
        self,
        positions: torch.Tensor,  # [T] int64 on the device
        slots: torch.Tensor,  # [T] int64 on the device
        block_tables: torch.Tensor,
        cu_seqlens: list[int],
        seq_lens: list[int],
        max_seqlen_q: int,
    ) -> AttentionMetadata:
        return AttentionMetadata(
            positions=positions,
            slot_mapping=slots,
            block_tables=block_tables.to(self.device, non_blocking=True),
            cu_seqlens_q=self._put(cu_seqlens, torch.int32),
            seq_lens=self._put(seq_lens, torch.int32),
            max_seqlen_q=max_seqlen_q,
            cos_sin_cache=self.cos_sin_cache,
            num_decode_rows=leading_single_tokens(cu_seqlens),
        )

    def _image_rows(self, out: SchedulerOutput, cu_seqlens: list[int]) -> ImageEmbeddingRows | None:
        """The image embedding rows of this step: for each scheduled prompt chunk, the part of
        each of its images that the chunk covers (encoded once per image hash, mm_inputs.py)."""
        rows: list[int] = []
        embeds: list[torch.Tensor] = []
        rope: list[list[int]] = [[], [], []]  # M-RoPE: the rows' (temporal, height, width) positions
        for i, item in enumerate(out.scheduled):
            images = item.seq.request.req.images
            if not images or item.pending_tokens:
                continue
            start, end = item.start, item.start + item.num_new_tokens
            layout = rope_images(images, self.mrope_merge)[0] if self.mrope_merge else []
            for k, image in enumerate(images):
                lo, hi = max(start, image.offset), min(end, image.end)
                if lo >= hi:
                    if (
                        image.end <= start < item.seq.request.prompt_len
                        and image.hash not in self.encoder_cache
                    ):
                        # Its KV came from the prefix cache, but the caller, which sent it whole,
                        # now takes this worker to hold it and may name it by its hash alone.
                        self._image_embeddings(image)
                    continue
                full = self._image_embeddings(image)
                embeds.append(full[lo - image.offset : hi - image.offset])
                rows += range(cu_seqlens[i] + lo - start, cu_seqlens[i] + hi - start)
                if layout:
                    for axis, values in zip(rope, image_positions(layout[k], lo, hi), strict=True):
                        axis += values
        if not rows:
            return None
        rope_positions = self._to_device([p for axis in rope for p in axis]).view(3, -1) if rope[0] else None
        return ImageEmbeddingRows(self._to_device(rows), torch.cat(embeds), rope_positions)

    def _image_embeddings(self, image: ImageInput) -> torch.Tensor:
        """An image's rows [length, hidden] on the device, held by the encoder cache afterwards
        (so that a later request may send the image as its hash alone)."""
        assert isinstance(self.model, IMAGE_MODELS), "validated at admission"
        if image.embeds is None:
            return self.encoder_cache.get(image, self.model.encode_image)
        full = image.embeds.to(self.device, self.dtype)  # an encode worker's rows, or the cache's own
        self.encoder_cache.put(image.hash, full, image.grid_thw)
        return full

    def _sampling_metadata(
        self, seqs: list[Sequence], pending: list[int] | None = None, drafted: list[list[int]] | None = None
    ) -> SamplingMetadata:
        """`pending[i]`: sampled tokens of row i not on the host yet (async scheduling); they count
        in the output length (seeds, min_tokens) but penalties, which need their values, are never
        scheduled with them (Scheduler.schedule_continuation). `drafted[i]` (speculative decoding):
        the drafts row i is sampled after; they count as its output."""
        dev = self.device
        params = [s.request.sampling for s in seqs]
        outputs = [s.output_token_ids for s in seqs]
        if drafted is not None:
            outputs = [out + extra for out, extra in zip(outputs, drafted, strict=True)]
        lengths = [len(out) + (pending[i] if pending else 0) for i, out in enumerate(outputs)]
        need_penalties = any(p.has_penalties for p in params)
        # per row: a continuation may hold a penalized prompt chunk beside decodes without penalties
        assert not any(p.has_penalties and n for p, n in zip(params, pending or [], strict=False)), (
            "penalties need every output token on the host"
        )
        banned = [
            sorted(s.request.stop_token_ids) if n < s.request.sampling.min_tokens else []
            for s, n in zip(seqs, lengths, strict=True)
        ]

        all_greedy = all(p.is_greedy for p in params)
        if all_greedy and not need_penalties and dev.type == "cuda":
            # Greedy rows without penalties read none of the per-row columns: skip the host->device
            # copy (it is a visible part of a batch-1 decode step on a GPU), and the two launches
            # that derive the greedy mask and the int64 top-k from it (made once per batch size).
            columns = self._greedy_columns.get(len(params))
            if columns is None:
                columns = self._greedy_columns[len(params)] = _column_rows(
                    torch.ones(8, len(params), device=dev)
                )
        else:
            # All per-row parameters in one host->device copy: each copy is a synchronising launch.
            columns = _column_rows(
                torch.tensor(
                    [
                        [float(p.is_greedy) for p in params],
                        [1.0 if p.is_greedy else p.temperature for p in params],
                        [max(p.top_k, 0) for p in params],  # exact in float32 (< 2**24)
                        [p.top_p for p in params],
                        [p.min_p for p in params],
                        [p.repetition_penalty for p in params],
                        [p.presence_penalty for p in params],
                        [p.frequency_penalty for p in params],
                    ],
                    dtype=torch.float32,
                ).to(dev, non_blocking=True)  # pageable: staged at once, no wait for the device
            )
        draws = None
        if not all_greedy:  # the draws of choice c at output position n (sampling_rng.py)
            rows = [(_seed(p.seed), s.choice_index, n) for s, p, n in zip(seqs, params, lengths, strict=True)]
            draws = draw_table(rows).to(dev, non_blocking=True)

        return SamplingMetadata(
            greedy=columns.greedy,
            temperature=columns.temperature,
            top_k=columns.top_k,
            top_p=columns.top_p,
            min_p=columns.min_p,
            repetition_penalty=columns.repetition_penalty,
            presence_penalty=columns.presence_penalty,
            frequency_penalty=columns.frequency_penalty,
            output_ids=outputs if need_penalties else [[] for _ in seqs],
            prompt_ids=[list(s.request.req.prompt_token_ids) for s in seqs]
            if need_penalties
            else [[] for _ in seqs],
            banned_ids=banned,
            draws=draws,
            num_logprobs=[p.logprobs for p in params],
            all_greedy=all_greedy,
            need_filter=any(p.has_filter for p in params),
            need_penalties=need_penalties,
            logit_bias=[p.logit_bias for p in params],
        )


@dataclass(frozen=True)
class _ColumnRows:
    """A step's per-row sampling parameters on the device, each [S], as SamplingMetadata takes them."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor
    top_k: torch.Tensor  # int64
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor


def _column_rows(columns: torch.Tensor) -> _ColumnRows:  # columns: [8, S] float32, rows as packed above
    return _ColumnRows(
        greedy=columns[0] != 0,
        temperature=columns[1],
        top_k=columns[2].to(torch.int64),
        top_p=columns[3],
        min_p=columns[4],
        repetition_penalty=columns[5],
        presence_penalty=columns[6],
        frequency_penalty=columns[7],
    )


def _seed(seed: int | None) -> int:
    if seed is None:  # Engine.add_request draws one for every request that comes without
        raise ValueError("a request reached the sampler without a seed")
    return seed
