"""SigLIP's vision transformer as a LLaVA-style vision tower (`vision_config.model_type ==
"siglip_vision_model"`), beside CLIP's (models/llava.py).

It differs from CLIP in its conventions, not its layers: no CLS token (one row per patch), a
patch embedding with a bias, no pre-norm before the encoder (hidden state 0 is the patch +
position embeddings), and a post-layernorm and attention-pooling head after it that LLaVA never
reads (they are kept so that the checkpoint loads as it is). The encoder layers are CLIP's
(the same names and math: pre-norm attention with biases, then a two-layer MLP).

Matches transformers' `SiglipVisionModel` hidden states, without `interpolate_pos_encoding`
(the processor always gives `image_size` pixels).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from services.worker.models.clip import ClipEncoder, ClipMLP

SIGLIP_DEFAULTS = {"hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}


class SiglipEmbeddings(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        hidden, patch, size = int(vc["hidden_size"]), int(vc["patch_size"]), int(vc["image_size"])
        self.patch_embedding = nn.Conv2d(int(vc.get("num_channels", 3)), hidden, patch, stride=patch)
        self.image_size = size
        self.num_positions = (size // patch) ** 2  # no CLS row
        self.position_embedding = nn.Embedding(self.num_positions, hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, patches, hidden]
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixels.to(w.dtype)).flatten(2).transpose(1, 2)
        return patches + self.position_embedding.weight[None]


class SiglipPoolingHead(nn.Module):
    """The checkpoint's attention-pooling head (`vision_use_head`); LLaVA reads a hidden state
    before it, so it is loaded and never run."""

    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        hidden = int(vc["hidden_size"])
        self.probe = nn.Parameter(torch.empty(1, 1, hidden))
        self.attention = nn.MultiheadAttention(hidden, int(vc["num_attention_heads"]), batch_first=True)
        self.layernorm = nn.LayerNorm(hidden, eps=float(vc["layer_norm_eps"]))
        self.mlp = ClipMLP(hidden, int(vc["intermediate_size"]), str(vc["hidden_act"]))


class SiglipVisionTower(nn.Module):
    """SigLIP's vision transformer up to the hidden states of layer `feature_layer`."""

    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        vc = {**SIGLIP_DEFAULTS, **vc}
        hidden, eps = int(vc["hidden_size"]), float(vc["layer_norm_eps"])
        self.embeddings = SiglipEmbeddings(vc)
        self.encoder = ClipEncoder(vc)
        self.post_layernorm = nn.LayerNorm(hidden, eps=eps)  # unused by LLaVA, in the checkpoint
        if vc.get("vision_use_head", True):
            self.head = SiglipPoolingHead(vc)

    def forward(self, pixels: torch.Tensor, feature_layer: int) -> torch.Tensor:
        """hidden_states[feature_layer] in HF's numbering: 0 is the embeddings, k the output of
        layer k, negative indexes count from the last (never the post-layernorm's output)."""
        layers = list(self.encoder.layers)
        stop = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
        x = self.embeddings(pixels)
        for layer in layers[:stop]:
            x = layer(x)
        return x
