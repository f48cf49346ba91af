#!/usr/bin/env python
"""Quality at equal size: H-GSP, its variants and the baseline methods on one model.

For every ratio and every row of :data:`ROWS`, the model is pruned with the same calibration
data (``hgsp prune``, importances and analysis from the cache after the first run), the saved
model is loaded back from its folder and evaluated: WikiText-2 and PTB perplexity at 128 tokens,
the 4-task zero-shot mean, parameters, and decode speed at batch 1. The base model is evaluated
once. Writes ``quality.json``, ``quality.md`` (the table) and ``quality_vs_size.png``.

    python benchmarks/bench_quality.py [--ratios 0.2,0.5] [--rows all|core|NAME,...] \\
        [--ppl_max_windows N] [--zeroshot_limit 100] [--out_dir benchmarks/results/quality]

Without ``--ppl_max_windows`` the full test sets are used (2,358 + ~900 windows per model on
the demo model: slow on a CPU). Needs ``hgsp fetch-assets`` and the evaluation text
(``HGSP_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# row name -> (label in the table, PruneConfig overrides)
ROWS = {
    "hgsp": ("H-GSP (defaults)", {}),
    # The defaults with one setting changed, so that the row's difference from the defaults is
    # that setting's effect at every ratio (the normalization included: `auto` at both).
    "hgsp_no_refit": ("H-GSP without the refit", {"refit_outputs": False}),
    "hgsp_tau_inf": ("H-GSP τ=∞ (layer-wise)", {"tau": float("inf")}),
    "hgsp_tau_inf_eps0": ("H-GSP τ=∞ ε=0", {"tau": float("inf"), "epsilon": 0.0}),
    "hgsp_q40": ("H-GSP τ at the 40th percentile", {"tau_quantile": 0.4}),
    "hgsp_t0": ("H-GSP T=0 (pure Taylor)", {"temperature": 0.0}),  # no normalization at T=0
    "hgsp_tau_0": ("H-GSP τ=0 (block-wise)", {"tau": 0.0}),
    "hgsp_norm_none": ("H-GSP without normalization", {"importance_norm": "none"}),
    "hgsp_norm_block": ("H-GSP normalized per block", {"importance_norm": "block"}),
    "hgsp_norm_layer": ("H-GSP normalized per layer", {"importance_norm": "layer"}),
    # An earlier default: today's defaults without the two settings added since (its label
    # says which), so that row and "without the refit" show each step's effect.
    "hgsp_block_alone": ("H-GSP without the Shapley share or the refit",
                         {"block_delta": "alone", "refit_outputs": False}),
    "llm_pruner": ("LLM-Pruner", {"method": "llm_pruner"}),
    "wanda_sp": ("Wanda-sp", {"method": "wanda_sp"}),
    "flap": ("FLAP", {"method": "flap"}),
    "shortgpt": ("ShortGPT", {"method": "shortgpt"}),
}

# Named sets for --rows. "core" is the comparison itself: the defaults (automatic τ), the
# variants the usage document names (T=0, τ=∞, τ=0) and the four baselines; the other rows are
# ablations of the defaults. Half the models of "all", so about half the time.
ROW_SETS = {
    "all": list(ROWS),
    "core": ["hgsp", "hgsp_t0", "hgsp_tau_inf", "hgsp_tau_0",
             "llm_pruner", "wanda_sp", "flap", "shortgpt"],
}


def row_names(spec: str) -> list[str]:
    """The rows ``--rows`` selects: a set of :data:`ROW_SETS` or a comma-separated list."""
    if spec in ROW_SETS:
        return list(ROW_SETS[spec])
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not names:
        raise ValueError(f"unknown row {', '.join(unknown) or repr(spec)} in --rows; use "
                         f"{' or '.join(ROW_SETS)}, or a comma-separated list of "
                         f"{', '.join(ROWS)}")
    return names


def parse_ratios(spec: str) -> list[float]:
    from hgsp.errors import UserError
    from hgsp.sweep import parse_ratios as parse

    try:
        return parse(spec, "--ratios")
    except UserError as exc:
        raise ValueError(str(exc)) from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the demo model)")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--rows", default="all",
                   help=f"{' or '.join(ROW_SETS)} (the defaults, T=0, τ=∞, τ=0 and the four "
                        f"baselines), or a comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--dataset", default="c4", help="calibration corpus for every method")
    p.add_argument("--ppl_max_windows", type=int, default=None)
    p.add_argument("--zeroshot_limit", type=int, default=100)
    p.add_argument("--extra", default="{}", help="JSON PruneConfig overrides for every row")
    p.add_argument("--out_dir", default=str(ROOT / "benchmarks" / "results" / "quality"))
    p.add_argument("--update", action="store_true",
                   help="keep the rows of OUT_DIR/quality.json (its base row included) and "
                        "replace only the ratio/row pairs run now")
    p.add_argument("--speed_only", action="store_true",
                   help="re-measure only the decode speed of every row of OUT_DIR/quality.json, "
                        "in one session (rows measured at different times are not comparable "
                        "on a shared machine); pruned models missing from WORK_DIR are pruned "
                        "again first, then every model is timed --speed_passes times")
    p.add_argument("--speed_passes", type=int, default=3,
                   help="with --speed_only: timings per model, in alternating order; the "
                        "median is kept")
    p.add_argument("--ppl_only", action="store_true",
                   help="evaluate only the perplexity of the rows of OUT_DIR/quality.json "
                        "(base included; --rows and --ratios select), with --ppl_max_windows "
                        "(none: the full test sets), writing after each row; rows already "
                        "scored on the full test sets are skipped, so an interrupted run "
                        "resumes")
    p.add_argument("--work_dir", default=None, help="where the pruned models go (default: "
                                                      "OUT_DIR/runs)")
    args = p.parse_args(argv)
    try:
        row_names(args.rows)
        parse_ratios(args.ratios)
    except ValueError as exc:
        p.error(str(exc))
    if args.speed_passes < 1:
        p.error(f"--speed_passes must be at least 1, got {args.speed_passes}")
    return args


def evaluate(model, tokenizer, settings, folder=None) -> dict:
    from hgsp.evaluate import evaluate_model

    res = evaluate_model(model, tokenizer, settings, folder)
    eff = res["efficiency"]
    return {
        "params": eff["parameters"]["total"],
        **_ppl_fields(res["ppl"]),
        "zeroshot_mean": res["zeroshot"]["mean_acc"],
        # Kept for the other convention (WinoGrande's acc in place of its missing acc_norm).
        "zeroshot_mean_norm": res["zeroshot"]["mean_acc_norm"],
        "zeroshot": {t: r["acc"] for t, r in res["zeroshot"]["tasks"].items()},
        "decode_tok_s_b1": eff["speed"]["batch1"]["decode_tokens_per_s"],
    }


def _ppl_fields(ppl: dict) -> dict:
    return {"wikitext2": ppl["wikitext2"]["128"]["ppl"], "ptb": ppl["ptb"]["128"]["ppl"],
            "ppl_windows": {d: ppl[d]["128"]["windows"] for d in ("wikitext2", "ptb")},
            "ppl_full": not any(ppl[d]["128"]["capped"] for d in ("wikitext2", "ptb"))}


def model_digest(folder: Path) -> str:
    """SHA-256 of a saved model's tensors (names, dtypes, shapes and values, in name order).

    Rows whose settings lead to the same model (the defaults and "normalized per layer" at
    20% on the demo model, for one) are evaluated once; the digest, kept in each row, also
    tells whether a regenerated row pruned to the very model of the table."""
    import hashlib

    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in sorted(f.keys()):
                t = f.get_tensor(key)
                h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# What a row names rather than measures: not taken over from a row with the same model.
OWN_FIELDS = ("ratio", "row", "label", "prune_s", "same_model_as")


def shared_evaluation(twin: dict) -> dict:
    """The figures of ``twin``, an earlier row with the same model, for a row that is not
    evaluated again: every measurement of the model (size, perplexity, zero-shot, speed)."""
    return {**{k: v for k, v in twin.items() if k not in OWN_FIELDS},
            "same_model_as": twin["row"]}


def measured_models(rows: list[dict], settings: dict, args,
                    rerun: set) -> dict[tuple[float, str], dict]:
    """The rows of the table a new row with the same model may take its figures from, by
    ratio and model digest: only rows measured as this run measures (full test sets, the same
    zero-shot document limit), not a row this run measures again (``rerun``: its figures are
    about to be replaced), and never a row that itself took another's figures."""
    if args.ppl_max_windows is not None or settings.get("zeroshot_limit") != args.zeroshot_limit:
        return {}
    return {(r["ratio"], r["model_sha256"]): r for r in rows
            if r.get("model_sha256") and r.get("ppl_full") and "same_model_as" not in r
            and (r.get("row"), r["ratio"]) not in rerun}


