#!/usr/bin/env python
"""Run ShortGPT's own code on the benchmark's calibration windows and compare its choice with
``hgsp prune --method shortgpt``.

The authors' code (https://github.com/icip-cas/ShortGPT, folder ``shortgpt/``; checked with
commit 9a2ee8d) is not part of this project: clone it and pass that folder. This script imports its ``ShortGPT`` class, which
loads the model as the authors do (``device_map="auto"``, float16), and feeds every calibration
window through the class's own ``compute_bi`` (batch 1, as its ``run_shortgpt.py``); it calls
the model itself instead of ``eval_importance``, which would re-tokenize decoded text and sends
its inputs to ``"cuda"``. Each ``--dtypes`` entry is one run (``float32`` casts the model after
loading). hgsp's Block Influence is measured on the same windows by the code ``hgsp prune``
uses, and for every ``--ratios`` entry the layers hgsp removes are compared with ShortGPT's
lowest-scoring layers of the same count. The result also records, per layer, the share of
tokens whose input and output hidden-state norms multiply past float16's largest value (in
float32): where the authors' cosine overflows in float16. With ``--evaluate`` every distinct choice is pruned
(whole layers removed, nothing else) and scored on WikiText-2 and PTB at 128 tokens
(``--ppl_max_windows``, 0: the full test sets; needs the evaluation text, ``HGSP_DATA_DIR``).

    git clone https://github.com/icip-cas/ShortGPT /path/ShortGPT
    python benchmarks/reference_shortgpt.py --shortgpt_dir /path/ShortGPT/shortgpt \\
        [--model PATH] [--calibration benchmarks/results/calibration/calibration.pt] \\
        [--dtypes float32,float16] [--ratios 0.2,0.5] [--batch_size 4] \\
        [--evaluate [--ppl_max_windows 0]] [--out FILE]
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
    p.add_argument("--shortgpt_dir", required=True,
                   help="the shortgpt/ folder of a clone of icip-cas/ShortGPT")
    exported_windows.add_arguments(p)
    p.add_argument("--dtypes", default="float32,float16",
                   help="one reference run per dtype (the authors' code loads float16)")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--batch_size", type=int, default=4, help="hgsp's measurement only")
    p.add_argument("--evaluate", action="store_true",
                   help="prune each distinct choice and measure its perplexity")
    p.add_argument("--ppl_max_windows", type=int, default=0,
                   help="128-token windows per test set with --evaluate (0: all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reference_shortgpt.json"))
    return p.parse_args(argv)


def import_shortgpt(folder: str):
    """The ``ShortGPT`` class of the authors' ``shortgpt.py`` (which imports its ``metrics``)."""
    from hgsp.errors import UserError

    path = Path(folder).expanduser().resolve()
    if not (path / "shortgpt.py").is_file() or not (path / "metrics.py").is_file():
        raise UserError(f"--shortgpt_dir '{folder}' has no shortgpt.py and metrics.py: pass the "
                        "shortgpt/ folder of a clone of https://github.com/icip-cas/ShortGPT")
    # modules of these names imported before (another clone) must not be reused
    for name in ("shortgpt", "metrics"):
        sys.modules.pop(name, None)
    sys.path.insert(0, str(path))
    try:
        import shortgpt
    finally:
        sys.path.remove(str(path))
    return shortgpt.ShortGPT


def reference_scores(shortgpt_class, model_dir: str, ids, dtype: str) -> list[float]:
    """The authors' summed Block Influence of every layer over the windows ``ids``."""
    import torch

    sg = shortgpt_class(model_dir, "model.layers", n_prune_layers=None)
    sg.model.to(getattr(torch, dtype))
    with torch.inference_mode():
        for window in ids:
            out = sg.model(input_ids=window[None].to(sg.model.device), output_hidden_states=True)
            sg.compute_bi(out.hidden_states)
    return [float(v) for v in sg.importances]


