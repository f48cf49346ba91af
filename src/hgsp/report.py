"""The human-readable report of a results folder: pictures, ``report.md`` and ``report.html``.

Everything is rebuilt from the files a run wrote (``summary.json``, ``logs/config.json``,
``analysis/*``, ``evaluation/evaluation_results.json``), so ``hgsp report RESULTS_DIR``
regenerates the same report at any time, and an old run gains a report by running it.

The report is a list of small blocks (headings, paragraphs, tables, figures) rendered twice:
to Markdown, and to one self-contained HTML file whose pictures are base64 data URIs, so the
single file opens anywhere (mail attachment, browser, no folder needed).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import json
import logging
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write
from .errors import UserError

log = logging.getLogger(__name__)

VIS_DIR = "visualization"
PICTURES = ("retention.png", "removal_delta.png", "score_distribution.png",
            "quality_vs_size.png")
STAGE_NAMES = {"load": "load model and data", "calibration": "calibration (importance)",
               "analysis": "layer/block removal analysis", "selection": "scoring and selection",
               "surgery": "surgery", "save": "save", "finetune": "recovery fine-tuning",
               "evaluation": "evaluation"}


# --------------------------------------------------------------------------- loading a run

@dataclass
class RunData:
    """The files of one results folder, parsed.

    Attributes:
        path: the results folder.
        summary: ``summary.json``.
        config: ``logs/config.json`` (empty if missing).
        layers: ``analysis/layer_summary.csv`` rows with int/bool values.
        layer_removal: ``analysis/layer_removal_ppl.json``; None when the analysis was skipped.
        block_removal: ``analysis/block_removal_ppl.json``; None when skipped.
        evaluation: ``evaluation/evaluation_results.json``; None when not evaluated.
    """

    path: Path
    summary: dict
    config: dict
    layers: list[dict]
    layer_removal: dict | None
    block_removal: dict | None
    evaluation: dict | None

    @property
    def arguments(self) -> dict:
        return self.config.get("arguments", {})

    @property
    def name(self) -> str:
        # A run is reported from its hidden temporary folder: the name comes from the config.
        return self.arguments.get("output_name") or self.path.name


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"'{path}' is not valid JSON ({exc}): was the run interrupted?") \
            from None


def _typed(value: str):
    """CSV text back to bool/int/float where it looks like one."""
    if value in ("True", "False"):
        return value == "True"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: _typed(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load_run(folder: str | os.PathLike) -> RunData:
    """Read a results folder.

    Raises:
        UserError: the folder does not exist or is not an hgsp results folder.
    """
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"'{path}' is not a directory: pass a results folder such as "
                        "results/NAME")
    summary = _read_json(path / "summary.json")
    if summary is None:
        raise UserError(f"'{path}' is not an hgsp results folder (no summary.json): pass a "
                        "folder written by `hgsp prune`, such as results/NAME")
    if "parameters" not in summary:
        raise UserError(f"'{path}' holds no pruning run (its summary.json has no parameter "
                        "counts): pass a folder written by `hgsp prune`")

    def analysis(name):
        doc = _read_json(path / "analysis" / name)
        return None if doc is None or doc.get("skipped") else doc

    return RunData(path=path, summary=summary,
                   config=_read_json(path / "logs" / "config.json") or {},
                   layers=_read_csv(path / "analysis" / "layer_summary.csv"),
                   layer_removal=analysis("layer_removal_ppl.json"),
                   block_removal=analysis("block_removal_ppl.json"),
                   evaluation=_read_json(path / "evaluation" / "evaluation_results.json"))


def group_scores(run: RunData) -> tuple[list[str], list[float], list[str]] | None:
    """Type, score and fate (``kept``/``score``/``collapse``) of every group, or None."""
    path = run.path / "analysis" / "global_group_table.csv"
    if not path.is_file():
        return None
    collapsed = set(run.summary.get("layers", {}).get("collapsed") or [])
    kinds, scores, status = [], [], []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        col = {name: i for i, name in enumerate(header)}
        for row in reader:
            kinds.append(row[col["type"]])
            scores.append(float(row[col["score"]]))
            if row[col["selected"]] != "1":
                status.append("kept")
            else:
                status.append("collapse" if int(row[col["layer"]]) in collapsed else "score")
    return kinds, scores, status


def score_cut(scores: list[float], status: list[str]) -> float | None:
    """Score of the highest-ranked group that the ranking (not the collapse) removed."""
    chosen = [s for s, st in zip(scores, status) if st == "score"]
    return max(chosen) if chosen else None


# --------------------------------------------------------------------------- evaluation views

MODEL_LABELS = {"base": "base", "pruned": "pruned", "model": "pruned",
                "finetuned": "fine-tuned"}


def evaluated_models(run: RunData) -> dict[str, dict]:
    """Evaluation results by column label, in reading order: base, pruned, fine-tuned.

    A model evaluated alone (``hgsp eval`` without a base) counts as the pruned one; with
    ``--finetune``, ``pruned`` is the model before fine-tuning.
    """
    models = (run.evaluation or {}).get("models", {})
    return {MODEL_LABELS[k]: models[k] for k in ("base", "pruned", "model", "finetuned")
            if models.get(k)}


def eval_models(run: RunData) -> tuple[dict | None, dict | None]:
    """(base, pruned) evaluation results, either None when not evaluated."""
    models = evaluated_models(run)
    return models.get("base"), models.get("pruned")


def ppl_metrics(result: dict | None) -> dict[str, float]:
    """``{"wikitext2@128": ppl, ...}`` of one evaluated model."""
    out = {}
    for dataset, by_len in ((result or {}).get("ppl") or {}).items():
        for seq_len, r in by_len.items():
            out[f"{dataset}@{seq_len}"] = r["ppl"]
    return out


def zeroshot_mean(result: dict | None) -> float | None:
    zs = (result or {}).get("zeroshot")
    return None if not zs else zs.get("mean_acc")


def decode_speed(result: dict | None, batch: int = 1) -> float | None:
    eff = (result or {}).get("efficiency") or {}
    return eff.get("speed", {}).get(f"batch{batch}", {}).get("decode_tokens_per_s")


# --------------------------------------------------------------------------- pictures

def make_pictures(run: RunData, out_dir: Path) -> dict[str, Path]:
    """Draw every picture the run's files support; returns ``{file name: path}``."""
    from . import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    removed = run.summary.get("parameters", {}).get("achieved_ratio_total", 0)
    if run.layers:
        made["retention.png"] = plots.retention_plot(
            run.layers, out_dir / "retention.png", run.arguments.get("epsilon"),
            title=f"What each layer keeps — {run.name} ({removed:.1%} of all parameters "
                  "removed)")
    if run.layer_removal and run.block_removal:
        made["removal_delta.png"] = _removal_picture(run, out_dir / "removal_delta.png")
    groups = group_scores(run)
    if groups:
        kinds, scores, status = groups
        temp = run.summary.get("score", {}).get("temperature")
        method = run.summary.get("method", "hgsp")
        if method == "hgsp":
            title = f"H-GSP scores of all {len(scores):,} groups (T = {temp:g}) and the cut"
            name = plots.H_GSP_SCORE
        else:  # a baseline ranks by its own metric; T means nothing there
            title = f"{method} scores of all {len(scores):,} groups and the cut"
            name = f"{method} score (the method's own importance metric)"
        made["score_distribution.png"] = plots.score_plot(
            kinds, scores, status, score_cut(scores, status), out_dir / "score_distribution.png",
            title=title, score_name=name)
    points = quality_points(run)
    if points:
        made_path = plots.quality_vs_size_plot(points, out_dir / "quality_vs_size.png",
                                               title=f"Quality vs size — {run.name} against "
                                                     "its base model")
        if made_path is not None:
            made["quality_vs_size.png"] = made_path
    # A regenerated report must not show a picture its data no longer supports.
    for name in PICTURES:
        if name not in made and (out_dir / name).exists():
            (out_dir / name).unlink()
    return made


