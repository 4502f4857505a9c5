"""Thin HTTP handlers; the work lives in serving.py and the engines."""
