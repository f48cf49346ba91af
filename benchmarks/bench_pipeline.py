#!/usr/bin/env python
"""Time the pruning pipeline on the demo model, stage by stage.

Measures, each in a fresh child process (so peak memory is that run's own):
1. a full pruning run at the defaults (stage times, peak RSS), with an empty cache;
2. a second run at another ratio that reuses the cached importances and analysis;
3. the removal analysis done the cached way (hgsp.analysis) and the naive way (a full forward
   for each of the 3L+1 variants), on the same windows, alternated ``--analysis_repeats`` times;
   the ratio of the fastest run of each. The naive way is timed twice over: scored with the
   same vocabulary-sliced loss as the cached way (the ratio that isolates the caching), and
   as plain forwards returning full logits, scored by cross-entropy.

    python benchmarks/bench_pipeline.py [--model PATH] [--ratio 0.5] [--out FILE] [--analysis_only]

Writes JSON (default benchmarks/results/pipeline.json) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _child(fn, queue, *args):
    result = fn(*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(result)


def in_child(fn, *args) -> dict:
    """Run ``fn(*args)`` in a spawned process; its return dict gains the child's peak RSS."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def prune_run(model: str, ratio: float, results: str, name: str) -> dict:
    from hgsp.config import PruneConfig
    from hgsp.pipeline import prune

    start = time.perf_counter()
    out = prune(PruneConfig(base_model=model, output_name=name, pruning_ratio=ratio,
                            dataset="c4", results_dir=results, log_level="WARNING"))
    return {"wall_s": time.perf_counter() - start, "stages_s": out.summary["timings_s"],
            "achieved_ratio": out.summary["parameters"]["achieved_ratio_total"],
            "model_fp32_mb": out.summary["parameters"]["base_total"] * 4 / 2 ** 20}


@contextmanager
def _without_layer(model, index):
    layers = model.model.layers
    config = model.config
    saved = (config.num_hidden_layers, getattr(config, "layer_types", None))
    model.model.layers = type(layers)([m for i, m in enumerate(layers) if i != index])
    config.num_hidden_layers -= 1
    if saved[1] is not None:
        config.layer_types = [t for i, t in enumerate(saved[1]) if i != index]
    try:
        yield
    finally:
        model.model.layers = layers
        config.num_hidden_layers = saved[0]
        if saved[1] is not None:
            config.layer_types = saved[1]


def naive_analysis(model, windows, batch_size: int, loss=None) -> list[float]:
    """3L+1 full forwards: the base, each layer skipped, each block zeroed; each scored by
    ``loss(model, ids)``, by default the same vocabulary-sliced loss as the cached way."""
    import torch

    from hgsp.analysis import _removed
    from hgsp.perplexity import sliced_nll

    loss = loss or sliced_nll

    def nll():
        with torch.no_grad():
            return sum(loss(model, ids) for ids in torch.split(windows, batch_size))

    out = [nll()]
    for index, layer in enumerate(list(model.model.layers)):
        with _without_layer(model, index):
            out.append(nll())
        for kind in ("attn", "mlp"):
            with _removed(layer, kind):
                out.append(nll())
    return out


