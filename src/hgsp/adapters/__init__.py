"""Per-architecture adapters, looked up by the config's ``model_type``."""

from __future__ import annotations

from ..errors import UserError
from .base import Adapter, Dims
from .llama import LlamaAdapter
from .mistral import MistralAdapter
from .qwen2 import Qwen2Adapter
from .qwen3 import Qwen3Adapter

ADAPTERS: dict[str, type[Adapter]] = {
    a.model_type: a for a in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter)
}


def base_model_type(config) -> str:
    """The family of a config; a pruned ``hgsp_llama`` model belongs to ``llama``."""
    model_type = getattr(config, "model_type", "")
    return model_type[len("hgsp_"):] if model_type.startswith("hgsp_") else model_type


def adapter_for(config) -> Adapter:
    """The adapter for ``config``, or a UserError listing what is supported."""
    model_type = base_model_type(config)
    if model_type not in ADAPTERS:
        raise UserError(
            f"unsupported architecture '{model_type or 'unknown'}': hgsp prunes "
            f"{', '.join(sorted(ADAPTERS))} models"
        )
    return ADAPTERS[model_type](config)


__all__ = ["ADAPTERS", "Adapter", "Dims", "adapter_for", "base_model_type"]
