#!/usr/bin/env python
"""Run FLAP's own selection code (FLAP and its Wanda-sp) on the benchmark's calibration windows
and compare the units it removes with ``hgsp prune --method flap`` / ``--method wanda_sp``.

The authors' code (https://github.com/CASIA-IVA-Lab/FLAP; checked with commit 9bbad71) is not
part of this project: clone it and pass the clone. This script runs ``prune_flap`` (the paper's setting: WIFV metric, AL-AM
structure) and ``prune_wanda_sp`` of its ``lib/prune.py`` as they are, with these changes made
at run time, so that they run on a GQA model, on transformers 5 and without a GPU, on the same
windows as hgsp:

- the width of an attention unit: its code reshapes the o_proj input features into heads of
  128 (LLaMA-7B); here it is one KV group, ``query heads per KV head × head_dim`` features
  (192 on the demo model), the smallest unit a GQA model can drop (the two lines
  ``reshape(len(layers), -1, 128)`` and ``W_metric.mean(axis=0).reshape(-1, 128)`` are changed
  before the module runs), and each attention's ``num_heads`` is its number of KV groups;
- the calibration loader returns the exported windows (``export_calibration.py``) instead of
  its WikiText-2 / C4 loader;
- its ``compress`` is replaced by one that records the masks it is given and zeroes the o_proj /
  down_proj input columns they remove (its code slices q/k/v with one mask, multi-head attention
  only); Wanda-sp's later layers then see the pruned layers' output, as in its code;
- each decoder layer computes its rotary embeddings from ``position_ids`` when called without
  them and returns a tuple, as its per-layer loop calls layers of the transformers of its time,
  and the model gets the ``seqlen`` attribute its code reads;
- ``Tensor.cuda()`` returns the tensor itself while its code runs.

FLAP's pruning ratio is a share of the prunable units weighted as its code weighs them (a head
512/3 channels); it is set to the share the parameter budget of ``--ratios`` removes. Wanda-sp's
code takes one ratio r for both kinds (``int(r × heads)`` heads and ``int(r × channels)``
channels per layer), so it runs at each ``--wanda_sp_ratios`` r and hgsp at the budget that run
removes (on the demo model no single r gives the benchmark's 20% or 50% rows, README).

    git clone https://github.com/CASIA-IVA-Lab/FLAP /path/FLAP
    python benchmarks/reference_flap.py --flap_dir /path/FLAP [--model PATH] \\
        [--calibration benchmarks/results/calibration/calibration.pt] [--ratios 0.2,0.5,0.7] \\
        [--wanda_sp_ratios 0.35] [--batch_size 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))  # exported_windows

HEAD_RESHAPE = "reshape(len(layers), -1, 128)"  # prune_flap's head scores
WANDA_RESHAPE = "W_metric.mean(axis=0).reshape(-1, 128)"  # prune_wanda_sp's head scores
# FLAP's compression weight of an attention head, in MLP channels (LLaMA-7B: 4·d·128 / 3·d)
HEAD_WEIGHT = 512.0 / 3


def parse_args(argv=None):
    import exported_windows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flap_dir", required=True, help="a clone of CASIA-IVA-Lab/FLAP")
    exported_windows.add_arguments(p)
    p.add_argument("--ratios", default="0.2,0.5,0.7",
                   help="FLAP: shares of the parameters (0.7: it empties blocks)")
    p.add_argument("--wanda_sp_ratios", default="0.35",
                   help="Wanda-sp: single ratios of its code (0.35: 1 of 3 KV groups and 537 "
                        "channels per layer on the demo model)")
    p.add_argument("--batch_size", type=int, default=4, help="hgsp's measurement only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "reference_flap.json"))
    return p.parse_args(argv)


def import_prune(flap_dir: str, unit_width: int):
    """FLAP's ``lib/prune.py`` as a module, with its attention unit ``unit_width`` wide."""
    from hgsp.errors import UserError

    root = Path(flap_dir).expanduser().resolve()
    path = root / "lib" / "prune.py"
    if not path.is_file():
        raise UserError(f"--flap_dir '{flap_dir}' has no lib/prune.py: pass a clone of "
                        "https://github.com/CASIA-IVA-Lab/FLAP")
    source = path.read_text()
    for line in (HEAD_RESHAPE, WANDA_RESHAPE):
        if source.count(line) != 1:
            raise UserError(f"{path} does not contain '{line}' once: this script follows "
                            "the FLAP code of 2024; check out that version")
        source = source.replace(line, line.replace("128", str(unit_width)))
    for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
        del sys.modules[name]  # another package named lib must not stand in for FLAP's
    sys.path.insert(0, str(root))
    try:
        spec = importlib.util.spec_from_file_location("lib.prune", path)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = "lib"
        code = compile(source, str(path), "exec")
        exec(code, module.__dict__)  # noqa: S102 - the user's clone of the reference code
    finally:
        sys.path.remove(str(root))
    return module