def _removal_picture(run: RunData, path: Path) -> Path:
    from . import plots

    lr, br = run.layer_removal, run.block_removal
    loss = lr.get("delta_metric") == "loss"
    return plots.removal_plot(
        [e["delta"] for e in lr["layers"]], [e["attn_delta"] for e in br["layers"]],
        [e["mlp_delta"] for e in br["layers"]], [e["mode"] for e in lr["layers"]],
        lr.get("tau"), path, base_ppl=lr.get("base_ppl"),
        removed_layers=run.summary.get("layers", {}).get("removed") or [],
        unit="loss (nats per token)" if loss else "perplexity",
        title=f"{'Loss' if loss else 'Perplexity'} increase Δ "
              f"when a layer or block is skipped (base perplexity {lr['base_ppl']:.4g}, "
              f"{lr.get('tokens', '?')} tokens)")


def quality_points(run: RunData):
    """Every evaluated model as a point of the quality-vs-size picture ([] if none)."""
    from .plots import QualityPoint

    p = run.summary["parameters"]
    points = []
    for label, result in evaluated_models(run).items():
        metrics = ppl_metrics(result)
        if zeroshot_mean(result) is not None:
            metrics["zero-shot mean acc"] = zeroshot_mean(result)
        if not metrics:
            continue
        is_base = label == "base"
        params = p["base_total"] if is_base else p["pruned_total"]
        name = label if is_base else f"{run.name} ({label})" if label != "pruned" else run.name
        points.append(QualityPoint(name, params, metrics, series=label, is_base=is_base))
    return points


# --------------------------------------------------------------------------- document blocks

