#!/usr/bin/env python
"""Inference speed of the demo model against its pruned versions, in one process.

Prunes the demo model at each ratio (default 0.2 and 0.5, H-GSP defaults, calibration on the
C4 sample; importances are computed once and cached), then measures the base and every pruned
model with :func:`hgsp.efficiency.efficiency`: prefill latency and decode tokens/s at batch 1
and 8, MACs per token, parameters, peak memory, every model ``--passes`` times in
alternating order (the median of each speed figure kept, the peak memory of
the largest pass). Optional ``--round_to`` variants measure
kernel-friendly widths.

    python benchmarks/bench_speed.py [--ratios 0.2,0.5] [--round_to 0,8] [--passes 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def prune_variants(model: str, ratios, round_tos, workdir: Path) -> dict:
    """Result folders by label, e.g. ``{"hgsp 50%": Path}``."""
    import dataclasses

    from hgsp.config import PruneConfig
    from hgsp.pipeline import prune

    base_cfg = PruneConfig(base_model=model, output_name="x", dataset="c4",
                           results_dir=str(workdir), log_level="WARNING")
    folders = {}
    for ratio in ratios:
        for round_to in round_tos:
            extra = {"round_to": round_to} if round_to else {}
            label = f"{ratio:.0%}" + (f" round_to {round_to}" if round_to else "")
            name = f"r{ratio}_k{round_to}"
            prune(dataclasses.replace(base_cfg, pruning_ratio=ratio, output_name=name, **extra))
            folders[label] = workdir / name / "models"
    return folders


def measure(model_path: str, folders: dict, batch_sizes, repeats: int, passes: int = 1) -> dict:
    """Efficiency of the base and every pruned model, each timed ``passes`` times.

    The passes go forward, backward, forward, ... over the models so that a drift of the
    machine's speed during the run does not favour the models timed first; each speed figure is
    the median of its passes (:func:`hgsp.efficiency.median_of_passes`).
    """
    from tqdm import tqdm

    from hgsp.efficiency import efficiency, median_of_passes, pass_orders, ratios
    from hgsp.modelio import load_model

    paths = {"base": model_path, **{label: str(folder) for label, folder in folders.items()}}
    runs: dict[str, list[dict]] = {label: [] for label in paths}
    for p, labels in enumerate(pass_orders(paths, passes)):
        for label in tqdm(labels, desc=f"timing, pass {p + 1}/{passes}"):
            model = load_model(paths[label]).model
            runs[label].append(efficiency(model, paths[label], batch_sizes=batch_sizes,
                                          repeats=repeats))
            del model
            gc.collect()
    out = {label: median_of_passes(results) for label, results in runs.items()}
    for label, res in out.items():
        if label != "base":
            res["ratios"] = ratios(res, out["base"])
    return out


def table(results: dict) -> str:
    lines = ["| model | params (M) | MACs/token (M) | prefill b1 (ms) | decode b1 (tok/s) | "
             "decode b8 (tok/s) | decode b1 speed-up |", "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        sp = r["speed"]
        speedup = r.get("ratios", {}).get("batch1_decode_speedup", 1.0)
        lines.append(f"| {label} | {r['parameters']['total'] / 1e6:.1f} | "
                     f"{r['macs_per_token']['total'] / 1e6:.1f} | "
                     f"{1000 * sp['batch1']['prefill_latency_s']:.1f} | "
                     f"{sp['batch1']['decode_tokens_per_s']:.1f} | "
                     f"{sp['batch8']['decode_tokens_per_s']:.1f} | {speedup:.2f}× |")
    return "\n".join(lines)


def parse_variants(parser, ratios: str, round_to: str):
    """The pruning ratios and ``--round_to`` values to measure; a bad one stops the script
    with a one-line error (exit 2) before anything is pruned."""
    from hgsp.errors import UserError
    from hgsp.sweep import parse_ratios

    try:
        parsed = parse_ratios(ratios, "--ratios")
    except UserError as exc:
        parser.error(str(exc))
    try:
        round_tos = [int(k) for k in round_to.split(",")]
    except ValueError:
        round_tos = [-1]
    if any(k < 0 for k in round_tos):
        parser.error(f"--round_to '{round_to}' must be a comma-separated list of whole numbers "
                     "≥ 0, e.g. 0,8 (0 = no rounding)")
    return parsed, round_tos


def main() -> int:
    import torch

    from hgsp.assets import asset_paths
    from hgsp.atomic import atomic_write

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(asset_paths()["model"]))
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--round_to", default="0", help="comma list; 0 = no rounding")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3,
                        help="times every model is measured, in alternating order; the median "
                             "of the passes is reported")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.passes < 1:
        parser.error(f"--passes must be at least 1, got {args.passes}")
    ratios, round_tos = parse_variants(parser, args.ratios, args.round_to)
    with tempfile.TemporaryDirectory() as tmp:
        folders = prune_variants(args.model, ratios, round_tos, Path(tmp))
        results = measure(args.model, folders, (1, 8), args.repeats, args.passes)
    report = {"model": args.model, "results": results,
              "settings": {"prompt_len": 128, "new_tokens": 32, "batch_sizes": [1, 8],
                           "repeats": args.repeats, "passes": args.passes,
                           "dtype": "float32"},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write(Path(args.out), lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
