"""tandem: LLM inference serving as small services over streaming gRPC."""

from __future__ import annotations

__version__ = "0.1.0"
