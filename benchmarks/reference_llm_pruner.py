#!/usr/bin/env python
"""Run LLM-Pruner's own code on the benchmark's calibration windows and compare what it removes
with ``hgsp prune --method llm_pruner``.

The authors' code (https://github.com/horseee/LLM-Pruner) is not part of this project: clone it
and pass the clone. This script makes the calls of the block-wise path of its ``llama3.py``
(its script for GQA models), with that script's settings: the ``MetaPruner`` of its
``LLMPruner.torch_pruning`` fork with its ``TaylorImportance(group_reduction="sum",
taylor="param_first")``, ``k_proj`` in consecutive
groups of ``head_dim`` rows, its RMSNorm pruner, the ``k_proj`` and ``gate_proj`` of a layer
range as the group roots, gradients from one backward pass of the windows' mean loss, and one
pruning step. These changes are made, none inside its code:

- the windows: the exported calibration windows (``export_calibration.py``) instead of its 10
  bookcorpus examples of 64 tokens;
- the layer range and the amounts: each run's (``--run``), read from its pruning plan; the
  share of each root module (``MetaPruner``'s ``ch_sparsity_dict``) is set so that its code
  removes as many KV groups and MLP channels in each layer as the run (``llama3.py`` takes one
  ``--pruning_ratio`` for both kinds, which meets neither of the table's budgets);
- float32 (its code loads float16, which a CPU runs too slowly for this), and eager attention
  (it calls transformers' ``repeat_kv``, whose ``expand`` its dependency graph maps KV heads
  through);
- the tracing forward gets ``use_cache=False``: its graph builder flattens the model's outputs
  and cannot flatten the cache object of transformers 5.

For each run it records, per layer, the KV groups and MLP channels each side removes and the
query heads LLM-Pruner's dependency graph removes with a KV group; it builds the same choice
with hgsp's surgery (a pruning plan) and checks that it gives LLM-Pruner's pruned tensors
exactly, and whether the run's own model has them too; the result records the clone's
commit. ``--evaluate`` scores LLM-Pruner's pruned model and the run's plan on WikiText-2 and
PTB at 128 tokens (``--ppl_max_windows``, 0: the full test sets; needs ``HGSP_DATA_DIR``).

    git clone https://github.com/horseee/LLM-Pruner /path/LLM-Pruner
    python benchmarks/reference_llm_pruner.py --llm_pruner_dir /path/LLM-Pruner \\
        --run results/llm_pruner_r0.2 [--run ...] [--model PATH] \\
        [--calibration benchmarks/results/calibration/calibration.pt] \\
        [--evaluate [--ppl_max_windows 0]] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # exported_windows

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def parse_args(argv=None):
    import exported_windows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llm_pruner_dir", required=True, help="a clone of horseee/LLM-Pruner")
    p.add_argument("--run", action="append", required=True, metavar="RUN",
                   help="a results folder of `hgsp prune --method llm_pruner` (repeatable)")
    exported_windows.add_arguments(p)
    p.add_argument("--evaluate", action="store_true")
    p.add_argument("--ppl_max_windows", type=int, default=0, help="0: the full test sets")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        "reference_llm_pruner.json"))
    return p.parse_args(argv)


def import_llm_pruner(clone: str):
    """Its ``LLMPruner.torch_pruning`` fork and its ``hf_llama_pruner`` module."""
    import importlib

    from hgsp.errors import UserError

    root = Path(clone).expanduser().resolve()
    if not (root / "LLMPruner" / "torch_pruning").is_dir():
        raise UserError(f"--llm_pruner_dir '{clone}' has no LLMPruner/torch_pruning: pass a "
                        "clone of https://github.com/horseee/LLM-Pruner")
    for name in [n for n in sys.modules if n == "LLMPruner" or n.startswith("LLMPruner.")]:
        del sys.modules[name]  # an earlier clone's modules must not stand in for this one's
    sys.path.insert(0, str(root))
    try:
        tp = importlib.import_module("LLMPruner.torch_pruning")
        return tp, importlib.import_module("LLMPruner.pruner.hf_llama_pruner")
    finally:
        sys.path.remove(str(root))


def clone_commit(clone: str) -> str:
    """The commit of the clone the code came from, as the result file records it."""
    import subprocess

    done = subprocess.run(["git", "-C", str(Path(clone).expanduser()), "rev-parse", "HEAD"],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else "not a git checkout"


def removed_counts(plan, head_dim: int) -> dict[int, tuple[int, int]]:
    """``{layer: (k_proj rows, MLP channels)}`` the run removes, for the layers it prunes."""
    out = {}
    for lp in plan.layers:
        groups = plan.num_kv_heads - len(lp.kept_kv_heads)
        channels = plan.intermediate_size - len(lp.kept_channels)
        if groups or channels:
            out[lp.index] = (groups * head_dim, channels)
    return out


def share(total: int, count: int) -> float:
    """The ratio r with ``total - int(total * (1 - r)) == count``, MetaPruner's count."""
    r = max(count - 0.5, 0) / total  # mid-interval: the float product cannot round across
    if total - int(total * (1 - r)) != count:
        raise RuntimeError(f"no share of {total} gives MetaPruner's count {count}")
    return r


