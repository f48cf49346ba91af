"""hgsp: Hybrid Global Structural Pruning for LLaMA-family causal language models."""

__version__ = "0.1.0"
