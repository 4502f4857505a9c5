"""Offline compression: quantize, prune, distill, evaluate."""
