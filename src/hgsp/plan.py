"""The pruning plan: the whole decision as data (DESIGN.md §6).

A plan lists, for every layer of the base model, the KV heads and MLP channels it keeps and
whether its attention block, MLP block or the whole layer is removed. Applying the same plan
to the same base model reproduces the pruned model exactly (:func:`hgsp.surgery.apply_plan`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import UserError
from .scoring import ATTN, MLP, GroupTable
from .selection import Selection

PLAN_FORMAT = "hgsp-plan-v1"


@dataclass
class LayerPlan:
    """What one base-model layer keeps. Empty lists mean the block is removed."""

    index: int
    kept_kv_heads: list[int]
    kept_channels: list[int]

    @property
    def attn_removed(self) -> bool:
        return not self.kept_kv_heads

    @property
    def mlp_removed(self) -> bool:
        return not self.kept_channels

    @property
    def removed(self) -> bool:
        return self.attn_removed and self.mlp_removed

    def block_removed(self, kind: str) -> bool:
        """Whether the ``"attn"`` or ``"mlp"`` block lost all its units."""
        return self.attn_removed if kind == "attn" else self.mlp_removed


@dataclass
class PruningPlan:
    """The decision for a whole model, with the base sizes it refers to."""

    base_model_type: str
    num_layers: int
    num_kv_heads: int
    intermediate_size: int
    layers: list[LayerPlan]
    meta: dict = field(default_factory=dict)

    @property
    def kept_layers(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if not lp.removed]

    def removed_blocks(self) -> list[str]:
        """Every block that lost all its units, as ``"layer.kind"`` (``"3.attn"``)."""
        return [f"{lp.index}.{kind}" for lp in self.layers for kind in ("attn", "mlp")
                if lp.block_removed(kind)]

    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, **asdict(self)}

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict) -> "PruningPlan":
        if data.get("format") != PLAN_FORMAT:
            raise UserError(f"not an hgsp pruning plan (format {data.get('format')!r}, "
                            f"expected {PLAN_FORMAT!r})")
        layers = [LayerPlan(**lp) for lp in data["layers"]]
        fields = {k: data[k] for k in ("base_model_type", "num_layers", "num_kv_heads",
                                       "intermediate_size")}
        return cls(layers=layers, meta=data.get("meta", {}), **fields)

    @classmethod
    def load(cls, path: Path) -> "PruningPlan":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"cannot read pruning plan '{path}': {exc}") from None


def plan_from_selection(table: GroupTable, selection: Selection, base_model_type: str,
                        num_kv_heads: int, intermediate_size: int) -> PruningPlan:
    """Turn the selected rows of a group table into per-layer kept indices."""
    n_layers = len(selection.attn_removed)
    keep = ~selection.selected
    layers = []
    for layer in range(n_layers):
        in_layer = keep & (table.layer == layer)
        heads = table.index[in_layer & (table.kind == ATTN)]
        channels = table.index[in_layer & (table.kind == MLP)]
        layers.append(LayerPlan(layer, sorted(heads.tolist()), sorted(channels.tolist())))
    return PruningPlan(base_model_type, n_layers, num_kv_heads, intermediate_size, layers)


def uniform_plan(base_model_type: str, num_layers: int, num_kv_heads: int,
                 intermediate_size: int) -> PruningPlan:
    """A plan that keeps everything (the identity): a starting point for hand-made plans."""
    layers = [LayerPlan(i, list(range(num_kv_heads)), list(range(intermediate_size)))
              for i in range(num_layers)]
    return PruningPlan(base_model_type, num_layers, num_kv_heads, intermediate_size, layers)


def as_index(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)
