"""CLIP's vision transformer (the tower of LLaVA-1.5 style models, models/llava.py) and its
layers, which SigLIP's tower reuses (models/siglip.py). Matches transformers' `CLIPVisionModel`
up to the hidden state a LLaVA reads."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from services.worker.model_config import ModelConfigError

_ACTS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def activation(name: str) -> Any:
    try:
        return _ACTS[name]
    except KeyError:
        raise ModelConfigError(f"unsupported activation {name!r} in a vision config") from None


class ClipAttention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, hidden], full (non-causal) attention
        b, s, h = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        )
        return self.out_proj(out.transpose(1, 2).reshape(b, s, h))


class ClipMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = int(vc["hidden_size"]), float(vc.get("layer_norm_eps", 1e-5))
        self.self_attn = ClipAttention(hidden, int(vc["num_attention_heads"]))
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = ClipMLP(hidden, int(vc["intermediate_size"]), str(vc.get("hidden_act", "quick_gelu")))
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(vc) for _ in range(int(vc["num_hidden_layers"])))


class ClipEmbeddings(nn.Module):
    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        hidden, patch, size = int(vc["hidden_size"]), int(vc["patch_size"]), int(vc["image_size"])
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.patch_embedding = nn.Conv2d(
            int(vc.get("num_channels", 3)), hidden, patch, stride=patch, bias=False
        )
        self.image_size = size
        self.num_positions = (size // patch) ** 2 + 1
        self.position_embedding = nn.Embedding(self.num_positions, hidden)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1 + patches, hidden]
        patches = (
            self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        )
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class ClipVisionTower(nn.Module):
    """CLIP's vision transformer up to the hidden states of layer `feature_layer`."""

    def __init__(self, vc: dict[str, Any]) -> None:
        super().__init__()
        hidden, eps = int(vc["hidden_size"]), float(vc.get("layer_norm_eps", 1e-5))
        self.embeddings = ClipEmbeddings(vc)
        self.pre_layrnorm = nn.LayerNorm(hidden, eps=eps)  # (sic: HF's name)
        self.encoder = ClipEncoder(vc)
        # Unused by LLaVA (it reads a hidden state before it) but part of the checkpoint.
        self.post_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, pixels: torch.Tensor, feature_layer: int) -> torch.Tensor:
        """hidden_states[feature_layer] in HF's numbering: 0 is the embeddings after the pre-norm,
        k the output of layer k, negative indexes count from the last."""
        layers = list(self.encoder.layers)
        stop = feature_layer if feature_layer >= 0 else len(layers) + 1 + feature_layer
        x = self.pre_layrnorm(self.embeddings(pixels))
        for layer in layers[:stop]:
            x = layer(x)
        return x
