"""The encode role (`tandem worker --role encode`): only an image-in model's vision encoder
(+ projector / merger), no language model, no KV cache. It turns the styler's pixels into the
embedding rows a unified / prefill worker puts in place of the image's placeholder tokens.

The model class is built on the meta device as usual, and only its vision modules (the class's
`unfused_prefixes`: LLaVA's `vision_tower.` + `multi_modal_projector.`, Qwen2.5-VL's `visual.`)
are materialised and loaded from the checkpoint; the language model's weights are never read.
`encode_image` is the model's own, so the rows equal those the worker computes in process.
"""

from __future__ import annotations

import logging

import torch

from kernels import get_ops
from services.worker.checkpoint import iter_checkpoint
from services.worker.config import WorkerConfig
from services.worker.engine import resolve_device, resolve_dtype
from services.worker.errors import InvalidRequestError
from services.worker.loader import _default_dtype, materialize
from services.worker.mm_inputs import EncoderCache, ImageInput, with_embeddings
from services.worker.model_config import ModelConfigError, load_model_config
from services.worker.models import IMAGE_MODELS, model_class
from services.worker.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


class VisionEncoder:
    """One model's vision side on one device, with its own encoder cache. Not thread-safe: the
    servicer runs it on one thread."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.model_config = cfg = load_model_config(config.model)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        cls = model_class(cfg.architecture)
        if not issubclass(cls, IMAGE_MODELS):
            raise ModelConfigError(
                f"{config.model}: --role encode needs an image-in model, not {cfg.architecture}"
            )
        with _default_dtype(self.dtype), torch.device("meta"):
            model = cls(cfg, get_ops("reference", "cpu"))
        self.prefixes: tuple[str, ...] = model.unfused_prefixes
        for prefix in self.prefixes:
            name = prefix.rstrip(".")
            setattr(model, name, materialize(getattr(model, name), self.device))
        self.params = {
            n: p for n, p in model.named_parameters() if n.startswith(self.prefixes)
        }  # the vision side's, on the device
        if config.load_format == "dummy":
            self._init_dummy(config.seed)
        else:
            self._load(model)
        model.eval()
        self.model = model
        self.cache = EncoderCache(config.encoder_cache_size)
        log.info(
            "encode worker: %s vision side (%.1fM parameters, %s) on %s",
            cfg.architecture,
            sum(p.numel() for p in self.params.values()) / 1e6,
            self.dtype,
            self.device,
        )

    def _load(self, model: LlamaForCausalLM) -> None:
        loaded: set[str] = set()
        for file_name, checkpoint_name, tensor in iter_checkpoint(self.config.model):
            name = checkpoint_name
            for old, new in model.checkpoint_renames:
                name = name.replace(old, new)
            param = self.params.get(name)
            if param is None:
                continue  # the language model's: not this role's
            value = tensor.read(0, 0, tensor.shape[0]) if tensor.shape else tensor.read(0, 0, 0)
            if tuple(value.shape) != tuple(param.shape):
                raise ModelConfigError(
                    f"{file_name}: tensor {checkpoint_name!r} has shape {tuple(value.shape)}, expected {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(value)
            loaded.add(name)
        missing = sorted(set(self.params) - loaded)
        if missing:
            raise ModelConfigError(f"{self.config.model}: missing tensor(s) {', '.join(missing[:4])}")

    def _init_dummy(self, seed: int) -> None:
        """Random weights as `--load-format dummy` draws them for a whole model (loader.py)."""
        gen = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            for name, param in self.params.items():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                elif name.endswith(".bias"):
                    param.zero_()
                else:
                    values = torch.randn(param.shape, generator=gen, device=self.device) * 0.02
                    param.copy_(values)

    @property
    def model_name(self) -> str:
        return self.model_config.path

    def encode(self, images: tuple[ImageInput, ...]) -> list[ImageInput]:
        """Each image with its embeddings (from the encoder cache when this worker saw it) instead
        of its pixels; InvalidRequestError names a bad one (`images[i]...`)."""
        assert isinstance(self.model, IMAGE_MODELS)
        for i, image in enumerate(images):
            if image.embeds is not None:
                raise InvalidRequestError(f"images[{i}].embeddings", "are already encoded")
            if image.by_hash:  # (the gateway sends hash-only images to unified workers alone)
                raise InvalidRequestError(
                    f"images[{i}].pixel_values", "an encode worker takes pixels, not a hash alone"
                )
            self.model.check_image(i, image)
        out = []
        for image in images:
            embeds = self.cache.get(image, self.model.encode_image)
            out.append(with_embeddings(image, embeds))
        return out