def supply_rotary(model) -> None:
    """Let each decoder layer be called with ``position_ids`` only, returning a tuple."""
    rotary = model.model.rotary_emb
    for layer in model.model.layers:
        def forward(hidden_states, attention_mask=None, position_ids=None, _inner=layer.forward,
                    **kwargs):
            if kwargs.get("position_embeddings") is None:
                kwargs["position_embeddings"] = rotary(hidden_states, position_ids)
            return (_inner(hidden_states, attention_mask=attention_mask,
                           position_ids=position_ids, **kwargs),)
        layer.forward = forward


def flap_ratio(adapter, budget: int) -> float:
    """FLAP's ``pruning_ratio`` for a ``budget`` of parameters: the budget in MLP channels over
    the units weighted as its code weighs them (exact where a KV group costs 512/3 channels, as
    on the demo model: 294,912 against 1,728 parameters)."""
    d = adapter.dims()
    channel = adapter.mlp_channel_cost()
    total = d.num_layers * (d.num_kv_heads * HEAD_WEIGHT + d.intermediate)
    return budget / channel / total


@contextmanager
def cuda_is_identity():
    """Its code sorts scores on ``.cuda()`` copies; without a GPU they stay where they are."""
    import torch

    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


def reference_masks(prune, model_dir: str, ids, ratio: float, method: str = "flap"):
    """The attention-unit and channel keep masks ``prune_flap`` (or ``prune_wanda_sp``) hands
    to ``compress``, per layer."""
    import torch
    from transformers import AutoModelForCausalLM

    from hgsp.adapters import adapter_for

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    d = adapter_for(model.config).dims()
    model.seqlen = ids.shape[1]
    supply_rotary(model)
    index = {id(layer): i for i, layer in enumerate(model.model.layers)}
    for layer in model.model.layers:
        layer.self_attn.num_heads = d.num_kv_heads  # its unit: a KV group
    masks = {"attn": {}, "mlp": {}}

    @torch.no_grad()
    def record(layer, attn_mask, mlp_mask, *args, **kwargs):
        i = index[id(layer)]
        if attn_mask is not None:
            masks["attn"][i] = attn_mask.bool().tolist()
            columns = attn_mask.bool().repeat_interleave(d.gqa_ratio * d.head_dim)
            layer.self_attn.o_proj.weight[:, ~columns] = 0
        if mlp_mask is not None:
            masks["mlp"][i] = mlp_mask.bool().tolist()
            layer.mlp.down_proj.weight[:, ~mlp_mask.bool()] = 0

    prune.compress = record
    prune.get_loaders = lambda *a, **k: ([(w[None], None) for w in ids], None)
    args = types.SimpleNamespace(metrics="WIFV", structure="AL-AM", nsamples=len(ids), seed=0,
                                 pruning_ratio=ratio, remove_heads=0, unstr=False)
    run = prune.prune_flap if method == "flap" else prune.prune_wanda_sp
    with cuda_is_identity():
        run(args, model, None, device=torch.device("cpu"))
    n = len(model.model.layers)
    return [masks["attn"][i] for i in range(n)], [masks["mlp"][i] for i in range(n)]


