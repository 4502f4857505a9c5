"""LoRA adapters: identity, validation, cache and training."""
