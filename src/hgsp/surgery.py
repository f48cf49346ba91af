"""Apply a pruning plan: a new, physically smaller model built from sliced weights (§7).

The base model is left untouched (evaluation compares against it). The pruned model is
created with empty (meta) parameters and then given the sliced tensors, so the extra memory is
the pruned size only. When every kept layer still has the base widths (only whole layers
removed), the result is a stock transformers model; otherwise it is the matching class of
:mod:`hgsp.modeling_hgsp`, which reads per-layer sizes from its config.
"""

from __future__ import annotations

import logging

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from . import registry  # noqa: F401 - pruned configs resolve to hgsp classes
from .adapters import Adapter
from .baselines import compensation_bias
from .importance import input_device, onloaded
from .modeling_hgsp import PRUNED_CLASSES
from .plan import LayerPlan, PruningPlan, as_index

log = logging.getLogger(__name__)

# per-projection: (dimension that is sliced, which kept indices, rows per kept index key)
_SLICES = {
    "self_attn.q_proj": ("out", "heads", "q"),
    "self_attn.k_proj": ("out", "heads", "kv"),
    "self_attn.v_proj": ("out", "heads", "kv"),
    "self_attn.o_proj": ("in", "heads", "q"),
    "mlp.gate_proj": ("out", "channels", "ch"),
    "mlp.up_proj": ("out", "channels", "ch"),
    "mlp.down_proj": ("in", "channels", "ch"),
}
# the output projection of each block kind: what bias compensation and the refit change
_OUT_PROJ = {"attn": "self_attn.o_proj", "mlp": "mlp.down_proj"}
# where an emptied block's constant lives (modeling_hgsp.ConstantAttention / ConstantMLP)
_CONSTANT = {"attn": "self_attn.bias", "mlp": "mlp.bias"}
_ATTN_ONLY = ("input_layernorm.", "self_attn.")
_MLP_ONLY = ("post_attention_layernorm.", "mlp.")


def is_uniform(plan: PruningPlan) -> bool:
    """True when the kept layers are untouched, so a stock config describes the model."""
    return all(len(lp.kept_kv_heads) == plan.num_kv_heads
               and len(lp.kept_channels) == plan.intermediate_size for lp in plan.kept_layers)


def built_layers(plan: PruningPlan, out_biases: dict | None = None) -> list[LayerPlan]:
    """The base layers the pruned model has: the plan's kept layers, and a layer whose two
    blocks were emptied but left a constant each (FLAP's bias compensation)."""
    biases = out_biases or {}
    return [lp for lp in plan.layers if not lp.removed or biases.get(lp.index)]


def pruned_config(base_config, plan: PruningPlan, out_biases: dict | None = None):
    """The config of the pruned model: fewer layers and, if needed, per-layer sizes."""
    data = base_config.to_dict()
    for key in ("_name_or_path", "auto_map", "architectures", "transformers_version"):
        data.pop(key, None)
    kept = built_layers(plan, out_biases)
    data["num_hidden_layers"] = len(kept)
    if data.get("layer_types"):
        data["layer_types"] = [data["layer_types"][lp.index] for lp in kept]
    if data.get("max_window_layers") is not None:  # Qwen2: layers below it use full attention
        data["max_window_layers"] = sum(lp.index < data["max_window_layers"] for lp in kept)
    model_type = data.pop("model_type")
    if is_uniform(plan) and not out_biases:
        config = AutoConfig.for_model(model_type, **data)
    else:
        config_cls, model_cls = PRUNED_CLASSES[model_type]
        data["hgsp_num_key_value_heads"] = [len(lp.kept_kv_heads) for lp in kept]
        data["hgsp_intermediate_sizes"] = [len(lp.kept_channels) for lp in kept]
        data["hgsp_source_layers"] = [lp.index for lp in kept]
        if out_biases:
            data["hgsp_out_biases"] = [[k in out_biases.get(lp.index, {}) for k in ("attn", "mlp")]
                                       for lp in kept]
        data["auto_map"] = {
            "AutoConfig": f"modeling_hgsp.{config_cls.__name__}",
            "AutoModelForCausalLM": f"modeling_hgsp.{model_cls.__name__}",
        }
        config = config_cls(**data)
        config.architectures = [model_cls.__name__]
    return config


