"""The PyTorch engine and its torch-only internals: queueing, batched model steps, sampling, KV cache,
LoRA rows, token acceptance (shared with speculative decoding)."""
