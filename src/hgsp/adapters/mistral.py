"""Mistral: LLaMA layout; its sliding window changes nothing for pruning."""

from .base import Adapter


class MistralAdapter(Adapter):
    model_type = "mistral"
