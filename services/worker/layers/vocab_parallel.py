"""The token embedding split over the tensor-parallel ranks by vocabulary rows.

Rank r holds rows [r * n, (r + 1) * n) with n = ceil(vocab / T) (rows past the vocabulary are
zero padding). A token outside the rank's rows embeds to zeros there, and one all-reduce sums
the ranks' rows into the full embedding. The LM head is split the same way (tied or not); its
logits are all-gathered (`LlamaForCausalLM.compute_logits`). With T = 1 this is nn.Embedding.
"""

from __future__ import annotations

import torch
from torch import nn

from services.worker.parallel import ShardLayout, all_reduce


class VocabParallelEmbedding(nn.Embedding):
    def __init__(self, layout: ShardLayout, hidden_size: int) -> None:
        super().__init__(layout.vocab_size, hidden_size)
        self.tp_size = layout.tp_size
        self.vocab_start = layout.vocab_start

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = nn.functional.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0.0)
        return all_reduce(out)
