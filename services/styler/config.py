"""Command-line configuration of `tandem styler`."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.service_config import ServiceConfig


@dataclass(frozen=True)
class StylerConfig(ServiceConfig):
    """Options of the tokenizer / chat-template service."""

    model: str = ""
    """Model (or tokenizer-only) directory holding tokenizer.json and tokenizer_config.json."""
    model_name: str = ""
    """Model name reported by Info (default: the model directory's name)."""
    tool_parser: str = "auto"
    """Tool-call parser: auto (from the model files), none, hermes, llama3_json, mistral or deepseek_v3."""
    reasoning_parser: str = "auto"
    """Reasoning parser: auto (from the model files), none, qwen3 or deepseek_r1."""
    chat_template: str = ""
    """A Jinja chat template file to use instead of the model's own."""
    render_timeout: float = 10.0
    """Seconds a chat-template rendering may run before it is abandoned with an error."""
    max_prompt_chars: int = 4_000_000
    """Largest rendered prompt (characters) a chat template may produce."""
    render_memory_mb: int = 1024
    """Address-space limit (MiB) of each chat-template render process; a template past it is refused."""
    render_processes: int = 2
    """Chat-template render processes (a render past --render-timeout is killed and replaced)."""
    num_threads: int = 4
    """Threads that tokenize and render (the event loop never does)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ValueError("--model is required (a directory with tokenizer.json)")
        if self.render_timeout <= 0:
            raise ValueError(f"--render-timeout must be > 0, got {self.render_timeout}")
        if self.max_prompt_chars <= 0:
            raise ValueError(f"--max-prompt-chars must be > 0, got {self.max_prompt_chars}")
        if self.render_memory_mb < 256:
            raise ValueError(f"--render-memory-mb must be >= 256, got {self.render_memory_mb}")
        if self.render_processes < 1:
            raise ValueError(f"--render-processes must be >= 1, got {self.render_processes}")
        if self.num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1, got {self.num_threads}")