@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Code:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    # Per-row CSS class in the HTML (e.g. greying removed layers); ignored in Markdown.
    row_classes: list[str] = field(default_factory=list)
    # Right-align numeric cells in the HTML; off for key/value tables of mixed text.
    align_numbers: bool = True


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Details:
    summary: str
    blocks: list


# --------------------------------------------------------------------------- number formats

def fmt_int(n) -> str:
    return "—" if n is None else f"{int(n):,}"


def fmt_num(x, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"  # 70,891 reads better than 7.089e+04
    return f"{x:.{digits}g}"


def fmt_acc(x) -> str:
    return "—" if x is None else f"{x:.4f}"


def fmt_pct(x, digits: int = 2) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def fmt_millions(n) -> str:
    return "—" if n is None else f"{n / 1e6:,.2f} M"


def fmt_bytes(n) -> str:
    return "—" if n is None else f"{n / 2**20:,.1f} MiB"


def fmt_ratio(x) -> str:
    if x is None:
        return "—"
    return f"{x:,.0f}×" if x >= 100 else f"{x:.3f}×"


# --------------------------------------------------------------------------- report sections

# The H-GSP settings of the usage document: shown even at their defaults, so the command
# still says what was run after a default changes.
ALWAYS_SHOWN = ("method", "pruning_ratio", "temperature", "epsilon", "dataset",
                "importance_method")


def equivalent_command(arguments: dict) -> str:
    """The ``hgsp prune`` command that repeats the run: required flags and non-defaults."""
    from .config import PruneConfig

    lines = ["hgsp prune"]
    for f in dataclasses.fields(PruneConfig):
        if f.name not in arguments or _without_effect(f.name, arguments):
            continue
        value = arguments[f.name]
        if f.name not in ALWAYS_SHOWN and not f.metadata.get("required") and value == f.default:
            continue
        if isinstance(value, bool):
            if value:
                lines.append(f"--{f.name}")
            elif f.metadata.get("negatable"):
                lines.append(f"--no-{f.name}")
            continue
        lines.append(f"--{f.name} {shlex.quote(str(value))}")
    return " \\\n  ".join(lines)


def _without_effect(name: str, arguments: dict) -> bool:
    """Evaluation and fine-tuning flags of a run that did neither: noise in the command."""
    if name.startswith("eval_"):
        return not arguments.get("run_evaluation")
    if name.startswith(("finetune_", "lora_")):
        return not arguments.get("finetune")
    return False


def _tau_text(run: RunData) -> str:
    tau = run.summary.get("score", {}).get("tau")
    if run.summary.get("score", {}).get("temperature") == 0:
        return "not used (T = 0)"
    quantile = run.arguments.get("tau_quantile", 0.25)
    source = "given" if run.arguments.get("tau") is not None else \
        f"automatic: {quantile * 100:g}th percentile of Δ_layer"
    return f"{fmt_num(tau)} ({source})"


def _norm_text(run: RunData) -> str:
    norm = run.summary.get("score", {}).get("importance_norm")
    if norm is None:
        return "not used" if run.summary.get("score", {}).get("temperature") == 0 else "—"
    chosen = "auto, by the pruning ratio" if run.arguments.get("importance_norm") == "auto" \
        else "given"
    return f"per {norm} ({chosen})" if norm != "none" else "none (given)"


def _compensation_text(summary: dict) -> str:
    if summary.get("refit_outputs"):
        return " with bias compensation and refitted output projections"
    return " with bias compensation" if summary.get("bias_compensation") else ""


def settings_section(run: RunData) -> list:
    a, s = run.arguments, run.summary
    cal = s.get("calibration") or {}
    resolved = run.config.get("resolved", {})
    rows = [
        ["base model", f"`{s.get('base_model')}` ({s.get('base_model_kind', '?')})"],
        ["target pruning ratio", fmt_pct(s["parameters"]["target_ratio"])],
        ["method", f"`{a.get('method', 'hgsp')}`" + _compensation_text(s)],
        ["importance method", f"`{a.get('importance_method', '?')}`"],
        ["temperature T", fmt_num(s.get("score", {}).get("temperature"))],
        ["gate threshold τ", _tau_text(run)],
        ["importance normalization", _norm_text(run)],
        ["collapse threshold ε", fmt_num(a.get("epsilon"))],
        ["calibration corpus", f"`{a.get('dataset', '?')}`: {cal.get('corpus', 'not used')}"],
        ["calibration windows", f"{a.get('num_examples', '?')} × {a.get('seq_len', '?')} "
                                "tokens" if cal else "not used"],
        ["analysis windows", f"{len(cal.get('analysis_windows') or [])} × "
                             f"{a.get('seq_len', '?')} tokens" if run.layer_removal
         else "skipped"],
        ["seed", str(a.get("seed", "?"))],
        ["device / dtype", f"{resolved.get('device', '?')} / {resolved.get('dtype', '?')}"],
    ]
    blocks = [Heading("Command and settings"),
              Para("The command below repeats this run (besides the H-GSP settings, flags at "
                   "their defaults are omitted; `python run_global_pruning.py` takes the same "
                   "flags)."),
              Code(equivalent_command(a)) if a else Para("(logs/config.json is missing)"),
              Table(["setting", "value"], rows, align_numbers=False)]
    if a:
        blocks.append(Details("All arguments", [Table(
            ["argument", "value"], [[f"`--{k}`", f"`{v}`"] for k, v in a.items()],
            align_numbers=False)]))
    return blocks


def parameters_section(run: RunData) -> list:
    p, lay = run.summary["parameters"], run.summary.get("layers", {})
    other_base = p["base_total"] - p["base_decoder"]
    other_pruned = p["pruned_total"] - p["pruned_decoder"]
    rows = [
        ["all parameters", fmt_int(p["base_total"]), fmt_int(p["pruned_total"]),
         fmt_int(p["removed"]), fmt_pct(p["achieved_ratio_total"])],
        ["decoder layers", fmt_int(p["base_decoder"]), fmt_int(p["pruned_decoder"]),
         fmt_int(p["base_decoder"] - p["pruned_decoder"]), fmt_pct(p["achieved_ratio_decoder"])],
        ["embeddings, final norm, lm_head", fmt_int(other_base), fmt_int(other_pruned),
         fmt_int(other_base - other_pruned),
         fmt_pct((other_base - other_pruned) / other_base if other_base else None)],
    ]
    removed = lay.get("removed") or []
    text = (f"**Achieved ratio: {fmt_pct(p['achieved_ratio_total'])} of all parameters "
            f"removed** (target {fmt_pct(p['target_ratio'])} = {fmt_int(p['target_removed'])} "
            f"parameters; difference {p['removed'] - p['target_removed']:+,}). "
            f"Layers kept: {lay.get('kept', '?')} of {lay.get('base', '?')}.")
    collapsed = lay.get("collapsed") or []
    how = ("" if not collapsed else "; all by collapse (kept < ε)"
           if set(collapsed) == set(removed) else f"; by collapse: {_list_text(collapsed)}")
    attn, mlp = lay.get("attn_blocks_removed") or [], lay.get("mlp_blocks_removed") or []
    facts = [f"Layers removed: {_count_text(removed)}{how}.",
             f"Attention blocks removed: {_count_text(attn)}.",
             f"MLP blocks removed: {_count_text(mlp)}.",
             "The block counts include the blocks of removed layers."]
    thinned = lay.get("kept_below_epsilon") or []
    if thinned:  # the ratio won over ε: say which layers stayed thin
        facts.append(f"Kept below ε because removing them whole would exceed the ratio: "
                     f"{_count_text(thinned)}.")
    return [Heading("Parameters"), Para(text),
            Table(["", "before", "after", "removed", "removed share"], rows),
            Para(" ".join(facts))]


def _count_text(items) -> str:
    """``[0, 12, 13]`` → ``3 (layers 0, 12, 13)``, so a lone index is not read as a count."""
    if not items:
        return "none"
    return f"{len(items)} (layer{'s' if len(items) > 1 else ''} {_list_text(items)})"


def _list_text(items) -> str:
    """``[3, 12, 13, 14, 20]`` → ``3, 12–14, 20``."""
    if not items:
        return "none"
    items, parts, start = sorted(items), [], None
    for i, n in enumerate(items):
        start = n if start is None else start
        if i + 1 == len(items) or items[i + 1] != n + 1:
            parts.append(str(n) if n == start else f"{start}, {n}" if n == start + 1
                         else f"{start}–{n}")
            start = None
    return ", ".join(parts)


def _status(row: dict) -> tuple[str, str]:
    """Text and CSS class of a layer's fate."""
    if row["layer_removed"]:
        return ("removed (collapse)" if row["collapsed"] else "removed"), "removed"
    if row["attn_removed"] and row["mlp_removed"]:
        return "both blocks removed", "removed"
    if row["attn_removed"]:
        return "attention removed", "partial"
    if row["mlp_removed"]:
        return "MLP removed", "partial"
    changed = (row["kv_heads_after"] < row["kv_heads_before"]
               or row["channels_after"] < row["channels_before"])
    return ("narrowed" if changed else "unchanged"), ""


def layer_section(run: RunData) -> list:
    lr = {e["layer"]: e for e in (run.layer_removal or {}).get("layers", [])}
    br = {e["layer"]: e for e in (run.block_removal or {}).get("layers", [])}
    modes = {"layer": "Layer-Dominant", "block": "Block-Dominant"}
    rows, classes = [], []
    for r in run.layers:
        i = r["layer"]
        status, css = _status(r)
        rows.append([
            str(i), modes.get(r["mode"], "—"),
            fmt_num(lr.get(i, {}).get("delta")), fmt_num(br.get(i, {}).get("attn_delta")),
            fmt_num(br.get(i, {}).get("mlp_delta")),
            f"{r['kv_heads_after']}/{r['kv_heads_before']}",
            f"{r['q_heads_after']}/{r['q_heads_before']}",
            f"{r['channels_after']}/{r['channels_before']}",
            fmt_int(r["params_after"]), fmt_pct(r["params_after"] / r["params_before"], 1),
            status])
        classes.append(css)
    text = ("One row per layer of the base model. Mode: Layer-Dominant layers "
            "(Δ_layer < τ) score all their groups by the layer's Δ; Block-Dominant layers "
            "score attention groups by Δ_attn and MLP channels by Δ_mlp. Heads and channels "
            "are kept/before.")
    if not run.layer_removal:
        text += " The removal analysis was skipped (T = 0), so there is no Δ and no mode."
    return [Heading("Per-layer table"), Para(text),
            Table(["layer", "mode", "Δ layer", "Δ attn", "Δ MLP", "KV heads", "Q heads",
                   "MLP channels", "params kept", "kept", "status"], rows, classes)]


def pictures_section(pictures: dict[str, Path], vis_rel: str) -> list:
    captions = {
        "retention.png": "Share of attention groups (KV heads with their query heads), MLP "
                         "channels and parameters each layer keeps. Shaded: removed layers; "
                         "× marks a block removed from a kept layer.",
        "removal_delta.png": "Perplexity (or, with --delta_metric loss, loss) increase when "
                             "each layer is skipped (bars, coloured "
                             "by the mode τ gives the layer) and when only its attention or "
                             "MLP block is removed (markers). Log scale.",
        "score_distribution.png": "Each group's score (H-GSP's S, or a baseline method's own "
                                  "metric); the lowest go first until the "
                                  "budget is met (dashed line: the cut). Groups above the cut "
                                  "may still go when their layer collapses.",
        "quality_vs_size.png": "Evaluation results of the pruned model against its base "
                               "model (the star).",
    }
    blocks = [Heading("Pictures")]
    for name in PICTURES:
        if name in pictures:
            blocks.append(Figure(Path(vis_rel) / name, captions[name]))
    return blocks if len(blocks) > 1 else []


def evaluation_section(run: RunData) -> list:
    models = evaluated_models(run)
    if not models:
        return [Heading("Evaluation"),
                Para("Not evaluated. Run with `--run_evaluation ppl` (or `ppl,zeroshot,"
                     "efficiency`, or `all`) to compare the pruned model with its base; "
                     "`hgsp eval` evaluates a saved model later.")]
    blocks = [Heading("Evaluation")]
    if "fine-tuned" in models:
        blocks.append(Para("**pruned** is the model before recovery fine-tuning, "
                           "**fine-tuned** the one saved in `models/`."))
    blocks += _ppl_blocks(models)
    blocks += _zeroshot_blocks(models)
    blocks += _efficiency_blocks(models)
    blocks.append(Para(_evaluation_note(run.evaluation)))
    return blocks


def _evaluation_note(doc: dict) -> str:
    """When and where it ran, and a warning when only part of the data was evaluated."""
    settings, machine = doc.get("settings", {}), doc.get("machine", {})
    text = (f"Evaluated {doc.get('timestamp', '?')} on {machine.get('device', '?')} "
            f"({machine.get('threads', '?')} threads): {', '.join(settings.get('kinds', []))}.")
    caps = []
    if settings.get("ppl_max_windows"):
        caps.append(f"the first {settings['ppl_max_windows']} perplexity windows")
    if settings.get("zeroshot_limit") and "zeroshot" in settings.get("kinds", []):
        caps.append(f"the first {settings['zeroshot_limit']} documents per zero-shot task")
    if caps:
        text += (f" **Quick look: only {' and '.join(caps)} were evaluated**; these numbers do "
                 "not compare with full evaluations.")
    return text


def _compared(models: dict[str, dict]) -> list[str]:
    """Labels shown relative to the base model (all but the base, if there is one)."""
    return [m for m in models if m != "base"] if "base" in models else []


def _ppl_blocks(models: dict[str, dict]) -> list:
    first = next(iter(models.values()))
    rows = []
    for dataset, by_len in (first.get("ppl") or {}).items():
        for seq_len, r in by_len.items():
            ppl = {m: (res.get("ppl") or {}).get(dataset, {}).get(seq_len, {}).get("ppl")
                   for m, res in models.items()}
            windows = f"{r.get('windows')}" + (f" of {r.get('available_windows')}"
                                               if r.get("capped") else "")
            rows.append([dataset, r.get("split", "?"), str(seq_len), windows,
                         *(fmt_num(ppl[m]) for m in models),
                         *(fmt_ratio(ppl[m] / ppl["base"] if ppl[m] and ppl["base"] else None)
                           for m in _compared(models))])
    if not rows:
        return []
    return [Heading("Perplexity", 3),
            Table(["dataset", "split", "window (tokens)", "windows", *models,
                   *(f"{m} / base" for m in _compared(models))], rows)]


def _zeroshot_blocks(models: dict[str, dict]) -> list:
    zs = {m: res["zeroshot"] for m, res in models.items() if res.get("zeroshot")}
    if not zs:
        return []
    first = next(iter(zs.values()))
    compared = [m for m in _compared(models) if m in zs]
    rows = []
    for task in first.get("tasks", {}):
        per = {m: z.get("tasks", {}).get(task, {}) for m, z in zs.items()}
        rows.append([task, fmt_int(per[next(iter(per))].get("n")),
                     *(fmt_acc(per[m].get(k)) for m in zs for k in ("acc", "acc_norm")),
                     *(_diff(per[m].get("acc"), per["base"].get("acc")) for m in compared)])
    rows.append(["**mean**", "",
                 *(fmt_acc(zs[m].get(k)) for m in zs for k in ("mean_acc", "mean_acc_norm")),
                 *(_diff(zs[m].get("mean_acc"), zs["base"].get("mean_acc"))
                   for m in compared)])
    note = ""
    if first.get("acc_norm_from_acc"):
        note = (f" Tasks without acc_norm ({', '.join(first['acc_norm_from_acc'])}) enter the "
                "acc_norm mean with their acc.")
    return [Heading("Zero-shot accuracy", 3),
            Para(f"{first.get('num_fewshot', 0)}-shot, lm-evaluation-harness "
                 f"{first.get('lm_eval_version', '?')}"
                 + (f", first {first['limit']} documents per task" if first.get("limit")
                    else "") + "." + note),
            Table(["task", "n", *(f"{m} {k}" for m in zs for k in ("acc", "acc_norm")),
                   *(f"Δ acc {m}" for m in compared)], rows)]


def _diff(value, base) -> str:
    return "—" if value is None or base is None else f"{value - base:+.4f}"


def _efficiency_rows(eff: dict) -> dict[str, tuple[float | None, callable]]:
    """Figure name → (value, formatter)."""
    rows = {
        "parameters": (eff["parameters"]["total"], fmt_int),
        "non-embedding parameters": (eff["parameters"]["non_embedding"], fmt_int),
        f"MACs per token (context {eff['macs_per_token'].get('context')})":
            (eff["macs_per_token"]["total"], fmt_int),
        "weights in memory": (eff.get("weight_bytes"), fmt_bytes),
        "weights on disk": (eff.get("disk_bytes"), fmt_bytes),
    }
    for key, sp in eff.get("speed", {}).items():
        if not key.startswith("batch"):
            continue
        batch = key[len("batch"):]
        rows[f"prefill latency, batch {batch}"] = (sp["prefill_latency_s"] * 1000,
                                                   lambda v: f"{v:,.1f} ms")
        rows[f"decode speed, batch {batch}"] = (sp["decode_tokens_per_s"],
                                                lambda v: f"{v:,.1f} tok/s")
    mem = eff.get("peak_memory", {})
    if "model_bytes" in mem:  # the model's own: weights + what running it added
        rows["memory of the model (weights + working)"] = (mem["model_bytes"], fmt_bytes)
    rows[f"peak memory of the process ({mem.get('kind', '?')})"] = (mem.get("peak_bytes"),
                                                                   fmt_bytes)
    return rows


def _efficiency_blocks(models: dict[str, dict]) -> list:
    effs = {m: _efficiency_rows(res["efficiency"]) for m, res in models.items()
            if res.get("efficiency")}
    if not effs:
        return []
    compared = [m for m in _compared(models) if m in effs]
    first = next(iter(effs.values()))
    rows = []
    for name, (_, fmt) in first.items():
        values = {m: effs[m].get(name, (None,))[0] for m in effs}
        # the process peak holds every model loaded at the time: no ratio between models
        comparable = not name.startswith("peak memory of the process")
        rows.append([name, *("—" if values[m] is None else fmt(values[m]) for m in effs),
                     *(fmt_ratio(values[m] / values["base"] if comparable
                                 and values[m] is not None and values["base"] else None)
                       for m in compared)])
    sp = next(res["efficiency"] for res in models.values() if res.get("efficiency"))["speed"]
    return [Heading("Size and speed", 3),
            Para(f"Greedy decoding with the KV cache, prompt {sp.get('prompt_len')} tokens, "
                 f"{sp.get('new_tokens')} new tokens, median of {sp.get('repeats')} repeats; "
                 "all models measured in the same process. Decode speed: a ratio above 1 is "
                 "faster; other figures: below 1 is smaller."),
            Table(["figure", *effs, *(f"{m} / base" for m in compared)], rows)]


def finetune_section(run: RunData) -> list:
    """Recovery fine-tuning figures from ``summary.json`` (nothing if the run did none)."""
    ft = run.summary.get("finetune")
    if not ft:
        return []

    def arrow(a, b):
        return f"{fmt_num(ft.get(a))} → {fmt_num(ft.get(b))}"

    rows = [["method", f"`{ft.get('method')}`"], ["data", str(ft.get("data"))],
            ["examples × epochs", f"{fmt_int(ft.get('examples'))} × {fmt_num(ft.get('epochs'))}"],
            ["optimizer steps", fmt_int(ft.get("optimizer_steps"))],
            ["learning rate", fmt_num(ft.get("learning_rate"))],
            ["training loss (first → last)", arrow("train_loss_first", "train_loss_last")],
            ["validation loss (before → after)", arrow("val_loss_before", "val_loss_after")],
            ["training time", f"{fmt_num(ft.get('train_seconds'))} s"],
            ["peak memory", fmt_bytes(ft.get("peak_memory_bytes"))]]
    return [Heading("Recovery fine-tuning"),
            Para(f"`models/` holds the fine-tuned model; the training log is "
                 f"`{ft.get('log', 'logs/finetune_log.json')}`."),
            Table(["", "value"], rows, align_numbers=False)]


def timings_section(run: RunData) -> list:
    times = run.summary.get("timings_s") or {}
    total = sum(times.values())
    rows = [[STAGE_NAMES.get(k, k), f"{v:,.1f}", fmt_pct(v / total if total else None, 1)]
            for k, v in times.items()]
    rows.append(["**total**", f"{total:,.1f}", "100.0%" if total else "—"])
    start, end = _log_span(run.path / "logs" / "run.log")
    span = f" Run log from {start} to {end}." if start else ""
    return [Heading("Timings"), Para("Wall time of each stage in seconds." + span),
            Table(["stage", "seconds", "share"], rows)]


def _log_span(path: Path) -> tuple[str | None, str | None]:
    """First and last timestamp of ``run.log``."""
    if not path.is_file():
        return None, None
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", path.read_text(errors="replace"),
                        re.MULTILINE)
    return (stamps[0], stamps[-1]) if stamps else (None, None)


