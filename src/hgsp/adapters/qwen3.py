"""Qwen3: per-head q_norm/k_norm act on head_dim and are shared by all heads, so kept whole."""

from .base import Adapter


class Qwen3Adapter(Adapter):
    model_type = "qwen3"
    has_qk_norm = True
