#!/usr/bin/env python
"""Which layers' cuts cost a pruned model its zero-shot accuracy.

For a saved run (a ``results/{output_name}`` folder of ``hgsp prune``) and a few layer regions,
this script builds, per region, a hybrid of the base model and the run: the run's pruned
layers inside the region (a layer the run removed is left out), the base model's full layers
everywhere else. Each hybrid is scored on the zero-shot tasks, so the accuracy each region's
cuts cost can be set against the parameters they removed. The regions' costs need not add up
to the whole run's (the cuts interact); the run itself is scored as the row ``all``.

    python benchmarks/region_cost.py --run results/NAME --regions 0-11,12-19,20-29 \\
        [--tasks arc_easy] [--zeroshot_limit 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # emptied_block_constants


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a results folder of `hgsp prune`")
    p.add_argument("--regions", required=True,
                   help="comma-separated layer ranges of the base model, e.g. 0-11,12-19,20-29")
    p.add_argument("--tasks", default="arc_easy", help="zero-shot tasks (comma-separated)")
    p.add_argument("--zeroshot_limit", type=int, default=0, help="documents per task; 0: all")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "region_cost.json"))
    return p.parse_args(argv)


def parse_regions(spec: str, num_layers: int) -> dict[str, list[int]]:
    """``"0-11,12"`` -> ``{"0-11": [0..11], "12": [12]}``, checked against the model depth."""
    from hgsp.errors import UserError

    regions = {}
    for part in filter(None, (s.strip() for s in spec.split(","))):
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise UserError(f"--regions: '{part}' is not a layer range such as 0-11") from None
        if not 0 <= first <= last < num_layers:
            raise UserError(f"--regions: '{part}' is outside the model's layers 0-"
                            f"{num_layers - 1}")
        regions[part] = list(range(first, last + 1))
    if not regions:
        raise UserError("--regions is empty: give layer ranges such as 0-11,12-19")
    return regions


def hybrid_model(base, pruned, plan, region: list[int]):
    """A copy of ``base`` whose layers in ``region`` are ``pruned``'s (removed ones left out).

    ``pruned``'s layers follow the plan's kept layers in order. The hybrid runs without a KV
    cache (it is only scored, and its layers come from two models with their own cache slots).
    """
    pruned_at = {lp.index: j for j, lp in enumerate(plan.kept_layers)}
    model = copy.deepcopy(base)
    layers, kept = [], []  # the hybrid's layers and the base indices they stand for
    for i, layer in enumerate(model.model.layers):
        if i in region and i not in pruned_at:
            continue
        layers.append(copy.deepcopy(pruned.model.layers[pruned_at[i]]) if i in region else layer)
        kept.append(i)
    model.model.layers = type(model.model.layers)(layers)
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    model.config.use_cache = False
    return model.eval()


def removed_params(base, model) -> int:
    from hgsp.pipeline import count_params

    return count_params(base) - count_params(model)


def score(model, tokenizer, tasks: list[str], limit: int | None) -> dict:
    from hgsp.zeroshot import run_zeroshot

    start = time.perf_counter()
    result = run_zeroshot(model, tokenizer, tasks, limit=limit)
    return {"tasks": {name: {"acc": t["acc"], "acc_norm": t["acc_norm"], "n": t["n"]}
                      for name, t in result["tasks"].items()},
            "mean_acc": result["mean_acc"], "seconds": round(time.perf_counter() - start, 1)}


def main(argv=None) -> int:
    from hgsp.errors import UserError

    args = parse_args(argv)
    try:
        return _run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import logging

    from emptied_block_constants import run_config

    from hgsp.atomic import atomic_write
    from hgsp.modelio import load_model

    run = Path(args.run)
    config, dtype, plan = run_config(run)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    base = load_model(config.base_model, dtype)
    pruned = load_model(str(run / "models"), dtype)
    regions = {"none": [], **parse_regions(args.regions, plan.num_layers),
               "all": list(range(plan.num_layers))}
    tasks = [t for t in args.tasks.split(",") if t]
    rows = {}
    for name, region in regions.items():
        model = hybrid_model(base.model, pruned.model, plan, region)
        rows[name] = {"layers": region, "removed_params": removed_params(base.model, model),
                      **score(model, base.tokenizer, tasks, args.zeroshot_limit or None)}
        logging.info("%s: removed %d parameters, mean acc %.4f", name,
                     rows[name]["removed_params"], rows[name]["mean_acc"])
        doc = {"run": str(run), "tasks": tasks, "zeroshot_limit": args.zeroshot_limit,
               "regions": rows}
        atomic_write(Path(args.out), lambda tmp: tmp.write_text(json.dumps(doc, indent=1)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