def prune_row(model_path, name, ratio, args, work_dir):
    from hgsp.config import PruneConfig
    from hgsp.pipeline import prune

    label, overrides = ROWS[name]
    cfg = PruneConfig(base_model=model_path, output_name=f"{name}_r{ratio:g}",
                      pruning_ratio=ratio, dataset=args.dataset, results_dir=str(work_dir),
                      overwrite=True, save_bin=False, **{**json.loads(args.extra), **overrides})
    start = time.perf_counter()
    result = prune(cfg)
    return result, time.perf_counter() - start


def markdown(rows: list[dict], settings: dict) -> str:
    head = ("| ratio | method | params | achieved | layers kept | WikiText-2 ↓ | PTB ↓ | "
            "zero-shot mean ↑ | decode tok/s (b1) |")
    lines = [head, "|" + "---|" * 9]
    common, marks, notes = _window_marks(rows)
    shared = _shared_marks(rows)
    for i, r in enumerate(rows):
        lines.append(f"| {r['ratio']:g} | {r['label']}{marks.get(i, '')}{shared.get(i, '')} | "
                     f"{r['params'] / 1e6:.2f} M | "
                     f"{r.get('achieved', 0):.2%} | {r.get('layers_kept', '')} | "
                     f"{r['wikitext2']:.2f} | {r['ptb']:.2f} | {r['zeroshot_mean']:.4f} | "
                     f"{r['decode_tok_s_b1']:.1f} |")
    lines.append("")
    lines.append(f"Perplexity at 128 tokens on {common}.{notes} Zero-shot: mean acc of "
                 f"piqa, hellaswag, winogrande, arc_easy on the first "
                 f"{settings['zeroshot_limit']} documents each; calibration: "
                 f"{settings['dataset']}, {_calibration_text(settings)} for every method.")
    if shared:
        lines.append("‡ The same saved model (the same tensors) as another row of its ratio, "
                     "so evaluated once: its figures are that row's.")
    if settings.get("speed_remeasured"):
        passes = settings.get("speed_passes", 1)
        median = f", median of {passes} passes" if passes > 1 else ""
        lines.append(f"Decode speed: every row measured again, one after the other, on "
                     f"{settings['speed_remeasured'][:10]} (`--speed_only`{median}).")
    else:  # after --update: rows measured in different sessions of a shared machine
        lines.append("Decode speed: each row measured when it was evaluated, not all in one "
                     "session; run `--speed_only` before comparing rows.")
    return "\n".join(lines) + "\n"


