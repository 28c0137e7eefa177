"""Model families, looked up by the `architectures` entry of config.json."""

from __future__ import annotations

from services.worker.model_config import ModelConfigError
from services.worker.models.gemma2 import Gemma2ForCausalLM
from services.worker.models.gemma3 import Gemma3ForCausalLM
from services.worker.models.gpt_oss import GptOssForCausalLM
from services.worker.models.llama import LlamaForCausalLM
from services.worker.models.llava import LlavaForConditionalGeneration
from services.worker.models.llava_next import LlavaNextForConditionalGeneration
from services.worker.models.mixtral import MixtralForCausalLM
from services.worker.models.phi3 import Phi3ForCausalLM
from services.worker.models.qwen2 import Qwen2ForCausalLM
from services.worker.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from services.worker.models.qwen3 import Qwen3ForCausalLM
from services.worker.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "GptOssForCausalLM": GptOssForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": LlavaNextForConditionalGeneration,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}

# Image-in families: `check_image` at admission, `encode_image` per image (the encoder cache)
IMAGE_MODELS = (
    LlavaForConditionalGeneration,  # (LLaVA-NeXT: a subclass)
    Qwen2_5_VLForConditionalGeneration,
)


def model_class(architecture: str) -> type[LlamaForCausalLM]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ModelConfigError(
            f"unsupported architecture {architecture!r} (supported: {supported})"
        ) from None