def versions_section(run: RunData) -> list:
    import matplotlib

    from . import __version__

    versions = dict(run.config.get("versions", {}))
    eval_versions = (run.evaluation or {}).get("versions", {})
    if eval_versions.get("lm_eval") and (run.evaluation or {}).get("models", {}):
        versions["lm_eval"] = eval_versions["lm_eval"]
    machine = run.config.get("machine", {})
    rows = [[k, f"`{v}`"] for k, v in versions.items()]
    rows.append(["machine", f"{machine.get('platform', '?')} ({machine.get('processor', '?')})"])
    rows.append(["report", f"hgsp {__version__}, matplotlib {matplotlib.__version__}"])
    return [Heading("Versions"), Table(["component", "version"], rows, align_numbers=False)]


FILES = [
    ("summary.json", "parameters before/after, achieved ratios, removed layers and blocks, τ "
                     "and modes, calibration windows, stage times"),
    ("analysis/layer_removal_ppl.json", "base perplexity; per layer: ppl and Δ with the layer "
                                        "skipped, mode; τ"),
    ("analysis/block_removal_ppl.json", "per layer: ppl and Δ with the attention or MLP block "
                                        "removed"),
    ("analysis/global_group_table.csv", "every group with importance, cost, Δ, score, selected"),
    ("analysis/groups_to_prune.csv", "the removed groups, lowest score first, with the reason "
                                     "(score or collapse)"),
    ("analysis/pruning_plan.json", "kept KV heads and MLP channels per layer (reapplies the "
                                   "pruning)"),
    ("analysis/layer_summary.csv", "the per-layer table above, as CSV"),
    ("evaluation/evaluation_results.json", "evaluation of base and pruned model"),
    ("models/", "the pruned model (Hugging Face folder)"),
    ("visualization/*.png", "the pictures of this report"),
    ("logs/run.log", "the run's log"),
    ("logs/config.json", "resolved arguments, device, dtype and versions"),
]


