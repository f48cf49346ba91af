#!/usr/bin/env python
"""Evaluate the dense demo model (or any model) and print a table.

Perplexity on WikiText-2 test, PTB test and the C4 evaluation documents at 128 and 2048
tokens (``--ppl_datasets``, ``--ppl_seq_len``); zero-shot accuracy on the default 4 tasks
(``--zeroshot_limit`` documents per task, all with ``--zeroshot_limit 0``); efficiency figures.

    python benchmarks/bench_eval.py [--model PATH] [--zeroshot_limit 500] [--out FILE]

Needs the evaluation text (``HGSP_DATA_DIR``, e.g. ../shared/data) and ``hgsp fetch-assets
model c4 zeroshot``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def table(doc: dict) -> str:
    res = doc["models"]["model"]
    lines = ["| metric | value |", "|---|---|"]
    for dataset, by_len in res.get("ppl", {}).items():
        for seq_len, r in by_len.items():
            lines.append(f"| {dataset} ppl @{seq_len} ({r['windows']} windows) | {r['ppl']:.3f} |")
    zs = res.get("zeroshot")
    if zs:
        for task, r in zs["tasks"].items():
            norm = "–" if r.get("acc_norm") is None else f"{r['acc_norm']:.4f}"
            lines.append(f"| {task} acc / acc_norm (n={r['n']}) | {r['acc']:.4f} / {norm} |")
        lines.append(f"| zero-shot mean acc | {zs['mean_acc']:.4f} |")
    eff = res.get("efficiency")
    if eff:
        sp = eff["speed"]
        lines += [f"| parameters | {eff['parameters']['total']:,} |",
                  f"| MACs per token (ctx {eff['macs_per_token']['context']}) | "
                  f"{eff['macs_per_token']['total']:,} |",
                  f"| prefill latency, 128 tokens, batch 1 | "
                  f"{1000 * sp['batch1']['prefill_latency_s']:.1f} ms |",
                  f"| decode, batch 1 | {sp['batch1']['decode_tokens_per_s']:.1f} tok/s |",
                  f"| decode, batch 8 | {sp['batch8']['decode_tokens_per_s']:.1f} tok/s |",
                  f"| peak RSS | {eff['peak_memory']['peak_bytes'] / 2**20:.0f} MB |"]
    return "\n".join(lines)


def main() -> int:
    from hgsp.assets import asset_paths
    from hgsp.atomic import atomic_write
    from hgsp.evaluate import evaluate_paths, parse_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(asset_paths()["model"]))
    parser.add_argument("--ppl_datasets", default="wikitext2,ptb,c4")
    parser.add_argument("--ppl_seq_len", default="128,2048")
    parser.add_argument("--zeroshot_tasks", default="default")
    parser.add_argument("--zeroshot_limit", type=int, default=500)
    parser.add_argument("--run", default="ppl,zeroshot,efficiency")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "eval.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = parse_settings(args.run, args.ppl_datasets, args.ppl_seq_len,
                              args.zeroshot_tasks, zeroshot_limit=args.zeroshot_limit or None)
    start = time.perf_counter()
    doc = evaluate_paths(args.model, settings, output=None)
    doc["wall_s"] = time.perf_counter() - start
    atomic_write(Path(args.out), lambda tmp: tmp.write_text(json.dumps(doc, indent=2) + "\n"))
    print(table(doc))
    print(f"\nwall time {doc['wall_s']:.0f} s; {doc['machine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
