#!/usr/bin/env python
"""What the constant of an emptied block is worth: one saved run, rebuilt with and without it.

A block that loses every head or channel can leave nothing behind or a constant: its removed
units' calibration-mean contribution, the bias FLAP's code keeps there (``--method flap`` does;
H-GSP's removed blocks get none). For each ``--run`` (a ``results/{output_name}`` folder of
``hgsp prune``) this script loads the base model, measures again what the run measured (the
calibration windows come from the run's own settings; cached importances are reused), takes
the run's pruning plan and builds the pruned model twice, as the run did and with the other
treatment of its emptied blocks; the rest of the model (its compensation biases, or the refit
of H-GSP's narrowed projections) is the same in both. It stops unless the first build has the
saved model's tensors exactly, and scores both on WikiText-2 and PTB at 128 tokens
(``--ppl_max_windows``, 0: the full test sets; needs ``HGSP_DATA_DIR``).

    python benchmarks/emptied_block_constants.py --run results/NAME [--run ...] \\
        [--ppl_max_windows 0] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True,
                   help="a results folder of `hgsp prune` (repeat for several)")
    p.add_argument("--ppl_max_windows", type=int, default=0, help="0: the full test sets")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        "emptied_block_constants.json"))
    return p.parse_args(argv)


def run_config(folder: Path):
    """The PruneConfig, model dtype and pruning plan a results folder was made with."""
    import torch

    from hgsp.config import PruneConfig
    from hgsp.errors import UserError
    from hgsp.plan import PruningPlan

    config_file = folder / "logs" / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder} is not a results folder of `hgsp prune` (no logs/config.json)"
                        ": pass --run results/NAME")
    config = json.loads(config_file.read_text())
    dtype = getattr(torch, config["resolved"]["dtype"].removeprefix("torch."))
    return (PruneConfig(**config["arguments"]), dtype,
            PruningPlan.load(folder / "analysis" / "pruning_plan.json"))


def with_constants(model, adapter, plan, measured, biases: dict | None) -> dict:
    """``biases`` (the run's own, or None) plus a constant for every emptied block."""
    from hgsp.surgery import compensation_biases

    out = {index: dict(kinds) for index, kinds in (biases or {}).items()}
    constants = compensation_biases(model, adapter, plan, measured.stats.mean("attn"),
                                    measured.stats.mean("mlp"), emptied=True)
    for index, kinds in constants.items():
        lp = plan.layers[index]
        for kind, bias in kinds.items():
            if lp.block_removed(kind):
                out.setdefault(index, {})[kind] = bias
    return out


def without_constants(biases: dict | None, plan) -> dict | None:
    """``biases`` less the constants of emptied blocks."""
    if biases is None:
        return None
    out = {}
    for index, kinds in biases.items():
        lp = plan.layers[index]
        kept = {kind: b for kind, b in kinds.items()
                if not lp.block_removed(kind)}
        if kept:
            out[index] = kept
    return out


def both_builds(folder: Path):
    """The run's settings, its two builds (``[(label, model), ...]``, the run's first) and the
    tokenizer."""
    from hgsp.adapters import adapter_for
    from hgsp.data import load_corpus
    from hgsp.modelio import load_model
    from hgsp.pipeline import keeps_constants, measure, output_tensors
    from hgsp.surgery import apply_plan

    cfg, dtype, plan = run_config(folder)
    loaded = load_model(cfg.base_model, dtype)
    model, adapter = loaded.model, adapter_for(loaded.model.config)
    corpus = load_corpus(cfg.dataset, "train", cfg.data_dir)
    _, measured = measure(cfg, model, loaded.tokenizer, adapter, corpus, dtype)
    biases, weights = output_tensors(model, adapter, plan, cfg, measured)
    has_constants = keeps_constants(cfg)
    other = (without_constants(biases, plan) if has_constants
             else with_constants(model, adapter, plan, measured, biases))
    as_run = apply_plan(model, adapter, plan, biases, weights)
    check_saved(as_run, folder / "models")
    builds = [("as run: " + ("constants" if has_constants else "no constants"), as_run),
              ("no constants" if has_constants else "constants",
               apply_plan(model, adapter, plan, other, weights))]
    settings = {"run": str(folder), "method": cfg.method, "pruning_ratio": cfg.pruning_ratio,
                "base_model": cfg.base_model, "dataset": cfg.dataset,
                "num_examples": cfg.num_examples, "seq_len": cfg.seq_len, "seed": cfg.seed,
                "dtype": str(dtype).removeprefix("torch."),
                "emptied_blocks": plan.removed_blocks()}
    return settings, builds, loaded.tokenizer


def check_saved(model, folder: Path) -> None:
    """Stop unless ``model`` has the saved model's tensors exactly: the run was rebuilt."""
    import torch
    from safetensors.torch import load_file

    from hgsp.errors import UserError

    state = model.state_dict()
    files = sorted(folder.glob("*.safetensors"))
    saved = {k: v for f in files for k, v in load_file(f).items()}
    differ = [k for k, v in saved.items() if k not in state or not torch.equal(v, state[k])]
    if not saved or differ:
        raise UserError(f"{folder}: the rebuilt model differs from the saved one "
                        f"({differ[:3] or 'no safetensors'}): rerun the pruning with this "
                        f"version of hgsp, then this script")


def score(model, tokenizer, max_windows: int) -> dict:
    from hgsp.perplexity import perplexity

    return {ds: round(perplexity(model, tokenizer, ds, 128, max_windows or None)["ppl"], 2)
            for ds in ("wikitext2", "ptb")}


def compare(folder: Path, max_windows: int) -> dict:
    settings, builds, tokenizer = both_builds(folder)
    rows = []
    for label, model in builds:
        params = sum(p.numel() for p in model.parameters())
        rows.append({"build": label, "params": params, **score(model, tokenizer, max_windows)})
    return {**settings, "builds": rows}


def main(argv=None) -> int:
    import platform

    import torch
    import transformers

    from hgsp.atomic import atomic_write
    from hgsp.errors import UserError

    args = parse_args(argv)
    try:
        results = [compare(Path(run), args.ppl_max_windows) for run in args.run]
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    doc = {"settings": {"ppl_seq_len": 128, "ppl_max_windows": args.ppl_max_windows or "all"},
           "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                       "torch": torch.__version__, "transformers": transformers.__version__},
           "runs": results}
    atomic_write(Path(args.out), lambda f: f.write_text(json.dumps(doc, indent=1) + "\n"))
    for r in results:
        for b in r["builds"]:
            print(f"{r['run']}: {b['build']}: {b['params']:,} parameters, WikiText-2 "
                  f"{b['wikitext2']}, PTB {b['ptb']} ({len(r['emptied_blocks'])} emptied blocks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
