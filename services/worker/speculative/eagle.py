"""EAGLE proposals: a draft head (eagle_head.py) that reads the target's hidden states.

At position i the head reads the pair (token i + 1, the target's feature at i) and predicts token
i + 2. Its KV cache is its own, paged, in the same worker (as many blocks as the target's; one
block holds the head's layers only): pairs are computed once and kept, never recomputed.

    capture (every target forward, ModelRunner.feature_sink): the features of each computed row,
        kept per sequence by position until the head consumes them
    catch-up: the head computes the pairs whose next token is known (positions up to n - 2 of a
        sequence of n tokens) from the kept features, in forwards of at most a step's token budget;
        it runs after a step (`after_step`) while the worker speculates, and at the latest every
        ABSORB_EVERY steps or ABSORB_ROWS kept rows while it does not (the features' memory stays small)
    propose: d_1 from the head's output at pair n - 2, then K - 1 chained one-token forwards, each
        pair (d_j, the head's own previous output) at the next position (EAGLE's chaining); their
        KV slots are overwritten by true pairs later

A feature is valid while the tokens it was computed after are the sequence's: a verification's
rows after the first rejected draft are dropped when consumed. Positions the target never
computed for this sequence (a prefix-cache hit, a prompt whose KV came from a prefill worker, a
head cache given up for room) enter the head with zero features: the drafts are worse there,
never wrong (verification decides). Choices of n > 1 fork their parent's head state (KV blocks
copied) when the prompt ends.

In a tensor- / pipeline-parallel group the head lives on rank 0 alone, unsharded (built and its
cache allocated under `parallel.single_rank()`: whole weights, no collective in its layers). It
reads rank 0's features, which are whole: the final hidden states after the last all-reduce and
the final norm (with P > 1, as they come back to stage 0), and EAGLE-3's residual streams after
each layer's all-reduce. The target's embedding and LM head it shares (EAGLE-1, and an EAGLE-3
head without its own embedding) are vocabulary-parallel: they run on the group like the target's
own (the other ranks are told, `LlamaForCausalLM.embed` / `compute_logits`). EAGLE-3 with P > 1 is
refused (`check_pipeline`): its aux layers' streams live on the stages that hold those layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from kernels import KernelOps, build_rope_cache
from services.worker import parallel
from services.worker.cuda_graph import CudaGraphRunner, DecodeOutputs
from services.worker.kv_cache import KVCache, block_bytes
from services.worker.layers.attention import AttentionMetadata
from services.worker.model_config import ModelConfig, ModelConfigError, load_model_config
from services.worker.model_runner import ModelRunner, leading_single_tokens
from services.worker.models.llama import LlamaModel
from services.worker.models.llava import LlavaForConditionalGeneration
from services.worker.request import Sequence, SequenceStatus
from services.worker.scheduler import ScheduledSequence, SchedulerOutput
from services.worker.speculative.draft import Draft
from services.worker.speculative.draft_blocks import DraftBlocks
from services.worker.speculative.draft_model import check_same_tokenizer
from services.worker.speculative.draw import draw_drafts
from services.worker.speculative.eagle_head import EagleHead, EagleLayout, build_head, read_layout
from services.worker.speculative.verify_graph import VerifyGraphRunner, verify_graph_sizes

log = logging.getLogger(__name__)

ABSORB_EVERY = 8  # steps without speculation between catch-ups
ABSORB_ROWS = 4096  # kept feature rows (all sequences) that force a catch-up


@dataclass
class _Chunk:
    """Features the target computed for positions start.. of a sequence, and the input ids there."""

    start: int
    tokens: list[int]  # -1: a sampled token the host had not read yet (async scheduling): trusted
    features: torch.Tensor  # [len(tokens), F]

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def valid_end(self, token_ids: list[int]) -> int:
        """End of the rows computed after the sequence's own tokens (a rejected draft ends them)."""
        for j, t in enumerate(self.tokens):
            p = self.start + j
            if p >= len(token_ids) or (t >= 0 and t != token_ids[p]):
                return p
        return self.end


