"""Draft-model proposals: a small model with the target's vocabulary runs in the same worker, with
its own paged KV cache (the same number of blocks as the target's; a draft's blocks are small).

Each step a drafted sequence catches the draft's cache up on its tokens (the prompt the first
time, then what the last verification appended) in one forward, and draws K tokens
autoregressively (K forwards for the whole batch): greedy requests take the draft's argmax, the
others draw from the draft's processed distribution q (kept for rejection sampling) with their
own salted random numbers. The draft KV of kept drafts is reused: a sequence's draft state is the
token list its cache holds, trimmed to the common prefix with the sequence's tokens.

In a tensor- / pipeline-parallel group the draft lives on rank 0 alone, unsharded (T = 1 whatever
the target's T, as vLLM keeps its drafts): it is built and its cache allocated under
`parallel.single_rank()`, so it holds whole weights, and its forwards run no collective (every
module checks its own layout); only the target's verification forward involves the other ranks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kernels import KernelOps
from services.worker import parallel
from services.worker.kv_cache import KVCache, block_bytes
from services.worker.model_config import ModelConfig, ModelConfigError, load_model_config
from services.worker.model_runner import ModelRunner
from services.worker.request import Sequence, SequenceStatus
from services.worker.speculative.draft import Draft
from services.worker.speculative.draft_blocks import DraftBlocks
from services.worker.speculative.draw import draw_drafts

log = logging.getLogger(__name__)


def _tokenizer_vocab(path: Path) -> dict[str, object] | None:
    """The token -> id table (and added tokens) of tokenizer.json in directory `path`, if any."""
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    added = sorted((t.get("id"), t.get("content")) for t in data.get("added_tokens") or [])
    return {"vocab": (data.get("model") or {}).get("vocab"), "added": added}


def check_same_tokenizer(draft: ModelConfig, target: ModelConfig, target_tokenizer: str) -> None:
    """Refuse a draft (model or EAGLE head) whose tokenizer.json, where it has one, maps tokens to
    other ids than the target's."""
    mine = _tokenizer_vocab(Path(draft.path))
    theirs = _tokenizer_vocab(Path(target_tokenizer or target.path))
    if mine is not None and theirs is not None and mine != theirs:
        raise ModelConfigError(
            f"--speculative-model {draft.path}: its tokenizer.json maps tokens to other ids than the "
            "target's; a draft must share the target's tokenizer"
        )


def check_draft_compatible(draft: ModelConfig, target: ModelConfig, target_tokenizer: str) -> None:
    """Refuse a draft model whose vocabulary or tokenizer differs from the target's: its token ids
    would mean other text, and every proposal would be rejected (or worse, out of range)."""
    where = f"--speculative-model {draft.path}"
    if draft.vocab_size != target.vocab_size:
        raise ModelConfigError(
            f"{where}: its vocabulary has {draft.vocab_size} tokens, the target's {target.vocab_size}; "
            "a draft model must share the target's tokenizer and vocabulary"
        )
    check_same_tokenizer(draft, target, target_tokenizer)
    if draft.eos_token_ids and target.eos_token_ids and set(draft.eos_token_ids) != set(target.eos_token_ids):
        log.warning(
            "draft model end tokens %s differ from the target's %s", draft.eos_token_ids, target.eos_token_ids
        )


@dataclass
class _DraftState:
    seq: Sequence
    tokens: list[int] = field(default_factory=list)  # whose KV the draft cache holds, by position
    block_ids: list[int] = field(default_factory=list)


