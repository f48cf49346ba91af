#!/usr/bin/env python
"""How often LLM-Pruner's way of scoring a KV group changes which group it removes.

hgsp scores a KV group with the query heads that share its KV head (``h*r .. h*r+r-1`` for
``r`` query heads per KV head, as transformers' ``repeat_kv`` pairs them). LLM-Pruner's
``llama3.py`` folds the ``q_proj`` rows and ``o_proj`` columns onto the KV heads by position,
so KV head ``h`` is scored with query heads ``h, h+k, h+2k, ...`` (``k`` KV heads). This script
computes first-order Taylor scores (``|w·g|``, summed) on the quality benchmark's calibration
windows and counts, over LLM-Pruner's layer range, the layers where the ``n`` lowest groups
differ between the two, for every ``n`` from 1 to ``k - 1``.

    python benchmarks/llm_pruner_grouping.py [--model PATH] \\
        [--calibration benchmarks/results/calibration/calibration.pt] [--batch_size 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # exported_windows


def parse_args(argv=None):
    import exported_windows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    exported_windows.add_arguments(p)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_pruner_grouping.json"))
    return p.parse_args(argv)


def head_scores(attn, n_q: int, n_kv: int, head_dim: int):
    """Taylor score of every KV head (k and v rows) and of every query head (q rows, o columns)."""
    s = {n: (getattr(attn, n).weight * getattr(attn, n).weight.grad).abs()
         for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    kv = (s["k_proj"].sum(1) + s["v_proj"].sum(1)).view(n_kv, head_dim).sum(1)
    query = (s["q_proj"].sum(1) + s["o_proj"].sum(0)).view(n_q, head_dim).sum(1)
    return kv, query


def group_scores(kv, query, folded: bool):
    """KV-group scores: each KV head plus its query heads, those that share it (hgsp) or, with
    ``folded``, those at its position modulo the KV-head count (LLM-Pruner's ``llama3.py``)."""
    n_kv = kv.numel()
    if folded:
        return kv + query.view(-1, n_kv).sum(0)
    return kv + query.view(n_kv, -1).sum(1)


def compare(model, ids, batch_size: int) -> dict:
    import torch

    from hgsp.adapters import adapter_for
    from hgsp.methods import llm_pruner_range

    adapter = adapter_for(model.config)
    d, layers = adapter.dims(), adapter.layers(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers:
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer.self_attn, n).weight.requires_grad_(True)
    for i in range(0, ids.shape[0], batch_size):  # gradients summed over batches, as hgsp does
        model(input_ids=ids[i:i + batch_size], labels=ids[i:i + batch_size]).loss.backward()
    start, stop = llm_pruner_range(len(layers))
    differ = {n: [] for n in range(1, d.num_kv_heads)}
    for li in range(start, stop):
        kv, query = head_scores(layers[li].self_attn, d.num_heads, d.num_kv_heads, d.head_dim)
        shared, folded = group_scores(kv, query, False), group_scores(kv, query, True)
        for n in differ:
            if set(torch.argsort(shared)[:n].tolist()) != set(torch.argsort(folded)[:n].tolist()):
                differ[n].append(li)
    return {"layers": [start, stop - 1], "differ": {str(n): v for n, v in differ.items()}}


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    import exported_windows

    from hgsp.atomic import atomic_write

    args = parse_args(argv)
    model_dir = exported_windows.model_dir(args)
    ids, header = exported_windows.load_windows(args, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    result = {**header, **compare(model, ids, args.batch_size)}
    n_layers = result["layers"][1] - result["layers"][0] + 1
    for n, where in result["differ"].items():
        print(f"{n} lowest KV group(s) differ in {len(where)} of {n_layers} layers: {where}")
    atomic_write(Path(args.out), lambda f: f.write_text(json.dumps(result, indent=1) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