def _calibration_text(settings: dict) -> str:
    """The calibration size of the table: hgsp's defaults unless ``--extra`` changed them."""
    from hgsp.config import PruneConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PruneConfig)}
    extra = json.loads(settings.get("extra") or "{}")
    n, length = (extra.get(k, defaults[k]) for k in ("num_examples", "seq_len"))
    return f"{n} windows of {length} tokens"


def _windows_text(row: dict) -> str:
    w = row["ppl_windows"]
    scope = "all" if row.get("ppl_full") else "the first"
    return f"{scope} {w['wikitext2']} WikiText-2 and {w['ptb']} PTB test windows"


def _window_marks(rows: list[dict]) -> tuple[str, dict[int, str], str]:
    """The test windows most rows were scored on, and a mark (with its footnote) for each row
    scored on other windows, so that a partly rescored table says which numbers compare."""
    texts = [_windows_text(r) for r in rows]
    common = max(sorted(set(texts)), key=texts.count)
    others = sorted(set(texts) - {common})
    marks = {i: "†" * (others.index(t) + 1) for i, t in enumerate(texts) if t != common}
    notes = "".join(f" {'†' * (k + 1)} {t}." for k, t in enumerate(others))
    return common, marks, notes


def _shared_marks(rows: list[dict]) -> dict[int, str]:
    """A mark for each row that shows another row's figures, while that row still holds the
    same model (a row rerun since with another model no longer vouches for them)."""
    digest = {(r["ratio"], r.get("row")): r.get("model_sha256") for r in rows}
    return {i: "‡" for i, r in enumerate(rows) if "same_model_as" in r
            and digest.get((r["ratio"], r["same_model_as"])) == r.get("model_sha256")}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    base = rows[0]
    # ROWS order, a colour each (more rows than the default cycle has colours), baselines
    # dashed and the defaults bold, so that the H-GSP rows and the baselines separate
    names = [n for n in ROWS if any(r.get("row") == n for r in rows)]
    colours = plt.get_cmap("tab20").colors
    for ax, key, title in ((axes[0], "wikitext2", "WikiText-2 perplexity (log)"),
                           (axes[1], "zeroshot_mean", "zero-shot mean accuracy")):
        for i, name in enumerate(names):
            pts = sorted((r["params"] / 1e6, r[key]) for r in rows if r.get("row") == name)
            ax.plot(*zip(*pts), marker="o", label=ROWS[name][0], color=colours[i % 20],
                    linestyle="-" if name.startswith("hgsp") else "--",
                    linewidth=2.5 if name == "hgsp" else 1.2)
        ax.scatter([base["params"] / 1e6], [base[key]], marker="*", s=150, color="black",
                   label="base", zorder=5)
        ax.set_xlabel("parameters (M)")
        ax.set_title(title)
        if key == "wikitext2":
            ax.set_yscale("log")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)  # the temporary name has no .png
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from hgsp.assets import asset_paths
    from hgsp.evaluate import EvalSettings, check_data
    from hgsp.modelio import load_model

    torch.manual_seed(0)
    model_path = args.model or str(asset_paths()["model"])
    out_dir = Path(args.out_dir)
    work_dir = Path(args.work_dir) if args.work_dir else out_dir / "runs"
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    settings = EvalSettings(kinds=["ppl", "zeroshot", "efficiency"],
                            ppl_max_windows=args.ppl_max_windows,
                            zeroshot_tasks=["piqa", "hellaswag", "winogrande", "arc_easy"],
                            zeroshot_limit=args.zeroshot_limit, batch_sizes=(1,))
    if args.speed_only:
        return remeasure_speed(model_path, out_dir, work_dir, args)
    if args.ppl_only:
        return rescore_perplexity(model_path, out_dir, work_dir, args)
    check_data(settings)  # fail now, not after the first runs, if evaluation data is missing
    names = row_names(args.rows)
    ratios = parse_ratios(args.ratios)
    recorded = vars(args)
    if args.update:
        previous = json.loads((out_dir / "quality.json").read_text())
        rows = previous["rows"]  # each old row is replaced only once its new one is measured
        recorded = _updated_settings(previous["settings"], args)
    else:
        base = load_model(model_path, torch.float32, "cpu", None)
        rows = [{"ratio": 0.0, "label": "base", "layers_kept": base.model.config.num_hidden_layers,
                 **evaluate(base.model, base.tokenizer, settings, model_path)}]
        print(json.dumps(rows[-1]), flush=True)
    seen = measured_models(rows, recorded, args, {(n, r) for n in names for r in ratios})
    for ratio in ratios:
        for name in names:
            result, seconds = prune_row(model_path, name, ratio, args, work_dir)
            folder = result.results_dir / "models"
            digest = model_digest(folder)
            row = {"ratio": ratio, "row": name, "label": ROWS[name][0],
                   "achieved": result.summary["parameters"]["achieved_ratio_total"],
                   "layers_kept": result.summary["layers"]["kept"], "prune_s": round(seconds, 1),
                   "model_sha256": digest}
            twin = seen.get((ratio, digest))
            if twin is not None:
                row.update(shared_evaluation(twin))
            else:
                pruned = load_model(str(folder), torch.float32, "cpu", None)
                row.update(evaluate(pruned.model, pruned.tokenizer, settings, str(folder)))
                seen[(ratio, digest)] = row
            rows = _replaced(rows, row)
            print(json.dumps(row), flush=True)
            _write(out_dir, _ordered(rows), recorded)
    _write(out_dir, _ordered(rows), recorded)
    print(markdown(_ordered(rows), recorded))
    return 0