class DraftModelProposer:
    def __init__(
        self,
        path: str,
        target: ModelConfig,
        target_tokenizer: str,
        ops: KernelOps,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        block_size: int,
        seed: int,
        load_format: str = "auto",
    ) -> None:
        try:
            self.cfg = load_model_config(path)
        except ModelConfigError as exc:
            raise ModelConfigError(f"--speculative-model {path}: {exc}") from None
        check_draft_compatible(self.cfg, target, target_tokenizer)
        self.device, self.dtype, self.block_size = device, dtype, block_size
        self.max_model_len = max_model_len
        # (dummy weights too, as the target's: benchmarks; the same seed and shape give the same ones)
        with parallel.single_rank():  # whole weights on rank 0 of a group (module docstring)
            self.runner = ModelRunner(
                self.cfg, ops, device, dtype, max_model_len, block_size, load_format, seed
            )
        self.num_params = sum(p.numel() for p in self.runner.model.parameters())
        self.states: dict[int, _DraftState] = {}
        self.blocks = DraftBlocks(block_size)

    def block_bytes(self) -> int:
        """Bytes of one block of the draft's KV cache."""
        with parallel.single_rank():
            return block_bytes(self.cfg, self.block_size, self.dtype)

    def bind_kv_cache(
        self, num_blocks: int, graphs_for_seqs: int = 0, speculative_tokens: int = 0, max_num_tokens: int = 0
    ) -> None:
        """Allocate the draft's own KV cache (after the target's is sized); `graphs_for_seqs` > 0:
        capture CUDA graphs of its one-token steps for batches up to that many sequences, and with
        `speculative_tokens` K > 0 of its catch-up forwards of up to K + 1 tokens per sequence."""
        with parallel.single_rank():  # every layer and KV head of the draft
            kv = KVCache(self.cfg, num_blocks, self.block_size, self.dtype, self.device)
        self.runner.bind_kv_cache(kv)
        self.blocks.reset(num_blocks)
        if graphs_for_seqs > 0:
            self.runner.capture_cuda_graphs(
                graphs_for_seqs, self.max_model_len, speculative_tokens, max_num_tokens
            )

    @property
    def num_used_blocks(self) -> int:
        return self.blocks.num_used

    # ---- state ------------------------------------------------------------------------------
    def release(self, seqs: Iterable[Sequence]) -> None:
        for seq in seqs:
            state = self.states.pop(seq.seq_id, None)
            if state is not None:
                self.blocks.give_back(state.block_ids)

    def after_step(self, speculating: bool) -> None:
        """Nothing to do between steps (the draft catches up when it proposes)."""

    def _collect(self) -> None:
        """Forget sequences that finished or were preempted (their blocks go back)."""
        self.release([s.seq for s in self.states.values() if s.seq.status is not SequenceStatus.RUNNING])

    def _reserve(self, state: _DraftState, num_positions: int) -> bool:
        return self.blocks.grow(state.block_ids, num_positions)

    # ---- proposals --------------------------------------------------------------------------
    def may_propose(self, seqs: list[Sequence]) -> bool:
        return bool(seqs)  # a draft model always proposes

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], k: int) -> list[Draft | None]:
        self._collect()
        out: list[Draft | None] = [None] * len(seqs)
        if k <= 0:
            return out
        live: list[tuple[int, _DraftState, int]] = []  # (index in seqs, state, first position to compute)
        for i, seq in enumerate(seqs):
            state = self.states.setdefault(seq.seq_id, _DraftState(seq))
            n = seq.num_tokens
            valid = 0
            limit = min(len(state.tokens), n - 1)
            while valid < limit and state.tokens[valid] == seq.token_ids[valid]:
                valid += 1
            state.tokens = state.tokens[:valid]
            # positions 0 .. n + k - 2 get KV (the last draft is only sampled)
            if n + k - 1 > self.max_model_len or not self._reserve(state, n + k - 1):
                continue
            live.append((i, state, valid))
        if not live:
            return out
        drafted: list[list[int]] = [[] for _ in live]
        probs: list[list[torch.Tensor]] = [[] for _ in live]
        # forward 1: each sequence's uncomputed tokens; then one draft token each per forward
        inputs = [st.seq.token_ids[start:] for _, st, start in live]
        starts = [start for _, _, start in live]
        for j in range(k):
            logits = self._forward(live, inputs, starts)
            tokens, q = self._draw(live, logits, drafted)
            for r, (_, state, _) in enumerate(live):
                state.tokens += inputs[r]
                drafted[r].append(tokens[r])
                if q is not None:
                    probs[r].append(q[r])
            starts = [start + len(ids) for start, ids in zip(starts, inputs, strict=True)]
            inputs = [[t] for t in tokens]
            if j == k - 1:
                break
        for r, (i, state, _) in enumerate(live):
            sampled = not state.seq.request.sampling.is_greedy
            out[i] = Draft(drafted[r], torch.stack(probs[r]) if sampled and probs[r] else None)
        return out

    def _forward(
        self, live: list[tuple[int, _DraftState, int]], inputs: list[list[int]], starts: list[int]
    ) -> torch.Tensor:
        """Logits [B, V] after each sequence's `inputs` (computed at positions from `starts`)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        seq_lens: list[int] = []
        max_blocks = max(len(st.block_ids) for _, st, _ in live)
        tables = torch.tensor(
            [st.block_ids + [0] * (max_blocks - len(st.block_ids)) for _, st, _ in live], dtype=torch.int32
        )
        for (_, state, _), start, chunk in zip(live, starts, inputs, strict=True):
            ids += chunk
            end = start + len(chunk)
            positions += range(start, end)
            slots += [state.block_ids[p // bs] * bs + p % bs for p in range(start, end)]
            cu.append(cu[-1] + len(chunk))
            seq_lens.append(end)
        max_seqlen_q = max(len(c) for c in inputs)
        graphs = self.runner.graphs
        if graphs is not None and graphs.can_run(len(inputs), max_seqlen_q, max_blocks):
            # one token each (every draft forward after the catch-up): replay a decode graph; its
            # outputs are overwritten by the next replay, the float logits below are a copy
            decoded = graphs.run(ids, positions, slots, seq_lens, tables)
            if decoded.logits is not None:
                return decoded.logits.float()
            return self.runner.model.compute_logits(decoded.hidden).float()
        catch_up = self.runner.small_query_graphs(len(inputs), max_seqlen_q, max_blocks)
        if catch_up is not None:  # the tokens the last verification appended (at most K + 1 each)
            hidden = catch_up.run(ids, positions, slots, cu, seq_lens, tables).hidden
        else:  # (a prompt the draft has not seen: as long as it is)
            hidden = self.runner._forward_eager(ids, positions, slots, tables, cu, seq_lens, max_seqlen_q)
        last = torch.tensor([c - 1 for c in cu[1:]], dtype=torch.int64).to(self.device, non_blocking=True)
        return self.runner.model.compute_logits(hidden.index_select(0, last)).float()

    def _draw(
        self, live: list[tuple[int, _DraftState, int]], logits: torch.Tensor, drafted: list[list[int]]
    ) -> tuple[list[int], torch.Tensor | None]:
        """Each row's next draft token, and q [B, V] when some request samples."""
        seqs = [st.seq for _, st, _ in live]
        return draw_drafts(logits, self.runner._sampling_metadata(seqs, drafted=drafted))
