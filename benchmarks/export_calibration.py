#!/usr/bin/env python
"""Export the calibration windows every method of the quality benchmark is pruned with.

To check a row against the original tool (LLM-Pruner, FLAP, ShortGPT, ...) on the same data,
feed it these windows instead of its own calibration loader. Writes to ``--out_dir``:

- ``calibration.pt``: ``{"calibration": (n, seq_len) int64, "analysis": (m, seq_len) int64}``,
  plain tensors (``torch.load(path, weights_only=True)``);
- ``calibration.jsonl``: one line per window, ``{"split", "index", "input_ids", "text"}``,
  ``index`` being the window's position in the tokenized corpus and ``text`` its decoding;
- ``calibration_meta.json``: the corpus, tokenizer, settings and a SHA-256 of the ids.

    python benchmarks/export_calibration.py [--model PATH] [--dataset c4] \\
        [--num_examples 32] [--seq_len 128] [--analysis_samples 16] [--seed 42] \\
        [--out_dir benchmarks/results/calibration]

The defaults are those of the quality benchmark (``bench_quality.py``: C4 and hgsp's window
settings). The windows are built by the same code as in ``hgsp prune``
(``hgsp.data.build_calibration_set``), so they are the ones the benchmark used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def parse_args(argv=None):
    from hgsp.config import PruneConfig

    defaults = PruneConfig(base_model="-", output_name="-")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the demo model)")
    p.add_argument("--dataset", default="c4", help="calibration corpus (its train split)")
    p.add_argument("--num_examples", type=int, default=defaults.num_examples)
    p.add_argument("--seq_len", type=int, default=defaults.seq_len)
    p.add_argument("--analysis_samples", type=int, default=defaults.analysis_samples)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--data_dir", default=None)
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results" / "calibration"))
    return p.parse_args(argv)


def export(args) -> dict:
    """Build the windows and write the three files (each to a temporary name, then renamed)."""
    import torch
    from transformers import AutoTokenizer

    from hgsp.assets import asset_paths
    from hgsp.atomic import atomic_write
    from hgsp.data import build_calibration_set, load_corpus

    model = args.model or str(asset_paths()["model"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    corpus = load_corpus(args.dataset, "train", args.data_dir)
    cal = build_calibration_set(tokenizer, corpus, args.num_examples, args.seq_len,
                                args.analysis_samples, args.seed)
    ids = {"calibration": cal.calibration.contiguous(), "analysis": cal.analysis.contiguous()}
    digest = hashlib.sha256()
    for name in ("calibration", "analysis"):
        digest.update(ids[name].numpy().tobytes())
    meta = {"model": model, "tokenizer": type(tokenizer).__name__, "corpus": cal.origin,
            "dataset": args.dataset, "num_examples": args.num_examples,
            "seq_len": args.seq_len, "analysis_samples": args.analysis_samples,
            "seed": args.seed, "calibration_windows": cal.calibration_windows,
            "analysis_windows": cal.analysis_windows, "ids_sha256": digest.hexdigest()}
    lines = []
    for name, indices in (("calibration", cal.calibration_windows),
                          ("analysis", cal.analysis_windows)):
        for row, index in zip(ids[name].tolist(), indices):
            lines.append(json.dumps({"split": name, "index": index, "input_ids": row,
                                     "text": tokenizer.decode(row)}))
    out = Path(args.out_dir)
    atomic_write(out / "calibration.pt", lambda p: torch.save(ids, p))
    atomic_write(out / "calibration.jsonl", lambda p: p.write_text("\n".join(lines) + "\n"))
    atomic_write(out / "calibration_meta.json",
                 lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def main(argv=None) -> int:
    from hgsp.errors import UserError

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        meta = export(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.num_examples} calibration and {args.analysis_samples} analysis windows of "
          f"{args.seq_len} tokens from {meta['corpus']} (seed {args.seed}) written to "
          f"{args.out_dir}; ids sha256 {meta['ids_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
