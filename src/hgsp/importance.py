"""Calibration: the loops and hooks that turn batches into group importances (DESIGN.md §3).

The math lives in :mod:`hgsp.salience`; this module only gathers what it needs (summed
gradients, Fisher diagonals, input norms) over the calibration batches, in float32 whatever
dtype the model runs in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .adapters import Adapter
from .data import batches
from .errors import UserError
from .salience import GRADIENT_METHODS, METHODS, bias_input_norm, col_groups, row_groups, \
    weight_salience

log = logging.getLogger(__name__)

# (module path inside a decoder layer, how its weights map to groups, group width key)
ATTN_PARTS = (("self_attn.q_proj", "rows", "q"), ("self_attn.k_proj", "rows", "kv"),
              ("self_attn.v_proj", "rows", "kv"), ("self_attn.o_proj", "cols", "q"))
MLP_PARTS = (("mlp.gate_proj", "rows", "ch"), ("mlp.up_proj", "rows", "ch"),
             ("mlp.down_proj", "cols", "ch"))


@dataclass
class Importance:
    """Group importances: ``attn[l, g]`` for KV group g, ``mlp[l, j]`` for channel j."""

    attn: torch.Tensor
    mlp: torch.Tensor
    method: str
    tokens: int


def layer_linears(model: nn.Module, adapter: Adapter):
    """Yield ``(layer_index, part_path, axis, width_key, linear)`` for every prunable linear."""
    for index, layer in enumerate(adapter.layers(model)):
        for path, axis, key in ATTN_PARTS + MLP_PARTS:
            yield index, path, axis, key, layer.get_submodule(path)


def compute_importance(model: nn.Module, adapter: Adapter, method: str,
                       windows: torch.Tensor | None, batch_size: int,
                       gradient_checkpointing: bool = False) -> Importance:
    """Importance of every attention group and MLP channel of ``model``.

    Args:
        windows: ``(n, seq_len)`` calibration token ids (unused for ``magnitude``).
        batch_size: windows per forward/backward pass.
        gradient_checkpointing: trade compute for activation memory in the backward pass.
    """
    if method not in METHODS:
        raise UserError(f"unknown importance method '{method}': use one of {', '.join(METHODS)}")
    stats: dict[int, dict] = {}
    tokens = 0 if windows is None else windows.numel()
    if method in GRADIENT_METHODS:
        stats = _gradient_stats(model, adapter, method, windows, batch_size, gradient_checkpointing)
    elif method == "wanda":
        stats = _input_norms(model, adapter, windows, batch_size)
    return _reduce(model, adapter, method, stats, tokens)


def _check_finite(loss: torch.Tensor, what: str) -> None:
    if not torch.isfinite(loss).all():
        raise UserError(f"{what} is NaN or Inf (numerical overflow): rerun with --dtype float32 "
                        "or bfloat16, or shorter --seq_len")


def _gradient_stats(model, adapter, method, windows, batch_size, checkpointing) -> dict:
    """Summed gradients (and Fisher diagonals for taylor_2nd) of every prunable linear."""
    linears = list(layer_linears(model, adapter))
    trainable = [p for *_, lin in linears for p in lin.parameters()]
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # no gradients for embeddings and norms: saves their memory
    for p in trainable:
        p.requires_grad_(True)
    grad_sum = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in trainable}
    fisher = {id(p): torch.zeros_like(p, dtype=torch.float32) for p in trainable} \
        if method == "taylor_2nd" else None
    was_training = model.training
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in training mode; these models use no dropout
    n_batches = 0
    try:
        total = -(-windows.shape[0] // batch_size)
        for ids, mask, labels in tqdm(batches(windows, batch_size), total=total,
                                      desc=f"importance ({method})", leave=False):
            dev = model.get_input_embeddings().weight.device
            loss = model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                         labels=labels.to(dev), use_cache=False).loss
            _check_finite(loss, "calibration loss")
            loss.backward()
            for p in trainable:
                g = p.grad.float()
                if not torch.isfinite(g).all():
                    raise UserError("a calibration gradient is NaN or Inf (numerical overflow): "
                                    "rerun with --dtype float32 or bfloat16")
                grad_sum[id(p)] += g
                if fisher is not None:
                    fisher[id(p)] += g * g
                p.grad = None
            n_batches += 1
    finally:
        if checkpointing:
            model.gradient_checkpointing_disable()
        model.train(was_training)
        for p, flag in saved_flags:
            p.requires_grad_(flag)
    stats = {}
    for index, path, *_, lin in linears:
        entry = stats.setdefault(index, {})
        for pname, p in lin.named_parameters():
            item = {"grad": grad_sum[id(p)]}
            if fisher is not None:
                item["fisher"] = fisher[id(p)] / n_batches
            entry[(path, pname)] = item
    return stats


@torch.no_grad()
def _input_norms(model, adapter, windows, batch_size) -> dict:
    """L2 norm of every input feature of every prunable linear, over all calibration tokens."""
    sq: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def make_hook(key):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().float()
            s = x.pow(2).reshape(-1, x.shape[-1]).sum(dim=0)
            sq[key] = sq[key] + s if key in sq else s
        return hook

    for index, path, *_, lin in layer_linears(model, adapter):
        handles.append(lin.register_forward_hook(make_hook((index, path))))
    try:
        total = -(-windows.shape[0] // batch_size)
        for ids, mask, _ in tqdm(batches(windows, batch_size), total=total,
                                 desc="importance (wanda)", leave=False):
            dev = model.get_input_embeddings().weight.device
            model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    bias_norm = bias_input_norm(windows.numel())
    stats: dict[int, dict] = {}
    for (index, path), s in sq.items():
        stats.setdefault(index, {})[(path, "weight")] = {"input_norm": s.sqrt()}
        stats[index][(path, "bias")] = {"input_norm": bias_norm}
    return stats


@torch.no_grad()
def _reduce(model, adapter, method, stats, tokens) -> Importance:
    d = adapter.dims()
    widths = {"q": d.gqa_ratio * d.head_dim, "kv": d.head_dim, "ch": 1}
    n_layers = len(adapter.layers(model))
    attn = torch.zeros(n_layers, d.num_kv_heads)
    mlp = torch.zeros(n_layers, d.intermediate)
    for index, path, axis, key, lin in tqdm(list(layer_linears(model, adapter)),
                                            desc="group importance", leave=False):
        target = attn if path.startswith("self_attn") else mlp
        for pname, p in lin.named_parameters():
            extra = stats.get(index, {}).get((path, pname), {})
            s = weight_salience(method, p.detach(), **extra)
            # A bias lies along the output rows even for o/down, whose bias no group owns.
            if pname == "bias" and axis == "cols":
                continue
            reduce = row_groups if axis == "rows" or pname == "bias" else col_groups
            target[index] += reduce(s, widths[key]).cpu()
    return Importance(attn=attn, mlp=mlp, method=method, tokens=tokens)