def _rows(kept: list[int], width: int) -> torch.Tensor:
    """Rows (or columns) of the kept units, each unit ``width`` consecutive rows."""
    kept_t = as_index(kept)
    return (kept_t.unsqueeze(1) * width + torch.arange(width)).reshape(-1)


def _slice_layer(prefix: str, tensors: dict[str, torch.Tensor], lp: LayerPlan,
                 widths: dict[str, int]) -> dict[str, torch.Tensor]:
    """Sliced copies of one layer's tensors, named relative to the layer."""
    out = {}
    index = {"heads": lp.kept_kv_heads, "channels": lp.kept_channels}
    for name, tensor in tensors.items():
        if (lp.attn_removed and name.startswith(_ATTN_ONLY)) or \
                (lp.mlp_removed and name.startswith(_MLP_ONLY)):
            continue
        module, _, pname = name.rpartition(".")
        spec = _SLICES.get(module)
        if spec is None:  # norms, q_norm/k_norm: shared by every head, kept whole
            out[name] = tensor.clone()
            continue
        dim, which, key = spec
        rows = _rows(index[which], widths[key]).to(tensor.device)
        if dim == "out":
            out[name] = tensor.index_select(0, rows)
        elif pname == "weight":
            out[name] = tensor.index_select(1, rows)
        else:  # bias of o/down lies along the hidden size: untouched
            out[name] = tensor.clone()
    return {f"{prefix}{name}": t for name, t in out.items()}


def sliced_state_dict(model: nn.Module, adapter: Adapter, plan: PruningPlan,
                      out_biases: dict | None = None, out_weights: dict | None = None) -> dict:
    """The pruned model's state dict, with kept layers renumbered densely.

    ``out_biases`` maps a base layer index to ``{"attn": b, "mlp": b}``: vectors added to the
    o_proj / down_proj bias of that layer's kept blocks, or the constant that stands in for an
    emptied block (see :func:`compensation_biases`).
    ``out_weights``, mapped the same way, holds o_proj / down_proj weights that replace the
    sliced ones (the refit of :mod:`hgsp.reconstruction`).
    """
    d = adapter.dims()
    widths = {"q": d.gqa_ratio * d.head_dim, "kv": d.head_dim, "ch": 1}
    # Weights offloaded by accelerate (--device_map) are read back one layer at a time.
    layers = adapter.layers(model)
    in_layers = {id(m) for m in layers.modules()}
    with onloaded(m for m in model.modules() if id(m) not in in_layers):
        out = {k: v.clone() for k, v in model.state_dict().items()
               if not k.startswith("model.layers.")}
    for new_index, lp in enumerate(built_layers(plan, out_biases)):
        with onloaded(layers[lp.index].modules()):
            out.update(_slice_layer(f"model.layers.{new_index}.",
                                    layers[lp.index].state_dict(), lp, widths))
        if out_biases is not None:
            _add_out_biases(out, f"model.layers.{new_index}.", lp, out_biases.get(lp.index, {}))
        if out_weights is not None:
            _replace_out_weights(out, f"model.layers.{new_index}.", out_weights.get(lp.index, {}))
    return out


def _replace_out_weights(state: dict, prefix: str, weights: dict) -> None:
    for kind, module in _OUT_PROJ.items():
        new = weights.get(kind)
        if new is None:
            continue
        name = f"{prefix}{module}.weight"
        old = state[name]
        if new.shape != old.shape:
            raise ValueError(f"refitted {name} has shape {tuple(new.shape)}, the plan keeps "
                             f"{tuple(old.shape)}")
        state[name] = new.to(old.device, old.dtype).contiguous()


