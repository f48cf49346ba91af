"""``--round_to N``: MLP widths that are multiples of N, for faster matrix kernels.

Instead of rounding a finished selection (and then repairing the budget), the MLP channels
of each layer are bundled, lowest score first, into chunks of N, and the global selection
runs on chunks: whatever it removes from a layer is a whole number of chunks, so the kept
width stays a multiple of N. When the width is not a multiple of N, the first (lowest-score)
chunk holds the remainder, so the kept width is still a multiple of N unless the block goes.
KV groups are left as they are: each is already ``head_dim`` rows, a kernel-friendly size.

A chunk's importance and cost are the sums of its channels', its Δ is the layer's, and its
score is the cost-weighted mean of theirs (= ΣI / Σcost · ln(1+Δ)^T).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scoring import MLP, GroupTable


@dataclass
class Chunking:
    """A coarser table and, for every row of the original table, the chunk row it is in."""

    table: GroupTable
    row_to_chunk: torch.Tensor

    def expand(self, chunk_selected: torch.Tensor) -> torch.Tensor:
        return chunk_selected[self.row_to_chunk]


def chunk_mlp_channels(table: GroupTable, n: int) -> Chunking:
    """Bundle each layer's MLP channels into chunks of ``n`` (lowest scores together)."""
    if n < 1:
        raise ValueError("round_to must be >= 1")
    rows = len(table)
    is_mlp = table.kind == MLP
    mlp_rows = torch.nonzero(is_mlp).flatten()
    # Sort MLP rows by (layer, score): stable sort by score, then stable sort by layer.
    by_score = mlp_rows[torch.sort(table.score[mlp_rows], stable=True).indices]
    ordered = by_score[torch.sort(table.layer[by_score], stable=True).indices]
    layer = table.layer[ordered]
    counts = torch.bincount(layer)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(ordered.numel()) - starts[layer]
    offset = (n - counts[layer] % n) % n  # the remainder goes into the first chunk
    local = (position + offset) // n
    chunks_per_layer = (counts + (n - counts % n) % n) // n
    chunk_start = torch.cumsum(chunks_per_layer, 0) - chunks_per_layer
    mlp_chunk = chunk_start[layer] + local  # global MLP chunk id

    attn_rows = torch.nonzero(~is_mlp).flatten()
    n_attn, n_chunks = attn_rows.numel(), int(chunks_per_layer.sum())
    row_to_chunk = torch.empty(rows, dtype=torch.long)
    row_to_chunk[attn_rows] = torch.arange(n_attn)
    row_to_chunk[ordered] = n_attn + mlp_chunk

    def summed(values):
        out = torch.zeros(n_attn + n_chunks, dtype=values.dtype)
        return out.index_add_(0, row_to_chunk, values)

    cost = summed(table.cost)
    weighted = summed(table.score * table.cost.double())
    first_row = torch.full((n_attn + n_chunks,), rows, dtype=torch.long)
    first_row.scatter_reduce_(0, row_to_chunk, torch.arange(rows), reduce="amin")
    chunked = GroupTable(
        layer=table.layer[first_row], kind=table.kind[first_row],
        index=torch.cat([table.index[attn_rows], torch.arange(n_chunks) -
                         chunk_start.repeat_interleave(chunks_per_layer)]),
        importance=summed(table.importance), cost=cost, delta=table.delta[first_row],
        score=weighted / cost.double())
    return Chunking(chunked, row_to_chunk)