def hgsp_scores(model_dir: str, ids, batch_size: int):
    """hgsp's Block Influence per layer, the parameters of one layer and the total."""
    import torch

    from hgsp.activations import collect_activation_stats
    from hgsp.adapters import adapter_for
    from hgsp.baselines import block_influence
    from hgsp.modelio import load_model

    model = load_model(model_dir, dtype=torch.float32).model
    adapter = adapter_for(model.config)
    stats = collect_activation_stats(model, adapter, ids, batch_size)
    bi = block_influence(stats.cosine_sum, stats.tokens)
    layer_params = sum(p.numel() for p in adapter.layers(model)[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    return bi, layer_params, total


def float16_overflow(model_dir: str, ids, batch_size: int) -> list[float]:
    """Per layer, the share of tokens whose input and output hidden-state norms (in float32)
    multiply past float16's largest value: there the product in the authors' cosine is inf."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    limit = torch.finfo(torch.float16).max
    counts = 0
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            hidden = model(input_ids=ids[start:start + batch_size],
                           output_hidden_states=True).hidden_states
            norms = [h.norm(dim=-1) for h in hidden]
            counts = counts + torch.stack([(norms[i] * norms[i + 1] > limit).sum()
                                           for i in range(len(norms) - 1)])
    return [round(c / ids.numel(), 4) for c in counts.tolist()]


def lowest_layers(scores, count: int) -> list[int]:
    """The ``count`` lowest-scoring layers, as the authors' ``remove_layers`` picks them."""
    import numpy as np

    return sorted(int(i) for i in np.argsort(np.array(scores))[:count])


def removal_perplexity(model_dir: str, removed: list[int], max_windows: int) -> dict:
    """WikiText-2 and PTB perplexity at 128 tokens of the model without the layers ``removed``."""
    import torch

    from hgsp.adapters import adapter_for
    from hgsp.modelio import load_model
    from hgsp.perplexity import perplexity
    from hgsp.plan import uniform_plan
    from hgsp.surgery import apply_plan

    loaded = load_model(model_dir, dtype=torch.float32)
    adapter = adapter_for(loaded.model.config)
    d = adapter.dims()
    plan = uniform_plan(adapter.model_type, d.num_layers, d.num_kv_heads, d.intermediate)
    for index in removed:
        plan.layers[index].kept_kv_heads, plan.layers[index].kept_channels = [], []
    pruned = apply_plan(loaded.model, adapter, plan)
    return {ds: round(perplexity(pruned, loaded.tokenizer, ds, 128, max_windows or None)["ppl"], 2)
            for ds in ("wikitext2", "ptb")}


def evaluate_choices(result: dict, model_dir: str, max_windows: int) -> list[dict]:
    """Perplexity of every distinct set of removed layers in ``result`` (each scored once)."""
    choices = [result["hgsp"]["removed"]] + [run["removed"]
                                             for run in result["shortgpt_code"].values()]
    scored: dict[tuple, dict] = {}
    for by_ratio in choices:
        for removed in by_ratio.values():
            if tuple(removed) not in scored:
                scored[tuple(removed)] = removal_perplexity(model_dir, removed, max_windows)
    return [{"removed": list(k), "ppl_max_windows": max_windows, **v} for k, v in scored.items()]


def compare(shortgpt_class, model_dir: str, ids, dtypes: list[str], ratios: list[float],
            batch_size: int) -> dict:
    from hgsp.methods import shortgpt_layers
    from hgsp.pipeline import removal_budget

    bi, layer_params, total = hgsp_scores(model_dir, ids, batch_size)
    decoder = layer_params * bi.numel()
    hgsp_removed = {r: shortgpt_layers(bi, layer_params, removal_budget(total, decoder, r))
                    for r in ratios}
    tokens = ids.numel()
    runs = {}
    for dtype in dtypes:
        scores = reference_scores(shortgpt_class, model_dir, ids, dtype)
        runs[dtype] = {
            "block_influence": [round(s / tokens, 6) for s in scores],
            "order": [int(i) for i in sorted(range(len(scores)), key=scores.__getitem__)],
            "removed": {str(r): lowest_layers(scores, len(hgsp_removed[r])) for r in ratios},
        }
        runs[dtype]["same_as_hgsp"] = {str(r): runs[dtype]["removed"][str(r)] == hgsp_removed[r]
                                       for r in ratios}
    return {"float16_norm_product_overflow": float16_overflow(model_dir, ids, batch_size),
            "hgsp": {"block_influence": [round(v, 6) for v in bi.tolist()],
                     "order": sorted(range(bi.numel()), key=lambda i: bi[i].item()),
                     "removed": {str(r): hgsp_removed[r] for r in ratios}},
            "shortgpt_code": runs}


def main(argv=None) -> int:
    import torch
    import transformers

    import exported_windows

    from hgsp.atomic import atomic_write
    from hgsp.errors import UserError

    args = parse_args(argv)
    try:
        shortgpt_class = import_shortgpt(args.shortgpt_dir)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model_dir = exported_windows.model_dir(args)
    ids, header = exported_windows.load_windows(args, model_dir)
    ratios = [float(r) for r in args.ratios.split(",")]
    result = compare(shortgpt_class, model_dir, ids, args.dtypes.split(","), ratios,
                     args.batch_size)
    if args.evaluate:
        result["perplexity"] = evaluate_choices(result, model_dir, args.ppl_max_windows)
    result = {**header, "torch": torch.__version__, "transformers": transformers.__version__,
              **result}
    for r in ratios:
        print(f"ratio {r}: hgsp removes {result['hgsp']['removed'][str(r)]}")
        for dtype, run in result["shortgpt_code"].items():
            print(f"  ShortGPT's code in {dtype}: {run['removed'][str(r)]} "
                  f"({'same' if run['same_as_hgsp'][str(r)] else 'different'})")
    for row in result.get("perplexity", []):
        print(f"without layers {row['removed']}: WikiText-2 {row['wikitext2']}, PTB {row['ptb']}")
    atomic_write(Path(args.out), lambda f: f.write_text(json.dumps(result, indent=1) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
