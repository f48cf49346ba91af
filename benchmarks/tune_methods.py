#!/usr/bin/env python
"""Quick comparison of methods and H-GSP settings on one model, in one process.

The model is loaded once and measured once (importances and removal analysis from the hgsp
cache, activation statistics); each variant then costs only its selection, the surgery and a
perplexity on the first ``--max_windows`` windows of WikiText-2 and PTB test. This is the
screening tool behind the defaults (see benchmarks/README.md); the full quality benchmark is
``bench_quality.py``.

    python benchmarks/tune_methods.py --ratios 0.2,0.5 --variants default,t0,bc \\
        [--model PATH] [--max_windows 300] [--out FILE]

Variants are named rows of :data:`VARIANTS` (PruneConfig overrides), or ``all``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# Every variant starts from the plain DESIGN.md score (no bias compensation, no block floor)
# with hgsp's other defaults, so that each row shows what its own change does.
PLAIN = {"bias_compensation": False, "block_floor": False, "collapse_scope": "all",
         "importance_norm": "none", "block_delta": "alone", "refit_outputs": False}
# the defaults of screens 7-12, as overrides of PLAIN (the defaults of screens 13-17 add the
# Shapley share: variant norm_block_shapley; the current defaults add the refit of screen 18:
# norm_block_shapley_refit)
CURRENT = {"bias_compensation": True, "block_floor": True, "collapse_scope": "layer_dominant",
           "importance_norm": "block"}
# name -> PruneConfig overrides on top of PLAIN
VARIANTS = {
    "default": {},
    # the defaults before --importance_norm (screen 6); "norm_block" is the current defaults
    "hgsp_defaults": {"bias_compensation": True, "block_floor": True,
                      "collapse_scope": "layer_dominant"},
    "t0": {"temperature": 0.0},
    "tau_inf": {"tau": float("inf")},
    "tau_0": {"tau": 0.0},
    "t0.5": {"temperature": 0.5},
    "t2": {"temperature": 2.0},
    "eps0": {"epsilon": 0.0},
    "eps0.3": {"epsilon": 0.3},
    "bc": {"bias_compensation": True},
    "tau_inf_bc": {"tau": float("inf"), "bias_compensation": True},
    "t0_bc": {"temperature": 0.0, "bias_compensation": True},
    "q50_bc": {"tau_quantile": 0.5, "bias_compensation": True},
    "q75_bc": {"tau_quantile": 0.75, "bias_compensation": True},
    "loss": {"delta_metric": "loss"},
    "loss_bc": {"delta_metric": "loss", "bias_compensation": True},
    "loss_tau_inf_bc": {"delta_metric": "loss", "tau": float("inf"), "bias_compensation": True},
    "tau_inf_eps0": {"tau": float("inf"), "epsilon": 0.0},
    "tau_inf_t0.5": {"tau": float("inf"), "temperature": 0.5},
    "tau_inf_t2": {"tau": float("inf"), "temperature": 2.0},
    "q50": {"tau_quantile": 0.5},
    "floor": {"block_floor": True},
    "floor_bc_ld": {"block_floor": True, "bias_compensation": True,
                    "collapse_scope": "layer_dominant"},
    "floor_t2_bc_ld": {"block_floor": True, "bias_compensation": True, "temperature": 2.0,
                       "collapse_scope": "layer_dominant"},
    "floor_bc": {"block_floor": True, "bias_compensation": True},
    "floor_t2_bc": {"block_floor": True, "bias_compensation": True, "temperature": 2.0},
    "q75": {"tau_quantile": 0.75},
    "norm_layer": {**CURRENT, "importance_norm": "layer"},
    "norm_block": CURRENT,
    "norm_layer_tau_inf": {"bias_compensation": True, "importance_norm": "layer",
                           "tau": float("inf")},
    "norm_block_tau_inf": {"bias_compensation": True, "importance_norm": "block",
                           "tau": float("inf")},
    "norm_layer_plain": {"importance_norm": "layer"},
    "norm_block_nofloor": {**CURRENT, "block_floor": False},
    "norm_block_t2": {**CURRENT, "temperature": 2.0},
    "norm_block_q50": {**CURRENT, "tau_quantile": 0.5},
    "norm_block_nobc": {**CURRENT, "bias_compensation": False},
    "norm_block_plain": {"importance_norm": "block"},
    # screen 9: collapse and the τ quantile on top of the current defaults
    "norm_block_eps0": {**CURRENT, "epsilon": 0.0},
    "norm_block_eps0.05": {**CURRENT, "epsilon": 0.05},
    "norm_block_q50_eps0": {**CURRENT, "tau_quantile": 0.5, "epsilon": 0.0},
    "norm_block_q40": {**CURRENT, "tau_quantile": 0.4},
    "norm_block_q75": {**CURRENT, "tau_quantile": 0.75},
    # screen 13: the Shapley share of the layer's Δ for each block
    "norm_block_shapley": {**CURRENT, "block_delta": "shapley"},
    "norm_block_shapley_q40": {**CURRENT, "block_delta": "shapley", "tau_quantile": 0.4},
    # screen 17: the floor and collapse again, with the share
    "norm_block_shapley_nofloor": {**CURRENT, "block_delta": "shapley", "block_floor": False},
    "norm_block_shapley_eps0": {**CURRENT, "block_delta": "shapley", "epsilon": 0.0},
    # screen 18: the refit of the narrowed output projections (and its ridge strength)
    "norm_block_shapley_refit": {**CURRENT, "block_delta": "shapley", "refit_outputs": True},
    **{f"norm_block_shapley_refit_d{damp}": {**CURRENT, "block_delta": "shapley",
                                             "refit_outputs": True, "refit_damp": damp}
       for damp in (0.01, 0.1, 0.3, 3.0, 10.0)},
    "tau_inf_norm_block_shapley_refit": {**CURRENT, "block_delta": "shapley",
                                         "refit_outputs": True, "tau": float("inf")},
    "llm_pruner": {"method": "llm_pruner"},
    "wanda_sp": {"method": "wanda_sp"},
    "flap": {"method": "flap"},
    "shortgpt": {"method": "shortgpt"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the demo model)")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--variants", default="all")
    p.add_argument("--extra", default="{}", help="JSON overrides applied to every variant")
    p.add_argument("--max_windows", type=int, default=300)
    p.add_argument("--datasets", default="wikitext2,ptb")
    p.add_argument("--dataset", default="c4", help="calibration corpus")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from hgsp.adapters import adapter_for
    from hgsp.assets import asset_paths
    from hgsp.atomic import atomic_write
    from hgsp.config import PruneConfig
    from hgsp.data import load_corpus
    from hgsp.modelio import load_model
    from hgsp.perplexity import perplexity
    from hgsp.pipeline import build_pruned, count_params, decoder_params, measure, \
        removal_budget, score_and_select
    from hgsp.plan import plan_from_selection

    torch.manual_seed(0)
    model_path = args.model or str(asset_paths()["model"])
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    extra = json.loads(args.extra)
    base_cfg = PruneConfig(base_model=model_path, output_name="tune", dataset=args.dataset,
                           bias_compensation=True, **extra)
    loaded = load_model(model_path, torch.float32, "cpu", None)
    model, tok = loaded.model, loaded.tokenizer
    adapter = adapter_for(model.config)
    start = time.perf_counter()
    corpus = load_corpus(args.dataset, "train", base_cfg.data_dir)
    # One measurement serves every variant: hgsp with compensation needs importances,
    # analysis and activation statistics, which is everything any method reads.
    _, measured = measure(base_cfg, model, tok, adapter, corpus, torch.float32)
    print(f"measured in {time.perf_counter() - start:.1f} s", flush=True)
    total, decoder = count_params(model), decoder_params(model, adapter)
    d = adapter.dims()

    def ppl(m):
        return {ds: round(perplexity(m, tok, ds, 128, args.max_windows)["ppl"], 3)
                for ds in args.datasets.split(",")}

    rows = [{"variant": "base", "ratio": 0.0, "params": total, **ppl(model)}]
    print(rows[0], flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        budget = removal_budget(total, decoder, ratio)
        for name in names:
            cfg = dataclasses.replace(base_cfg, **{**PLAIN, **extra, **VARIANTS[name]})
            table, info, sel = score_and_select(measured, adapter, cfg, budget, model)
            plan = plan_from_selection(table, sel, adapter.model_type, d.num_kv_heads,
                                       d.intermediate)
            pruned = build_pruned(model, adapter, plan, cfg, measured)
            row = {"variant": name, "ratio": ratio, "params": count_params(pruned),
                   "layers_kept": len(plan.kept_layers), **ppl(pruned)}
            rows.append(row)
            print(row, flush=True)
    if args.out:
        doc = {"settings": vars(args), "rows": rows}
        atomic_write(Path(args.out), lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