def files_section(run: RunData) -> list:
    files = list(FILES)
    if run.summary.get("finetune"):
        i = files.index(("models/", "the pruned model (Hugging Face folder)"))
        files[i:i + 1] = [("models/", "the fine-tuned model (Hugging Face folder)"),
                          ("models/pruned_before_finetune/", "the pruned model before "
                                                             "fine-tuning")]
    return [Heading("Files"), Table(["file", "contents"],
                                    [[f"`{name}`", text] for name, text in files])]


def build_report(run: RunData, pictures: dict[str, Path],
                 shown_path: Path | None = None) -> list:
    """Every block of the report, in reading order."""
    return [Heading(f"hgsp pruning report: {run.name}", 1),
            *parameters_section(run), *settings_section(run),
            *pictures_section(pictures, VIS_DIR), *layer_section(run),
            *finetune_section(run), *evaluation_section(run), *timings_section(run),
            *versions_section(run),
            *files_section(run),
            Para(f"Regenerate this report with `hgsp report {shown_path or run.path}`.")]


# --------------------------------------------------------------------------- renderers

def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Code):
            out.append(f"```bash\n{b.text}\n```")
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                     "|" + "|".join("---" for _ in b.header) + "|"]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif isinstance(b, Figure):
            out.append(f"![{b.caption}]({b.path.as_posix()})\n\n*{b.caption}*")
        elif isinstance(b, Details):
            out.append(f"<details><summary>{b.summary}</summary>\n\n"
                       f"{to_markdown(b.blocks).strip()}\n\n</details>")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escape, then the two inline marks the report uses: `code` and **bold**."""
    text = html.escape(text, quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


_NUMERIC = re.compile(r"^[\s+\-−—]?[\d,.]+\s*(%|×|M|MiB|ms|tok/s)?$|^[\d]+/[\d]+$|^—$|^∞$")


def _html_table(t: Table) -> str:
    head = "".join(f"<th>{_inline(h)}</th>" for h in t.header)
    body = []
    for i, row in enumerate(t.rows):
        css = t.row_classes[i] if i < len(t.row_classes) and t.row_classes[i] else ""
        cells = "".join(f'<td class="num">{_inline(c)}</td>'
                        if t.align_numbers and _NUMERIC.match(c) else f"<td>{_inline(c)}</td>"
                        for c in row)
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: list, root: Path, title: str) -> str:
    """One self-contained page; figures are read from ``root`` and embedded."""
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Code):
            parts.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif isinstance(b, Table):
            parts.append(_html_table(b))
        elif isinstance(b, Figure):
            parts.append(f'<figure><img src="{_data_uri(root / b.path)}" '
                         f'alt="{html.escape(b.caption)}"><figcaption>{_inline(b.caption)}'
                         "</figcaption></figure>")
        elif isinstance(b, Details):
            parts.append(f"<details><summary>{_inline(b.summary)}</summary>"
                         f"{_body(to_html(b.blocks, root, title))}</details>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


def _body(page: str) -> str:
    return page.split("<body>\n", 1)[1].rsplit("\n</body>", 1)[0]


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 max-width:1140px;margin:2em auto;padding:0 1.2em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #4C72B0;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.15em}
h3{font-size:1.05em;margin-top:1.3em}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:.88em}
th,td{border:1px solid #d6d6d6;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#eef2f8}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody tr:nth-child(even){background:#fafafa}
tr.removed td{color:#999;background:#fbeaea}
tr.partial td{background:#fff6e6}
code{background:#f2f2f2;padding:0 .25em;border-radius:3px;font-size:.92em}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:.8em;overflow-x:auto}
pre code{background:none;padding:0}
figure{margin:1em 0 1.6em}
figure img{max-width:100%;border:1px solid #e3e3e3}
figcaption{font-size:.88em;color:#555;margin-top:.3em}
details{margin:.4em 0 1em}
summary{cursor:pointer;color:#4C72B0}
"""


