"""Kelix Platform: a unified discrete multimodal model (Kelix-Tok, NBP Qwen3, SANA DiT) and its MLOps lifecycle."""

__version__ = "0.1.0"