def hgsp_plan(model, adapter, ids, ratio: float, batch_size: int, stats, method="flap",
              budget: int | None = None):
    """The plan of ``--method method`` at ``ratio`` (or at a parameter ``budget``) and its
    budget."""
    from hgsp.config import PruneConfig
    from hgsp.methods import Measurements
    from hgsp.pipeline import count_params, decoder_params, removal_budget, score_and_select
    from hgsp.plan import plan_from_selection

    cfg = PruneConfig(base_model="-", output_name="-", method=method, pruning_ratio=ratio,
                      gradient_batch_size=batch_size)
    if budget is None:
        budget = removal_budget(count_params(model), decoder_params(model, adapter), ratio)
    table, _, selection = score_and_select(Measurements(stats=stats, calibration=ids), adapter,
                                           cfg, budget, model)
    d = adapter.dims()
    return plan_from_selection(table, selection, adapter.model_type, d.num_kv_heads,
                               d.intermediate), budget


def flap_variances(bias_gpt, model, adapter, ids) -> dict:
    """FLAP's own running estimate of each o_proj / down_proj input's fluctuation (its
    ``BiasGPT``, fed one window at a time on the unpruned model as its loop does)."""
    import torch

    from hgsp.surgery import out_projection

    layers = adapter.layers(model)
    wrappers, handles = {}, []
    for i, layer in enumerate(layers):
        for kind in ("attn", "mlp"):
            lin = out_projection(layer, kind)
            wrappers[(kind, i)] = bias_gpt(lin, "WIFV")
            handles.append(lin.register_forward_hook(
                lambda _m, inp, out, key=(kind, i): wrappers[key].add_batch(inp[0].data, out.data)))
    try:
        with torch.no_grad():
            for window in ids:
                model(window[None])
    finally:
        for h in handles:
            h.remove()
    return {kind: torch.stack([wrappers[(kind, i)].fluc_inp.double() for i in range(len(layers))])
            for kind in ("attn", "mlp")}


class WithVariance:
    """Activation statistics whose ``variance`` is given (FLAP's estimate) instead of exact."""

    def __init__(self, stats, variances: dict):
        self._stats, self._variances = stats, variances

    def variance(self, kind: str):
        return self._variances[kind]

    def __getattr__(self, name):
        return getattr(self._stats, name)


def removed_units(plan, d) -> tuple[set, set]:
    groups, channels = set(), set()
    for lp in plan.layers:
        groups |= {(lp.index, g) for g in set(range(d.num_kv_heads)) - set(lp.kept_kv_heads)}
        channels |= {(lp.index, c) for c in set(range(d.intermediate)) - set(lp.kept_channels)}
    return groups, channels


def overlap(ours: set, theirs: set) -> dict:
    both = len(ours & theirs)
    return {"hgsp": len(ours), "flap_code": len(theirs), "both": both,
            "jaccard": round(both / max(len(ours | theirs), 1), 4)}


def overlaps(ours: tuple[set, set], theirs: tuple[set, set]) -> dict:
    """:func:`overlap` of the KV groups and of the channels."""
    return {"kv_groups_removed": overlap(ours[0], theirs[0]),
            "channels_removed": overlap(ours[1], theirs[1])}


def per_layer_removed(plan, attn_keep, mlp_keep, d) -> dict:
    return {"kv_groups_removed_per_layer": {
                "hgsp": [d.num_kv_heads - len(lp.kept_kv_heads) for lp in plan.layers],
                "flap_code": [len(m) - sum(m) for m in attn_keep]},
            "channels_removed_per_layer": {
                "hgsp": [d.intermediate - len(lp.kept_channels) for lp in plan.layers],
                "flap_code": [len(m) - sum(m) for m in mlp_keep]}}


def removed_by_masks(attn_keep, mlp_keep) -> tuple[set, set]:
    return ({(i, g) for i, m in enumerate(attn_keep) for g, k in enumerate(m) if not k},
            {(i, c) for i, m in enumerate(mlp_keep) for c, k in enumerate(m) if not k})


