"""Multi-LoRA serving: PEFT adapters (adapter.py), the device slot pool with LRU eviction
(pool.py) and the registry of loaded adapters the servicer and engine share (registry.py)."""