# --------------------------------------------------------------------------- entry points

def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_report(folder: str | os.PathLike, shown_path: Path | None = None) -> list[Path]:
    """Draw the pictures and write ``report.md`` and ``report.html`` into a results folder.

    Args:
        folder: the results folder.
        shown_path: the folder's name in the report text, when ``folder`` is the temporary
            folder of a run that is still being written.

    Returns:
        The files written.

    Raises:
        UserError: ``folder`` is not a results folder.
    """
    run = load_run(folder)
    pictures = make_pictures(run, run.path / VIS_DIR)
    blocks = build_report(run, pictures, shown_path)
    md, page = run.path / "report.md", run.path / "report.html"
    _write_text(md, to_markdown(blocks))
    _write_text(page, to_html(blocks, run.path, f"H-GSP report: {run.name}"))
    # A run's report is written in its temporary folder; name where it will be once renamed.
    shown = Path(shown_path) if shown_path is not None else run.path
    log.info("report: %s, %s (%d pictures)", shown / md.name, shown / page.name, len(pictures))
    return [*pictures.values(), md, page]


def try_write_report(folder: Path, final: Path | None = None) -> bool:
    """:func:`write_report`, but a failure only logs a warning: the run itself is complete.

    Args:
        folder: the results folder (during a run, its temporary folder).
        final: where the folder will be, for the hint in the warning.
    """
    try:
        write_report(folder, final)
        return True
    except Exception as exc:  # noqa: BLE001 - a broken picture must never lose a finished run
        log.warning("could not write the report (%s: %s); the results are complete, retry with "
                    "`hgsp report %s`", type(exc).__name__, exc, final or folder)
        return False
