#!/usr/bin/env python
"""How often LLM-Pruner's way of scoring a KV group changes which group it removes.

hgsp scores a KV group with the query heads that share its KV head (``h*r .. h*r+r-1`` for
``r`` query heads per KV head, as transformers' ``repeat_kv`` pairs them). LLM-Pruner's
``llama3.py`` folds the ``q_proj`` rows and ``o_proj`` columns onto the KV heads by position,
so KV head ``h`` is scored with query heads ``h, h+k, h+2k, ...`` (``k`` KV heads). This script
computes first-order Taylor scores (``|w·g|``, summed) on the quality benchmark's calibration
windows and counts, over LLM-Pruner's layer range, the layers where the ``n`` lowest groups
differ between the two, for every ``n`` from 1 to ``k - 1``.

With ``--evaluate RUN`` (a results folder of ``hgsp prune --method llm_pruner`` calibrated on
the same windows; repeat for several) it also prices the difference: it checks that hgsp's
grouping of these scores removes the run's KV groups in every layer, swaps in the groups the
folded scores would remove (the same number per layer; the MLP channels stay the run's), and
scores both models on WikiText-2 and PTB at 128 tokens (``--ppl_max_windows``, 0: the full
test sets; needs ``HGSP_DATA_DIR``).

    python benchmarks/llm_pruner_grouping.py [--model PATH] \\
        [--calibration benchmarks/results/calibration/calibration.pt] [--batch_size 4] \\
        [--evaluate RUN [--ppl_max_windows 0]] [--out FILE]
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
    p.add_argument("--evaluate", action="append", default=[], metavar="RUN",
                   help="a results folder of `hgsp prune --method llm_pruner` (repeatable)")
    p.add_argument("--ppl_max_windows", type=int, default=0, help="0: the full test sets")
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
    from hgsp.importance import fold_by_position

    n_kv = kv.numel()
    if folded:
        return kv + fold_by_position(query, n_kv)
    return kv + query.view(n_kv, -1).sum(1)


def layer_scores(model, ids, batch_size: int) -> dict:
    """``{layer: (hgsp's group scores, LLM-Pruner's folded ones)}`` over LLM-Pruner's range."""
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
    out = {}
    with torch.no_grad():
        for li in range(*llm_pruner_range(len(layers))):
            kv, query = head_scores(layers[li].self_attn, d.num_heads, d.num_kv_heads,
                                    d.head_dim)
            out[li] = (group_scores(kv, query, False), group_scores(kv, query, True))
    return out


def lowest(scores, n: int) -> set[int]:
    """The ``n`` lowest-scoring groups, as ``--method llm_pruner`` picks them."""
    from hgsp.methods import lowest as lowest_indices

    return set(lowest_indices(scores, n).tolist())


def compare(model, ids, batch_size: int) -> dict:
    from hgsp.adapters import adapter_for

    scores = layer_scores(model, ids, batch_size)
    n_kv = adapter_for(model.config).dims().num_kv_heads
    differ = {n: [li for li, (shared, folded) in scores.items()
                  if lowest(shared, n) != lowest(folded, n)] for n in range(1, n_kv)}
    return {"layers": [min(scores), max(scores)], "differ": {str(n): v for n, v in differ.items()},
            "scores": scores}


def folded_plan(plan, scores: dict):
    """The run's plan with, in every scored layer, the KV groups the folded scores remove (as
    many as the run removes there); raises unless hgsp's grouping removes the run's groups."""
    import copy

    from hgsp.errors import UserError

    out = copy.deepcopy(plan)
    for li, (shared, folded) in scores.items():
        lp = out.layers[li]
        removed = set(range(plan.num_kv_heads)) - set(lp.kept_kv_heads)
        if lowest(shared, len(removed)) != removed:
            raise UserError(f"layer {li}: these scores do not remove the run's KV groups "
                            f"{sorted(removed)}: pass the run's calibration windows "
                            f"(benchmarks/export_calibration.py with its settings)")
        lp.kept_kv_heads = sorted(set(range(plan.num_kv_heads)) - lowest(folded, len(removed)))
    return out


def run_scoring(run: Path) -> str:
    """The run's ``--kv_group_scoring`` (``shared`` for runs from before the option)."""
    path = run / "logs" / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    return config.get("arguments", {}).get("kv_group_scoring", "shared")


def llm_pruner_plan(run: Path, option: str):
    """The pruning plan of ``run``, a results folder of ``--method llm_pruner`` (passed to
    ``option``)."""
    from hgsp.errors import UserError
    from hgsp.plan import PruningPlan

    plan = PruningPlan.load(run / "analysis" / "pruning_plan.json")
    if plan.meta.get("method") != "llm_pruner":
        raise UserError(f"{run} was not pruned with --method llm_pruner "
                        f"(method {plan.meta.get('method')!r}): pass such a run to {option}")
    return plan


def perplexities(model, tokenizer, max_windows: int) -> dict:
    """WikiText-2 and PTB perplexity at 128 tokens (``max_windows`` 0: the full test sets)."""
    from hgsp.perplexity import perplexity

    model.eval()
    return {ds: round(perplexity(model, tokenizer, ds, 128, max_windows or None)["ppl"], 2)
            for ds in ("wikitext2", "ptb")}


def evaluate(model, tokenizer, run: Path, scores: dict, max_windows: int) -> dict:
    """Perplexity of the run's plan and of the same plan with the folded KV-group choice."""
    from hgsp.adapters import adapter_for
    from hgsp.errors import UserError
    from hgsp.surgery import apply_plan

    plan = llm_pruner_plan(run, "--evaluate")
    if run_scoring(run) != "shared":
        raise UserError(f"{run} was pruned with --kv_group_scoring {run_scoring(run)}: pass a "
                        "run of the default (shared) scoring to --evaluate")
    folded = folded_plan(plan, scores)
    swapped = [lp.index for lp, fp in zip(plan.layers, folded.layers)
               if lp.kept_kv_heads != fp.kept_kv_heads]
    adapter = adapter_for(model.config)
    result = {"run": str(run), "pruning_ratio": plan.meta.get("pruning_ratio"),
              "layers_with_other_groups": swapped}
    for label, p in (("hgsp", plan), ("llm_pruner_folded", folded)):
        result[label] = perplexities(apply_plan(model, adapter, p), tokenizer, max_windows)
    return result


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
    scores = result.pop("scores")
    n_layers = result["layers"][1] - result["layers"][0] + 1
    for n, where in result["differ"].items():
        print(f"{n} lowest KV group(s) differ in {len(where)} of {n_layers} layers: {where}")
    if args.evaluate:
        from transformers import AutoTokenizer

        from hgsp.errors import UserError

        model.zero_grad(set_to_none=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        try:
            result["evaluate"] = [evaluate(model, tokenizer, Path(run), scores,
                                           args.ppl_max_windows) for run in args.evaluate]
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        result["ppl_max_windows"] = args.ppl_max_windows or "all"
        for e in result["evaluate"]:
            print(f"{e['run']}: other KV groups in layers {e['layers_with_other_groups']}; "
                  f"WikiText-2 / PTB hgsp {e['hgsp']}, folded {e['llm_pruner_folded']}")
    atomic_write(Path(args.out), lambda f: f.write_text(json.dumps(result, indent=1) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