def analysis_run(model_path: str, samples: int, seq_len: int, batch: int,
                 repeats: int) -> dict:
    import math

    import torch

    from hgsp.adapters import adapter_for
    from hgsp.analysis import removal_analysis
    from hgsp.data import build_calibration_set, load_corpus
    from hgsp.modelio import load_model
    from hgsp.perplexity import logits_nll

    loaded = load_model(model_path)
    corpus = load_corpus("c4", "train")
    cal = build_calibration_set(loaded.tokenizer, corpus, 32, seq_len, samples, 42)
    torch.manual_seed(0)
    adapter = adapter_for(loaded.model.config)
    # Alternate the two ways and keep each one's fastest run: on a shared machine the speed
    # drifts by 10-20% over minutes, which one run of each would put into the ratio.
    times: dict[str, list[float]] = {"cached": [], "naive": [], "naive_hf": []}
    for _ in range(repeats):
        start = time.perf_counter()
        cached = removal_analysis(loaded.model, adapter, cal.analysis, batch)
        times["cached"].append(time.perf_counter() - start)
        start = time.perf_counter()
        naive = naive_analysis(loaded.model, cal.analysis, batch)
        times["naive"].append(time.perf_counter() - start)
        start = time.perf_counter()
        naive_analysis_hf = naive_analysis(loaded.model, cal.analysis, batch, logits_nll)
        times["naive_hf"].append(time.perf_counter() - start)
    cached_s, naive_s = min(times["cached"]), min(times["naive"])
    naive_hf_s = min(times["naive_hf"])
    predicted = cal.analysis.shape[0] * (seq_len - 1)
    return {"cached_s": cached_s, "naive_s": naive_s, "ratio": cached_s / naive_s,
            "naive_hf_s": naive_hf_s, "ratio_vs_naive_hf": cached_s / naive_hf_s,
            "same_base_ppl_hf": abs(math.exp(naive_analysis_hf[0] / predicted) -
                                    cached.base_ppl) < 1e-3 * cached.base_ppl,
            "runs_s": times, "variants": 3 * len(adapter.layers(loaded.model)) + 1,
            "same_base_ppl": abs(math.exp(naive[0] / predicted) - cached.base_ppl) < 1e-3 *
            cached.base_ppl, "windows": samples, "seq_len": seq_len}


def main() -> int:
    from hgsp.assets import asset_paths
    from hgsp.atomic import atomic_write

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(asset_paths()["model"]))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--second_ratio", type=float, default=0.3)
    parser.add_argument("--analysis_repeats", type=int, default=2,
                        help="cached/naive analysis timings, alternated; the fastest of each")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    parser.add_argument("--analysis_only", action="store_true",
                        help="rerun only the analysis timings, keeping the rest of --out")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def analysis():
        return in_child(analysis_run, args.model, 16, 128, 8, args.analysis_repeats)

    if args.analysis_only:
        report = {**json.loads(Path(args.out).read_text()), "analysis": analysis()}
    else:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["HGSP_CACHE_DIR"] = str(Path(tmp) / "cache")  # start from an empty cache
            first = in_child(prune_run, args.model, args.ratio, tmp, "first")
            second = in_child(prune_run, args.model, args.second_ratio, tmp, "second")
        report = {"model": args.model, "ratio": args.ratio, "first_run": first,
                  "second_run_other_ratio": {**second, "ratio": args.second_ratio},
                  "analysis": analysis(), "machine": machine(),
                  "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write(Path(args.out), lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    print(table(report))
    return 0


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def table(r: dict) -> str:
    f, s, a = r["first_run"], r["second_run_other_ratio"], r["analysis"]
    rows = ["| run | wall (s) | " + " | ".join(f["stages_s"]) + " | peak RSS (MB) |",
            "|---|---|" + "---|" * len(f["stages_s"]) + "---|"]
    for name, run in ((f"ratio {r['ratio']}, empty cache", f),
                      (f"ratio {s['ratio']}, cached", s)):
        rows.append(f"| {name} | {run['wall_s']:.1f} | " +
                    " | ".join(f"{run['stages_s'].get(k, 0):.1f}" for k in f["stages_s"]) +
                    f" | {run['peak_rss_mb']:.0f} |")
    rows.append("")
    rows.append(f"peak RSS / fp32 model size ({f['model_fp32_mb']:.0f} MB): "
                f"{f['peak_rss_mb'] / f['model_fp32_mb']:.2f} (empty cache), "
                f"{s['peak_rss_mb'] / f['model_fp32_mb']:.2f} (cached)")
    rows.append(f"removal analysis ({a['variants']} variants, {a['windows']}×{a['seq_len']} "
                f"tokens, fastest of {len(a['runs_s']['cached'])} alternated runs): cached "
                f"{a['cached_s']:.1f} s, naive {a['naive_s']:.1f} s, ratio {a['ratio']:.2f}")
    if "naive_hf_s" in a:
        rows.append(f"naive with plain forwards (full logits + cross-entropy) "
                    f"{a['naive_hf_s']:.1f} s, ratio {a['ratio_vs_naive_hf']:.2f}")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