def _updated_settings(previous: dict, args) -> dict:
    """The settings of the table that ``--update`` changes, with this run added to its list of
    updates. The rows run now are measured at another time than the speed re-measurement, so
    that note is dropped until the next ``--speed_only``."""
    kept = {k: v for k, v in previous.items() if k != "speed_remeasured"}
    update = {"rows": args.rows, "ratios": args.ratios, "extra": args.extra,
              "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return {**kept, "updates": [*previous.get("updates", []), update]}


def remeasure_speed(model_path: str, out_dir: Path, work_dir: Path, args) -> int:
    """Decode tokens/s at batch 1 of every row again, all in one session.

    Pruned models missing from ``work_dir`` are pruned first, so that the timings that follow
    are minutes apart rather than interleaved with pruning. Every model is then timed
    ``--speed_passes`` times, in alternating order (forward, backward, ...), and the median
    kept, so that a drift of a shared machine's speed during the session hits every row alike.
    """
    from tqdm import tqdm

    from hgsp.efficiency import pass_orders
    from hgsp.evaluate import EvalSettings

    settings = EvalSettings(kinds=["efficiency"], batch_sizes=(1,))
    previous = json.loads((out_dir / "quality.json").read_text())
    rows = previous["rows"]
    timed = _timed_for(rows)
    folders = {i: _saved_model(model_path, rows[i], args, work_dir)
               for i in tqdm(sorted(set(timed.values())), desc="pruned models")}
    timings: dict[int, list[float]] = {i: [] for i in folders}
    for p, order in enumerate(pass_orders(list(folders), args.speed_passes)):
        for i in tqdm(order, desc=f"timing, pass {p + 1}/{args.speed_passes}"):
            eff = _evaluate_folder(folders[i], settings)["efficiency"]
            timings[i].append(eff["speed"]["batch1"]["decode_tokens_per_s"])
    for i, row in enumerate(rows):
        times = timings[timed[i]]
        row["decode_tok_s_b1"] = statistics.median(times)
        row["decode_tok_s_b1_passes"] = [round(t, 2) for t in times]
        print(f"{row['label']} {row['ratio']:g}: {row['decode_tok_s_b1']:.1f} tok/s "
              f"{row['decode_tok_s_b1_passes']}", flush=True)
    kept = {**previous["settings"], "speed_remeasured": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "speed_passes": args.speed_passes}
    _write(out_dir, _ordered(rows), kept)
    print(markdown(_ordered(rows), kept))
    return 0


def _timed_for(rows: list[dict]) -> dict[int, int]:
    """For each row, the row whose model is timed for it: the first row with the same model
    digest (so that rows sharing a model show one speed), else itself."""
    first: dict[str, int] = {}
    return {i: first.setdefault(r["model_sha256"], i) if r.get("model_sha256") else i
            for i, r in enumerate(rows)}


def _check_same_model(row: dict, summary: dict) -> None:
    """A saved (or pruned again) model must have the row's size and depth, or its speed would
    be put beside the figures of another model (after a change of the defaults, say)."""
    found = (summary["parameters"]["pruned_total"], summary["layers"]["kept"])
    if found != (row["params"], row["layers_kept"]):
        raise SystemExit(f"error: {row['label']} at {row['ratio']:g}: the saved model has "
                         f"{found[0]:,} parameters and {found[1]} layers, the table's row "
                         f"{row['params']:,} and {row['layers_kept']}; rerun the row with "
                         f"--update --rows {row['row']} --ratios {row['ratio']:g} first")


def _saved_model(model_path: str, row: dict, args, work_dir: Path) -> str:
    """The folder of a row's saved model (the base model for the base row), pruning it again
    first if it is missing."""
    if row["ratio"] == 0:
        return model_path
    run = work_dir / f"{row['row']}_r{row['ratio']:g}"
    if not (run / "models" / "config.json").exists():
        prune_row(model_path, row["row"], row["ratio"], args, work_dir)
    _check_same_model(row, json.loads((run / "summary.json").read_text()))
    if row.get("model_sha256") and model_digest(run / "models") != row["model_sha256"]:
        raise SystemExit(f"error: {row['label']} at {row['ratio']:g}: the saved model in {run} "
                         f"is not the table's (another model_sha256); rerun the row with "
                         f"--update --rows {row['row']} --ratios {row['ratio']:g} first")
    return str(run / "models")


def _evaluate_folder(folder: str, settings) -> dict:
    import torch

    from hgsp.evaluate import evaluate_model
    from hgsp.modelio import load_model

    loaded = load_model(folder, torch.float32, "cpu", None)
    return evaluate_model(loaded.model, loaded.tokenizer, settings, folder)


def _evaluate_saved(model_path: str, row: dict, args, work_dir: Path, settings) -> dict:
    """``settings`` evaluated on the saved model of a row of quality.json."""
    return _evaluate_folder(_saved_model(model_path, row, args, work_dir), settings)


def rescore_perplexity(model_path: str, out_dir: Path, work_dir: Path, args) -> int:
    """WikiText-2 and PTB perplexity of the rows again, one row at a time."""
    from hgsp.evaluate import EvalSettings

    settings = EvalSettings(kinds=["ppl"], ppl_max_windows=args.ppl_max_windows)
    previous = json.loads((out_dir / "quality.json").read_text())
    rows = previous["rows"]
    names = None if args.rows == "all" else set(row_names(args.rows))
    ratios = set(parse_ratios(args.ratios)) | {0.0}
    kept = {**previous["settings"], "ppl_max_windows": args.ppl_max_windows}
    scored: dict[tuple, dict] = {}  # (ratio, model digest) -> perplexity fields, this pass
    for row in rows:
        selected = row["ratio"] in ratios and (names is None or row.get("row", "base") in names)
        if not selected or (args.ppl_max_windows is None and row.get("ppl_full")):
            continue
        key = (row["ratio"], row.get("model_sha256") or id(row))
        if key not in scored:
            scored[key] = _ppl_fields(
                _evaluate_saved(model_path, row, args, work_dir, settings)["ppl"])
        row.update(scored[key])
        print(f"{row['label']} {row['ratio']:g}: {row['wikitext2']:.2f} / {row['ptb']:.2f} "
              f"({row['ppl_windows']})", flush=True)
        _write(out_dir, _ordered(rows), kept)
    print(markdown(_ordered(rows), kept))
    return 0


def _replaced(rows: list[dict], new: dict) -> list[dict]:
    """``rows`` with ``new`` in place of the row of the same name and ratio (if any). An
    interrupted ``--update`` thus keeps the old figures of the rows it did not reach."""
    return [r for r in rows if (r.get("row"), r["ratio"]) != (new["row"], new["ratio"])] + [new]


def _ordered(rows: list[dict]) -> list[dict]:
    """Base first, then by ratio in the order of :data:`ROWS`."""
    order = {name: i for i, name in enumerate(ROWS)}
    return sorted(rows, key=lambda r: (r["ratio"], order.get(r.get("row"), -1)))


def _write(out_dir: Path, rows: list[dict], settings: dict) -> None:
    import torch
    import transformers

    from hgsp.atomic import atomic_write

    doc = {"settings": settings, "machine": {"platform": platform.platform(),
                                               "cpus": os.cpu_count(),
                                               "torch": torch.__version__,
                                               "transformers": transformers.__version__},
           "rows": rows}
    # each file is written beside itself and renamed, so an interrupted run leaves the
    # previous table whole
    atomic_write(out_dir / "quality.json", lambda p: p.write_text(json.dumps(doc, indent=1)))
    atomic_write(out_dir / "quality.md", lambda p: p.write_text(markdown(rows, settings)))
    atomic_write(out_dir / "quality_vs_size.png", lambda p: plot(rows, p))


if __name__ == "__main__":
    sys.exit(main())