@dataclass
class _HeadState:
    seq: Sequence
    num_pairs: int = 0  # pairs 0 .. num_pairs - 1 are in the head's cache, from the target's features
    block_ids: list[int] = field(default_factory=list)
    last_out: torch.Tensor | None = None  # [H] the head's output at pair num_pairs - 1
    pending: list[_Chunk] = field(default_factory=list)  # by position, not overlapping

    def add(self, chunk: _Chunk) -> None:
        """A newer computation of positions >= chunk.start replaces what was kept for them."""
        kept = []
        for c in self.pending:
            if c.end <= chunk.start:
                kept.append(c)
            elif c.start < chunk.start:
                n = chunk.start - c.start
                kept.append(_Chunk(c.start, c.tokens[:n], c.features[:n]))
        kept.append(chunk)
        self.pending = kept

    def drop_before(self, position: int) -> None:
        kept = []
        for c in self.pending:
            if c.end <= position:
                continue
            n = max(position - c.start, 0)
            kept.append(_Chunk(c.start + n, c.tokens[n:], c.features[n:]) if n else c)
        self.pending = kept

    @property
    def num_pending_rows(self) -> int:
        return sum(len(c.tokens) for c in self.pending)


class EagleProposer:
    def __init__(
        self,
        path: str,
        target: ModelConfig,
        target_tokenizer: str,
        runner: ModelRunner,
        ops: KernelOps,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        block_size: int,
        max_num_batched_tokens: int,
        seed: int,
        load_format: str = "auto",
    ) -> None:
        where = f"--speculative-model {path}"
        try:
            self.cfg = load_model_config(path)
        except ModelConfigError as exc:
            raise ModelConfigError(f"{where}: {exc}") from None
        model = runner.model
        if (
            isinstance(model, LlavaForConditionalGeneration)
            or type(model.model).forward is not LlamaModel.forward
        ):
            raise ModelConfigError(
                f"{where}: EAGLE heads read a Llama-family target's hidden states (Llama, Mistral, Qwen2/3, "
                f"Mixtral, Qwen3-MoE, Phi-3); {target.architecture} is not supported"
            )
        self.layout = read_layout(self.cfg, target, load_format)
        check_same_tokenizer(self.cfg, target, target_tokenizer)  # (where the head has a tokenizer.json)
        check_pipeline(self.layout, parallel.current().pp_size, where)
        with parallel.single_rank():  # whole weights on rank 0 of a group (module docstring)
            self.head: EagleHead = build_head(
                self.cfg,
                self.layout,
                ops,
                device,
                dtype,
                load_format,
                seed,
                model.embed,  # (a bound method: a module would become the head's)
                model.compute_logits,
            )
        # parameters one draft token costs: the head's, and the target's LM head it uses (EAGLE-1)
        self.num_params = sum(p.numel() for p in self.head.parameters())
        if not self.layout.eagle3:
            self.num_params += sum(p.numel() for p in model.lm_head.parameters())
        self.runner = runner  # the target's: its sampling metadata, and the features it hands over
        model.model.aux_layers = self.layout.aux_layers
        runner.feature_sink = self.capture
        self.device, self.dtype, self.block_size = device, dtype, block_size
        self.max_model_len = max_model_len
        self.max_tokens = max(max_num_batched_tokens, 1)
        self.cos_sin_cache = build_rope_cache(
            self.cfg.head_dim,
            max(max_model_len, 1),
            self.cfg.rope_theta,
            self.cfg.rope_scaling,
            dtype,
            device,
        )
        self.states: dict[int, _HeadState] = {}
        self.blocks = DraftBlocks(block_size)
        self.kv_cache: KVCache | None = None
        self._steps_since_absorb = 0
        self._rows_since_absorb = 0
        self.ops = ops
        # CUDA graphs of the head's forwards (bind_kv_cache): the chained one-token proposal steps,
        # the catch-up over the pairs a verification appended, and the hidden input both read
        self.step_graphs: CudaGraphRunner | None = None
        self.catch_up_graphs: VerifyGraphRunner | None = None
        self._graph_hidden: torch.Tensor | None = None
        log.info(
            "EAGLE%s head %s: %d layer(s), %.1fM parameters%s",
            "-3" if self.layout.eagle3 else "",
            path,
            self.cfg.num_layers,
            self.num_params / 1e6,
            f", reading target layers {list(self.layout.aux_layers)}" if self.layout.eagle3 else "",
        )

    def block_bytes(self) -> int:
        """Bytes of one block of the head's KV cache."""
        with parallel.single_rank():
            return block_bytes(self.cfg, self.block_size, self.dtype)

    def bind_kv_cache(
        self, num_blocks: int, graphs_for_seqs: int = 0, speculative_tokens: int = 0, max_num_tokens: int = 0
    ) -> None:
        """Allocate the head's KV cache; `graphs_for_seqs` > 0: capture CUDA graphs of its chained
        one-token proposal forwards for batches up to that many sequences and of its catch-up
        forwards of up to `speculative_tokens` + 1 pairs per sequence."""
        with parallel.single_rank():  # every layer and KV head of the head
            self.kv_cache = KVCache(self.cfg, num_blocks, self.block_size, self.dtype, self.device)
        for i, attn in enumerate(self.head.attention_layers()):
            attn.attn.kv_cache = self.kv_cache.layer(i)
        self.blocks.reset(num_blocks)
        if graphs_for_seqs > 0:
            self._capture_graphs(graphs_for_seqs, speculative_tokens, max_num_tokens)

    def _capture_graphs(self, max_num_seqs: int, speculative_tokens: int, max_num_tokens: int) -> None:
        """The head's graphs read their hidden input from one static buffer (`_graph_hidden`), which
        each forward fills first; ids, positions, slots and tables travel as the target's do."""
        if not self.ops.graph_capturable(self.cfg.head_dim):
            log.info(
                "EAGLE head CUDA graphs off: kernels %r cannot be captured for head_dim %d",
                self.ops.name,
                self.cfg.head_dim,
            )
            return
        max_blocks = -(-self.max_model_len // self.block_size)
        sizes = verify_graph_sizes(max_num_seqs, speculative_tokens, max_num_tokens)
        rows = max([max_num_seqs] + [bs * q for bs, q in sizes])
        self._graph_hidden = torch.zeros(rows, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
        self.step_graphs = CudaGraphRunner(
            self._graph_forward,
            self.cos_sin_cache,
            max_num_seqs,
            max_blocks,
            self.device,
            "the EAGLE head's proposal steps, batch sizes",
        )
        self.step_graphs.capture()
        if sizes:
            self.catch_up_graphs = VerifyGraphRunner(
                self._graph_forward,
                self.cos_sin_cache,
                sizes,
                max_blocks,
                self.device,
                "the EAGLE head's catch-up",
            )
            self.catch_up_graphs.capture()

    def _graph_forward(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> DecodeOutputs:
        """What the head's graphs compute: its outputs over (token, `_graph_hidden` row) pairs."""
        assert self._graph_hidden is not None
        return DecodeOutputs(self.head(input_ids, self._graph_hidden[: input_ids.shape[0]], meta), None, None)

    @property
    def num_used_blocks(self) -> int:
        return self.blocks.num_used

    # ---- state ------------------------------------------------------------------------------
    def release(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            state = self.states.pop(seq.seq_id, None)
            if state is not None:
                self.blocks.give_back(state.block_ids)

    def _collect(self) -> None:
        """Forget finished sequences (their blocks go back)."""
        self.release([s.seq for s in self.states.values() if s.seq.is_finished])

    def _reserve(self, state: _HeadState, num_positions: int) -> bool:
        need = self.blocks.missing(state.block_ids, num_positions)
        if need > len(self.blocks.free):
            # preempted sequences keep their head cache while there is room; a running one comes first
            for other in list(self.states.values()):
                if other is not state and other.seq.status is SequenceStatus.WAITING and other.block_ids:
                    self.blocks.give_back(other.block_ids)
                    other.block_ids, other.num_pairs, other.last_out = [], 0, None
                if need <= len(self.blocks.free):
                    break
        return self.blocks.grow(state.block_ids, num_positions)

    def _state(self, seq: Sequence) -> _HeadState:
        return self.states.setdefault(seq.seq_id, _HeadState(seq))

    def _fork(self, parent: _HeadState, child: Sequence) -> None:
        """A choice of n > 1 starts from its parent's head state (its KV blocks copied)."""
        state = _HeadState(child, pending=list(parent.pending))
        self.states[child.seq_id] = state
        if not parent.num_pairs or not self._reserve(state, parent.num_pairs):
            return
        assert self.kv_cache is not None
        pairs = list(zip(parent.block_ids, state.block_ids, strict=False))
        self.kv_cache.copy_blocks(pairs)
        state.num_pairs, state.last_out = parent.num_pairs, parent.last_out

    # ---- features ---------------------------------------------------------------------------
    def capture(self, out: SchedulerOutput, features: torch.Tensor, cu_seqlens: list[int]) -> None:
        """Keep the features of the step's rows (ModelRunner.feature_sink; called right after the
        forward, before anything may overwrite `features`)."""
        wanted = [(i, item) for i, item in enumerate(out.scheduled) if _wanted(item)]
        if not wanted:
            return
        rows = features[: cu_seqlens[-1]].clone()  # (CUDA graphs: the outputs are reused next step)
        for i, item in wanted:
            seq = item.seq
            state = self._state(seq)
            for child in item.children:  # the prompt's last chunk: the choices fork here
                self._fork(state, child)
            if item.pending_tokens:
                tokens = [-1] * item.num_new_tokens
            else:
                inputs = seq.token_ids[item.start : item.start + item.num_new_tokens]
                if item.draft is not None:
                    inputs = inputs + item.draft.token_ids
                tokens = inputs[: item.num_new_tokens]
            chunk = _Chunk(item.start, tokens, rows[cu_seqlens[i] : cu_seqlens[i + 1]])
            state.add(chunk)
            for child in item.children:
                self.states[child.seq_id].add(chunk)
            self._rows_since_absorb += len(tokens)

    def _features(self, state: _HeadState, lo: int, hi: int) -> torch.Tensor:
        """[hi - lo, F] the kept features of positions lo..hi-1 (zeros where there are none)."""
        token_ids = state.seq.token_ids
        parts: list[torch.Tensor] = []
        p = lo
        for chunk in state.pending:
            start, end = max(p, chunk.start), min(hi, chunk.valid_end(token_ids))
            if end <= start:
                continue
            if start > p:
                parts.append(self._zeros(start - p))
            parts.append(chunk.features[start - chunk.start : end - chunk.start])
            p = end
        if p < hi:
            parts.append(self._zeros(hi - p))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _zeros(self, rows: int) -> torch.Tensor:
        return torch.zeros(rows, self.layout.feature_size, dtype=self.dtype, device=self.device)

    # ---- the head's forwards ----------------------------------------------------------------
    def after_step(self, speculating: bool) -> None:
        """After a step is applied: catch the head up while the worker speculates, or when enough
        features are kept (bounding their memory) while it does not."""
        self._steps_since_absorb += 1
        if not (
            speculating or self._steps_since_absorb >= ABSORB_EVERY or self._rows_since_absorb >= ABSORB_ROWS
        ):
            return
        self._steps_since_absorb = self._rows_since_absorb = 0
        self._collect()
        self._catch_up(list(self.states.values()))

    @torch.inference_mode()
    def _catch_up(self, states: list[_HeadState]) -> None:
        """Compute the pairs each state can: positions num_pairs .. min(n - 2, computed - 1)."""
        work: list[tuple[_HeadState, int, int]] = []
        for state in states:
            seq = state.seq
            hi = min(seq.num_tokens - 1, seq.num_computed_tokens)  # one past the last complete pair
            if hi <= state.num_pairs:
                continue
            if self._reserve(state, hi):
                work.append((state, state.num_pairs, hi))
            else:  # no room in the head's cache: its features would only pile up
                state.drop_before(hi)
        while work:
            batch: list[tuple[_HeadState, int, int]] = []
            rest: list[tuple[_HeadState, int, int]] = []
            budget = self.max_tokens
            for state, lo, hi in work:
                take = min(hi - lo, budget)
                if take > 0:
                    batch.append((state, lo, lo + take))
                    budget -= take
                if lo + take < hi:
                    rest.append((state, lo + take, hi))
            features = torch.cat([self._features(st, lo, hi) for st, lo, hi in batch])
            ids = [t for st, lo, hi in batch for t in st.seq.token_ids[lo + 1 : hi + 1]]
            out = self._forward(batch, ids, self.head.combine(features))
            ends = torch.tensor([hi - lo for _, lo, hi in batch]).cumsum(0) - 1
            # (rows of a small copy: a view would keep the whole forward's output alive)
            last = out.index_select(0, ends.to(self.device, non_blocking=True))
            for r, (state, _, hi) in enumerate(batch):
                state.num_pairs, state.last_out = hi, last[r]
                state.drop_before(hi)
            work = rest

    def _forward(
        self, batch: list[tuple[_HeadState, int, int]], ids: list[int], hidden: torch.Tensor
    ) -> torch.Tensor:
        """The head over positions lo..hi-1 of each (state, lo, hi): [rows, H] outputs."""
        bs = self.block_size
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        for state, lo, hi in batch:
            positions += range(lo, hi)
            slots += [state.block_ids[p // bs] * bs + p % bs for p in range(lo, hi)]
            cu.append(cu[-1] + hi - lo)
        max_blocks = max(len(st.block_ids) for st, _, _ in batch)
        tables = torch.tensor(
            [st.block_ids + [0] * (max_blocks - len(st.block_ids)) for st, _, _ in batch], dtype=torch.int32
        )
        seq_lens = [hi for _, _, hi in batch]
        max_seqlen_q = max(hi - lo for _, lo, hi in batch)
        if self._graph_hidden is not None:
            if self.step_graphs is not None and self.step_graphs.can_run(
                len(batch), max_seqlen_q, max_blocks
            ):
                self._graph_hidden[: len(batch)].copy_(hidden)  # (the chained proposal steps)
                return self.step_graphs.run(ids, positions, slots, seq_lens, tables).hidden
            catch_up = self.catch_up_graphs
            if catch_up is not None and catch_up.can_run(len(batch), max_seqlen_q, max_blocks):
                self._graph_hidden[: len(ids)].copy_(hidden)
                return catch_up.run(ids, positions, slots, cu, seq_lens, tables).hidden

        def put(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            positions=put(positions, torch.int64),
            slot_mapping=put(slots, torch.int64),
            block_tables=tables.to(self.device, non_blocking=True),
            cu_seqlens_q=put(cu, torch.int32),
            seq_lens=put(seq_lens, torch.int32),
            max_seqlen_q=max_seqlen_q,
            cos_sin_cache=self.cos_sin_cache,
            num_decode_rows=leading_single_tokens(cu),
        )
        return self.head(put(ids, torch.int64), hidden, meta)  # type: ignore[no-any-return]

    # ---- proposals --------------------------------------------------------------------------
    def may_propose(self, seqs: list[Sequence]) -> bool:
        return bool(seqs)  # a head always proposes

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], k: int) -> list[Draft | None]:
        self._collect()
        out: list[Draft | None] = [None] * len(seqs)
        if k <= 0:
            return out
        candidates: list[tuple[int, _HeadState]] = []
        for i, seq in enumerate(seqs):
            state = self._state(seq)
            n = seq.num_tokens
            # head KV for positions 0 .. n + k - 3 (the last draft is only sampled)
            if n + k - 2 > self.max_model_len or not self._reserve(state, max(n + k - 2, n - 1)):
                continue
            candidates.append((i, state))
        self._catch_up([st for _, st in candidates])
        live = [
            (i, st)
            for i, st in candidates
            if st.num_pairs == st.seq.num_tokens - 1 and st.last_out is not None
        ]
        if not live:
            return out
        seqs_live = [st.seq for _, st in live]
        hidden = torch.stack([st.last_out for _, st in live if st.last_out is not None])
        drafted: list[list[int]] = [[] for _ in live]
        probs: list[list[torch.Tensor]] = [[] for _ in live]
        for j in range(k):
            logits = self.head.compute_logits(hidden)
            tokens, q = draw_drafts(logits, self.runner._sampling_metadata(seqs_live, drafted=drafted))
            for r in range(len(live)):
                drafted[r].append(tokens[r])
                if q is not None:
                    probs[r].append(q[r])
            if j == k - 1:
                break
            # the pair (d_j+1, the head's output) at the position after the last one computed
            batch = [(st, st.seq.num_tokens - 1 + j, st.seq.num_tokens + j) for _, st in live]
            hidden = self._forward(batch, tokens, hidden)
        for r, (i, state) in enumerate(live):
            sampled = not state.seq.request.sampling.is_greedy
            out[i] = Draft(drafted[r], torch.stack(probs[r]) if sampled and probs[r] else None)
        return out


def check_pipeline(layout: EagleLayout, pp_size: int, where: str) -> None:
    """EAGLE-3 reads the residual streams of layers spread over the pipeline's stages, which stage
    0 (rank 0, where the head runs) does not see: refused with P > 1."""
    if layout.eagle3 and pp_size > 1:
        raise ModelConfigError(
            f"{where}: an EAGLE-3 head with --pipeline-parallel-size {pp_size}: it reads target layers "
            f"{list(layout.aux_layers)}, whose hidden states stay on other pipeline stages "
            "(EAGLE-1 heads and --tensor-parallel-size work)"
        )


def _wanted(item: ScheduledSequence) -> bool:
    """Rows whose features a head may read later: not a beam's, an embedding's or a prefill worker's."""
    request = item.seq.request
    return request.beam is None and not request.req.pooling and not request.req.hold_kv