def run_reference(tp, lp, model, ids, counts: dict[int, tuple[int, int]]) -> dict:
    """Prune ``model`` in place with LLM-Pruner's code; ``{module name: removed indices}``."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    layers = model.model.layers
    roots, ratios = [], {}
    for i, (k_rows, channels) in counts.items():
        attn, mlp = layers[i].self_attn, layers[i].mlp
        roots += [attn.k_proj, mlp.gate_proj]
        ratios[attn.k_proj] = share(attn.k_proj.out_features, k_rows)
        ratios[mlp.gate_proj] = share(mlp.gate_proj.out_features, channels)
    for p in model.parameters():
        p.requires_grad_(True)
    pruner = tp.pruner.MetaPruner(
        model, {"input_ids": ids[:2, :8], "use_cache": False},
        importance=lp.TaylorImportance(group_reduction="sum", taylor="param_first"),
        global_pruning=False, iterative_steps=1, ch_sparsity=0.0, ch_sparsity_dict=ratios,
        ignored_layers=[], channel_groups={},
        consecutive_groups={layer.self_attn.k_proj: layer.self_attn.head_dim
                            for layer in layers},
        customized_pruners={LlamaRMSNorm: lp.hf_rmsnorm_pruner},
        root_module_types=None, root_instances=roots)
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    names = {m: n for n, m in model.named_modules()}
    removed = {}
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            if isinstance(dep.target.module, torch.nn.Linear):
                removed[names[dep.target.module]] = sorted(idxs)
        group.prune()
    model.zero_grad(set_to_none=True)
    return removed


def reference_choice(removed: dict, layer: int, head_dim: int) -> dict:
    """One layer's removal by LLM-Pruner's code: KV groups, query heads and MLP channels, after
    checking that each module of a block lost the rows/columns its partners lost."""
    get = {n: removed.get(f"model.layers.{layer}.{'self_attn' if n in ATTN else 'mlp'}.{n}", [])
           for n in ATTN + MLP}
    if not (get["k_proj"] == get["v_proj"] and get["q_proj"] == get["o_proj"]
            and get["gate_proj"] == get["up_proj"] == get["down_proj"]):
        raise RuntimeError(f"layer {layer}: LLM-Pruner's code removed different units from "
                           "the modules of one block; this comparison does not apply")
    return {"kv_groups": sorted({i // head_dim for i in get["k_proj"]}),
            "query_heads": sorted({i // head_dim for i in get["q_proj"]}),
            "channels": get["gate_proj"]}


def compare_layers(plan, removed: dict, head_dim: int, q_per_kv: int) -> dict:
    """Per pruned layer: both choices, and whether the query heads follow the KV heads."""
    rows, same_groups, same_channels, shared_heads, attn_layers = [], 0, 0, 0, 0
    for lp in plan.layers:
        ref = reference_choice(removed, lp.index, head_dim)
        ours = {"kv_groups": sorted(set(range(plan.num_kv_heads)) - set(lp.kept_kv_heads)),
                "channels": sorted(set(range(plan.intermediate_size)) - set(lp.kept_channels))}
        if not (ref["kv_groups"] or ref["channels"] or ours["kv_groups"] or ours["channels"]):
            continue
        sharing = sorted(h * q_per_kv + j for h in ref["kv_groups"] for j in range(q_per_kv))
        same_groups += ref["kv_groups"] == ours["kv_groups"]
        same_channels += ref["channels"] == ours["channels"]
        attn_layers += bool(ref["kv_groups"])
        shared_heads += bool(ref["kv_groups"]) and ref["query_heads"] == sharing
        rows.append({"layer": lp.index, "llm_pruner_kv_groups": ref["kv_groups"],
                     "llm_pruner_query_heads": ref["query_heads"],
                     "hgsp_kv_groups": ours["kv_groups"],
                     "channels_removed": [len(ref["channels"]), len(ours["channels"])],
                     "channels_in_common": len(set(ref["channels"]) & set(ours["channels"]))})
    return {"layers": rows, "same_kv_groups": same_groups, "same_channels": same_channels,
            "query_heads_share_the_kv_head": shared_heads,
            "layers_losing_kv_groups": attn_layers, "pruned_layers": len(rows),
            "same_units_in_every_layer": same_groups == same_channels == len(rows)}


def as_plan(plan, removed: dict, head_dim: int):
    """The run's plan with LLM-Pruner's choice of KV groups and MLP channels."""
    out = copy.deepcopy(plan)
    for lp in out.layers:
        ref = reference_choice(removed, lp.index, head_dim)
        lp.kept_kv_heads = sorted(set(range(plan.num_kv_heads)) - set(ref["kv_groups"]))
        lp.kept_channels = sorted(set(range(plan.intermediate_size)) - set(ref["channels"]))
    return out


def same_tensors(a, b) -> bool:
    import torch

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def check_run(tp, lp, model_dir: str, ids, run: Path) -> tuple[dict, object, dict]:
    """LLM-Pruner's code against one run: the record, its pruned model, and what the
    evaluation needs (the base model, the run's plan and model, its choice as a plan)."""
    import torch
    from transformers import AutoModelForCausalLM

    import llm_pruner_grouping

    from hgsp.adapters import adapter_for
    from hgsp.errors import UserError
    from hgsp.surgery import apply_plan

    plan = llm_pruner_grouping.llm_pruner_plan(run, "--run")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager")
    if model.config.model_type != "llama":
        raise UserError(f"{model_dir} is a {model.config.model_type} model: LLM-Pruner's "
                        "llama3.py (and this script) prune LLaMA-architecture models only")
    adapter = adapter_for(model.config)
    d = adapter.dims()
    base = copy.deepcopy(model)
    removed = run_reference(tp, lp, model, ids, removed_counts(plan, d.head_dim))
    ref_plan = as_plan(plan, removed, d.head_dim)
    rebuilt, run_model = apply_plan(base, adapter, ref_plan), apply_plan(base, adapter, plan)
    record = {"run": str(run), "pruning_ratio": plan.meta.get("pruning_ratio"),
              "kv_group_scoring": llm_pruner_grouping.run_scoring(run),
              **compare_layers(plan, removed, d.head_dim, d.num_heads // d.num_kv_heads),
              "parameters": {"llm_pruner": sum(p.numel() for p in model.parameters()),
                             "hgsp_run": sum(p.numel() for p in run_model.parameters())},
              "hgsp_surgery_of_its_choice_is_identical": same_tensors(model, rebuilt),
              "hgsp_run_is_identical": same_tensors(model, run_model)}
    return record, model, {"base": base, "plan": plan, "run_model": run_model,
                           "its_plan": ref_plan}


def main(argv=None) -> int:
    import torch
    import transformers
    from transformers import AutoTokenizer

    import exported_windows
    import llm_pruner_grouping

    from hgsp.atomic import atomic_write
    from hgsp.errors import UserError

    args = parse_args(argv)
    warnings.filterwarnings("ignore", module="LLMPruner")  # its tracing warns on every op
    try:
        tp, lp = import_llm_pruner(args.llm_pruner_dir)
        model_dir = exported_windows.model_dir(args)
        ids, header = exported_windows.load_windows(args, model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        runs = []
        for run in args.run:
            record, pruned, ctx = check_run(tp, lp, model_dir, ids, Path(run))
            if args.evaluate:
                record["perplexity"] = {
                    side: llm_pruner_grouping.perplexities(m, tokenizer, args.ppl_max_windows)
                    for side, m in (("llm_pruner", pruned), ("hgsp_run", ctx["run_model"]))}
            runs.append(record)
            print(f"{run} ({record['kv_group_scoring']} scoring): same KV groups in "
                  f"{record['same_kv_groups']} of "
                  f"{record['pruned_layers']} layers, same MLP channels in "
                  f"{record['same_channels']}; query heads sharing the KV head in "
                  f"{record['query_heads_share_the_kv_head']} of "
                  f"{record['layers_losing_kv_groups']}; hgsp's surgery of its choice "
                  f"identical: {record['hgsp_surgery_of_its_choice_is_identical']}; the run's "
                  f"model identical: {record['hgsp_run_is_identical']}; "
                  f"{record.get('perplexity', '')}")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {**header, "torch": torch.__version__, "transformers": transformers.__version__,
              "llm_pruner_commit": clone_commit(args.llm_pruner_dir), "dtype": "float32",
              "ppl_max_windows": (args.ppl_max_windows or "all") if args.evaluate else None,
              "runs": runs}
    atomic_write(Path(args.out), lambda f: f.write_text(json.dumps(result, indent=1) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