def _add_out_biases(state: dict, prefix: str, lp: LayerPlan, biases: dict) -> None:
    """Add compensation to the output projection of each kept, narrowed block (creating the
    bias when the base model has none); an emptied block's compensation is its constant."""
    for kind, module in _OUT_PROJ.items():
        extra = biases.get(kind)
        if extra is None:
            continue
        if lp.block_removed(kind):  # the block is a modeling_hgsp.ConstantAttention / ConstantMLP
            state[f"{prefix}{_CONSTANT[kind]}"] = extra.clone()
            continue
        weight = state[f"{prefix}{module}.weight"]
        name = f"{prefix}{module}.bias"
        bias = state.get(name, torch.zeros(weight.shape[0], dtype=weight.dtype,
                                           device=weight.device))
        state[name] = bias + extra.to(bias.device, bias.dtype)


def narrowed_blocks(plan: PruningPlan, q_width: int, emptied: bool = False
                    ) -> dict[tuple[str, int], torch.Tensor]:
    """``(kind, layer) -> kept input columns`` of the output projection of every kept block that
    lost some width (``q_width`` columns per KV group: its query heads times head_dim); with
    ``emptied``, also of every block that lost all of it (no columns kept)."""
    out = {}
    sizes = {"attn": plan.num_kv_heads, "mlp": plan.intermediate_size}
    for lp in plan.layers:
        if lp.removed and not emptied:
            continue
        for kind, kept in (("attn", lp.kept_kv_heads), ("mlp", lp.kept_channels)):
            if len(kept) == sizes[kind] or (not kept and not emptied):
                continue
            out[(kind, lp.index)] = _rows(kept, q_width) if kind == "attn" else as_index(kept)
    return out


@torch.no_grad()
def compensation_biases(model: nn.Module, adapter: Adapter, plan: PruningPlan,
                        attn_mean: torch.Tensor, mlp_mean: torch.Tensor,
                        emptied: bool = False) -> dict:
    """Per kept block, the bias that stands in for its removed heads and channels (FLAP).

    Args:
        attn_mean, mlp_mean: ``(L, features)`` calibration mean of every layer's o_proj and
            down_proj input.
        emptied: also give every block that lost all its units its removed units' average
            contribution, a constant that stands in for the block (FLAP's code keeps it).
    """
    d = adapter.dims()
    layers = adapter.layers(model)
    means = {"attn": attn_mean, "mlp": mlp_mean}
    out: dict = {}
    for (kind, index), kept in narrowed_blocks(plan, d.gqa_ratio * d.head_dim,
                                               emptied).items():
        proj = out_projection(layers[index], kind)
        with onloaded([proj]):
            bias = compensation_bias(proj.weight.detach(),
                                     means[kind][index].to(proj.weight.device), kept)
            if not kept.numel() and proj.bias is not None:
                # the constant replaces the whole projection, its own bias included
                bias = bias + proj.bias.detach()
            out.setdefault(index, {})[kind] = bias
    return out


def out_projection(layer: nn.Module, kind: str) -> nn.Linear:
    """The o_proj (``attn``) or down_proj (``mlp``) of a decoder layer."""
    return layer.get_submodule(_OUT_PROJ[kind])


@torch.no_grad()
def apply_plan(model: nn.Module, adapter: Adapter, plan: PruningPlan,
               out_biases: dict | None = None, out_weights: dict | None = None) -> nn.Module:
    """A new model that is ``model`` pruned as ``plan`` says; ``model`` is not changed.

    With ``out_biases`` (bias compensation) the listed o_proj/down_proj get a bias; with
    ``out_weights`` (refit) their sliced weights are replaced.
    """
    if plan.num_layers != len(adapter.layers(model)):
        raise ValueError(f"plan is for {plan.num_layers} layers, model has "
                         f"{len(adapter.layers(model))}")
    if not built_layers(plan, out_biases):
        raise ValueError("the plan removes every layer")
    config = pruned_config(model.config, plan, out_biases)
    state = sliced_state_dict(model, adapter, plan, out_biases, out_weights)
    dtype = next(model.parameters()).dtype
    with init_empty_weights(include_buffers=False):
        pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
    pruned.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        pruned.tie_weights()
    meta = [n for n, p in pruned.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"pruned model has weights that were not filled: {meta[:5]}")
    pruned.generation_config = model.generation_config
    pruned.eval()
    return pruned.to(input_device(model))
