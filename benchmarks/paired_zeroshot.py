#!/usr/bin/env python
"""Paired zero-shot comparison of two evaluated models on the same documents.

    python benchmarks/paired_zeroshot.py A.json B.json [--metric acc_norm] [--names A,B]

Each input is an evaluation file (``hgsp eval --output``, ``benchmarks/bench_eval.py --out``,
or ``results/NAME/evaluation/evaluation_results.json``), or a run's results folder; add
``:KEY`` to pick one of its models (``base``, ``pruned``, ``finetuned``, ``model``), e.g.
``results/demo_0.5:base``. Without a key the file's only zero-shot result is taken, or its
``pruned`` one. ``A1.json+A2.json`` joins the tasks of one model scored in separate runs.
Prints a Markdown table: per task the accuracies, their difference, its standard error from
the per-document differences and McNemar's exact p; then the difference of the task means.
``--out`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hgsp.atomic import atomic_write  # noqa: E402
from hgsp.errors import UserError  # noqa: E402
from hgsp.paired import markdown, merge_results, paired_zeroshot  # noqa: E402


def load_zeroshot(spec: str) -> tuple[dict, str]:
    """The ``zeroshot`` result named by ``FILE_OR_FOLDER[:KEY]`` (or several joined by ``+``)
    and a label for it."""
    if "+" in spec:
        parts = [load_zeroshot(part) for part in spec.split("+")]
        labels = [label for _, label in parts]
        return merge_results([r for r, _ in parts], labels), "+".join(labels)
    path_text, key = spec, ""
    head, sep, tail = spec.rpartition(":")
    if sep and head and "/" not in tail:
        path_text, key = head, tail
    path = Path(path_text)
    if path.is_dir():
        path = path / "evaluation" / "evaluation_results.json"
    if not path.is_file():
        raise UserError(f"no evaluation file at {path}: give an evaluation JSON or a results "
                        f"folder evaluated with --run_evaluation zeroshot")
    try:
        models = json.loads(path.read_text())["models"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not an hgsp evaluation file ({exc}): give the JSON "
                        f"written by hgsp eval or --run_evaluation") from None
    scored = [k for k, v in models.items() if isinstance(v, dict) and v.get("zeroshot")]
    if key:
        if key not in scored:
            raise UserError(f"{path} has no zero-shot result for '{key}': it has "
                            f"{', '.join(scored) or 'none'}")
    elif len(scored) == 1:
        key = scored[0]
    elif "pruned" in scored:
        key = "pruned"
    else:
        raise UserError(f"{path} has no zero-shot result: evaluate with --run zeroshot")
    return models[key]["zeroshot"], f"{path.parent.name}/{path.name}:{key}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", help="first model: evaluation file or results folder [:KEY]")
    parser.add_argument("b", help="second model: evaluation file or results folder [:KEY]")
    parser.add_argument("--metric", default="acc", choices=["acc", "acc_norm"])
    parser.add_argument("--names", default=None, help="column names of the two models, A,B")
    parser.add_argument("--out", default=None, help="also write the comparison as JSON here")
    args = parser.parse_args()
    try:
        (res_a, label_a), (res_b, label_b) = load_zeroshot(args.a), load_zeroshot(args.b)
        names = tuple(args.names.split(",", 1)) if args.names else ("a", "b")
        if len(names) != 2:
            raise UserError(f"--names needs two comma-separated names, got '{args.names}'")
        result = paired_zeroshot(res_a, res_b, args.metric, labels=(label_a, label_b))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["inputs"] = {"a": label_a, "b": label_b}
    print(f"a = {label_a}\nb = {label_b}\nmetric: {args.metric}\n")
    print(markdown(result, names))
    if args.out:
        atomic_write(Path(args.out), lambda tmp: tmp.write_text(json.dumps(result, indent=2)
                                                                + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