def compare_flap(prune, model, adapter, model_dir: str, ids, ratios, batch_size: int) -> dict:
    from hgsp.activations import collect_activation_stats

    d = adapter.dims()
    stats = collect_activation_stats(model, adapter, ids, batch_size)
    their_variance = WithVariance(stats, flap_variances(prune.BiasGPT, model, adapter, ids))
    result = {}
    for r in ratios:
        plan, budget = hgsp_plan(model, adapter, ids, r, batch_size, stats)
        same_variance, _ = hgsp_plan(model, adapter, ids, r, batch_size, their_variance)
        ratio = flap_ratio(adapter, budget)
        attn_keep, mlp_keep = reference_masks(prune, model_dir, ids, ratio)
        theirs = removed_by_masks(attn_keep, mlp_keep)
        result[str(r)] = {
            "budget": budget, "flap_pruning_ratio": round(ratio, 6),
            **overlaps(removed_units(plan, d), theirs),
            # hgsp's selection fed FLAP's own variance estimate: what remains is the cut
            "with_flap_variance": overlaps(removed_units(same_variance, d), theirs),
            **per_layer_removed(plan, attn_keep, mlp_keep, d),
        }
    return result


def compare_wanda_sp(prune, model, adapter, model_dir: str, ids, ratios, batch_size: int
                     ) -> dict:
    from hgsp.pipeline import count_params

    d = adapter.dims()
    total = count_params(model)
    result = {}
    for r in ratios:
        heads, channels = int(r * d.num_kv_heads), int(r * d.intermediate)
        budget = d.num_layers * (heads * adapter.attn_group_cost()
                                 + channels * adapter.mlp_channel_cost())
        plan, _ = hgsp_plan(model, adapter, ids, budget / total, batch_size, None,
                            method="wanda_sp", budget=budget)
        attn_keep, mlp_keep = reference_masks(prune, model_dir, ids, r, method="wanda_sp")
        result[str(r)] = {
            "budget": budget, "hgsp_pruning_ratio": round(budget / total, 6),
            **overlaps(removed_units(plan, d), removed_by_masks(attn_keep, mlp_keep)),
            **per_layer_removed(plan, attn_keep, mlp_keep, d),
        }
    return result


def compare(prune, model_dir: str, ids, ratios: list[float], batch_size: int,
            wanda_sp_ratios: list[float] = ()) -> dict:
    import torch

    from hgsp.adapters import adapter_for
    from hgsp.modelio import load_model

    model = load_model(model_dir, dtype=torch.float32).model
    adapter = adapter_for(model.config)
    return {"flap": compare_flap(prune, model, adapter, model_dir, ids, ratios, batch_size),
            "wanda_sp": compare_wanda_sp(prune, model, adapter, model_dir, ids, wanda_sp_ratios,
                                         batch_size)}


def main(argv=None) -> int:
    import torch
    import transformers

    import exported_windows

    from hgsp.atomic import atomic_write
    from hgsp.errors import UserError

    args = parse_args(argv)
    model_dir = exported_windows.model_dir(args)
    try:
        from transformers import AutoConfig

        from hgsp.adapters import adapter_for

        dims = adapter_for(AutoConfig.from_pretrained(model_dir)).dims()
        prune = import_prune(args.flap_dir, dims.gqa_ratio * dims.head_dim)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ids, header = exported_windows.load_windows(args, model_dir)
    ratios = [float(r) for r in args.ratios.split(",")]
    wanda_sp_ratios = [float(r) for r in args.wanda_sp_ratios.split(",") if r]
    result = compare(prune, model_dir, ids, ratios, args.batch_size, wanda_sp_ratios)
    result = {**header, "torch": torch.__version__, "transformers": transformers.__version__,
              **result}
    for method, by_ratio in (("FLAP", result["flap"]), ("Wanda-sp", result["wanda_sp"])):
        for r, res in by_ratio.items():
            for kind in ("kv_groups_removed", "channels_removed"):
                o = res[kind]
                line = (f"{method} {r}, {kind}: hgsp {o['hgsp']}, FLAP's code {o['flap_code']}, "
                        f"both {o['both']} (Jaccard {o['jaccard']})")
                if "with_flap_variance" in res:
                    same = res["with_flap_variance"][kind]
                    line += (f"; with FLAP's variance estimate hgsp {same['hgsp']}, "
                             f"both {same['both']} (Jaccard {same['jaccard']})")
                print(line)
    atomic_write(Path(args.out), lambda f: f.write_text(json.dumps(result, indent=1) + "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
