"""Llama 2/3, SmolLM2, TinyLlama: the reference conventions."""

from .base import Adapter


class LlamaAdapter(Adapter):
    model_type = "llama"
