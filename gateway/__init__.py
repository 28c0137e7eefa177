"""The OpenAI-compatible HTTP gateway (and the public gRPC Inference API)."""
