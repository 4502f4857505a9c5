"""Engines turn a GenerationRequest into a stream of Chunks. Routes never import torch or vllm."""
