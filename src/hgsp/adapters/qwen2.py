"""Qwen2 / Qwen2.5: biases on q, k and v (not on o), sliced with their rows."""

from .base import Adapter


class Qwen2Adapter(Adapter):
    model_type = "qwen2"
    always_qkv_bias = True

    @property
    def o_bias(self) -> bool:
        return False
