"""Pictures of a pruning run, drawn headless with matplotlib.

Every function takes plain numbers (no results-folder knowledge: that is :mod:`hgsp.report`)
and writes one PNG. Figures are built with the object API (``Figure`` + Agg canvas) rather
than ``pyplot``, so drawing keeps no global state and never needs a display.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

# Headless by default; but a process that already imported pyplot (a notebook) chose its own
# backend, and switching it under the user would break their plots. We never use pyplot.
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import (  # noqa: E402
    FuncFormatter,
    LogLocator,
    MaxNLocator,
    NullFormatter,
    PercentFormatter,
)

from .atomic import atomic_write  # noqa: E402

log = logging.getLogger(__name__)

DPI = 110
ATTN = "#4C72B0"
MLP = "#DD8452"
KEPT = "#8DA0CB"
REMOVED = "#E15759"
COLLAPSED = "#9467BD"
LAYER_MODE = "#59A14F"
BLOCK_MODE = "#76B7B2"
REMOVED_SPAN = "#F6D5D5"
HATCH = "#D99A9A"


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    # format= because the temporary name does not end in .png
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    log.debug("picture: %s", path)
    return path


def _layer_axis(ax, n_layers: int) -> None:
    """Integer layer ticks: every layer up to 40, else about 30 labels so they stay legible."""
    ax.set_xlim(-0.6, n_layers - 0.4)
    if n_layers <= 40:
        ax.set_xticks(range(n_layers))
        ax.tick_params(axis="x", labelsize=8 if n_layers > 24 else 10)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=30, integer=True))
    ax.set_xlabel("decoder layer")


def _shade_removed_layers(ax, layers: list[dict]) -> list:
    """Background spans over removed layers; returns legend handles for what was drawn."""
    handles = []
    drawn = set()
    for row in layers:
        if not row["layer_removed"]:
            continue
        collapsed = row["collapsed"]
        # The hatch is drawn in the edge colour, so the edge gets a colour but no width.
        ax.axvspan(row["layer"] - 0.5, row["layer"] + 0.5, facecolor=REMOVED_SPAN,
                   edgecolor=HATCH, lw=0, hatch="///" if collapsed else None, zorder=0)
        drawn.add(collapsed)
    if False in drawn:
        handles.append(Patch(color=REMOVED_SPAN, label="layer removed"))
    if True in drawn:
        handles.append(Patch(facecolor=REMOVED_SPAN, hatch="///", edgecolor=HATCH,
                             label="layer removed (collapse: kept < ε)"))
    return handles


def retention_plot(layers: list[dict], path: Path, epsilon: float | None = None,
                   title: str = "") -> Path:
    """Per-layer share of attention groups, MLP channels and parameters kept.

    Args:
        layers: rows of ``layer_summary.csv`` with typed values.
        path: PNG to write.
        epsilon: collapse threshold, drawn as a line on the parameter share.
        title: figure title.
    """
    n = len(layers)
    fig, axes = _figure(max(8.0, min(16.0, 0.32 * n + 4)), 4.2)
    ax = axes[0][0]
    x = [r["layer"] for r in layers]
    attn = [r["kv_heads_after"] / r["kv_heads_before"] for r in layers]
    mlp = [r["channels_after"] / r["channels_before"] for r in layers]
    params = [r["params_after"] / r["params_before"] for r in layers]
    spans = _shade_removed_layers(ax, layers)
    handles = [ax.bar([i - 0.2 for i in x], attn, 0.4, color=ATTN,
                      label="attention (KV groups kept)"),
               ax.bar([i + 0.2 for i in x], mlp, 0.4, color=MLP, label="MLP (channels kept)"),
               ax.plot(x, params, color="black", marker="o", ms=3.5, lw=1.2,
                       label="parameters kept")[0]]
    # A removed block inside a kept layer has a zero-height bar: mark it so it is not missed.
    for r in layers:
        if r["layer_removed"]:
            continue
        if r["attn_removed"]:
            ax.plot(r["layer"] - 0.2, 0.03, marker="x", color=ATTN, ms=7, mew=2)
        if r["mlp_removed"]:
            ax.plot(r["layer"] + 0.2, 0.03, marker="x", color=MLP, ms=7, mew=2)
    if any(r["attn_removed"] or r["mlp_removed"] for r in layers if not r["layer_removed"]):
        handles.append(Line2D([], [], ls="", marker="x", color="#555", ms=7, mew=2,
                              label="block removed"))
    if epsilon:
        handles.append(ax.axhline(epsilon, color="#777", ls="--", lw=1,
                                  label=f"ε = {epsilon:g} (collapse threshold)"))
    _layer_axis(ax, n)
    ax.set_ylim(0, 1.08)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("kept")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(handles=handles + spans, loc="upper center", ncols=4, fontsize=8,
              bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.set_title(title or "What each layer keeps", fontsize=11)
    return _save(fig, path)


def _symlog_threshold(values: list[float]) -> float:
    """Linear region of the symlog axis: the decade of the smallest positive value."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if not positive:
        return 1.0
    return 10 ** math.floor(math.log10(min(positive)))


def removal_plot(delta_layer: list[float], delta_attn: list[float], delta_mlp: list[float],
                 modes: list[str], tau: float | None, path: Path, base_ppl: float | None = None,
                 removed_layers: list[int] | tuple = (), title: str = "",
                 unit: str = "perplexity") -> Path:
    """Δ perplexity when each layer, attention block or MLP block is skipped, with τ.

    Bars are Δ_layer coloured by the layer's mode (Layer-Dominant when Δ_layer < τ); markers
    are the two blocks. Δ spans several decades (the first layer is often 1000× the rest), so
    the axis is logarithmic, linear near zero because Δ is clamped at 0.
    """
    n = len(delta_layer)
    fig, axes = _figure(max(8.0, min(16.0, 0.32 * n + 4)), 4.4)
    ax = axes[0][0]
    x = list(range(n))
    colors = [LAYER_MODE if m == "layer" else BLOCK_MODE for m in modes]
    ax.bar(x, delta_layer, 0.7, color=colors, zorder=2)
    ax.plot(x, delta_attn, "^", color=ATTN, ms=5, zorder=3, label="Δ attention block")
    ax.plot(x, delta_mlp, "s", color=MLP, ms=4.5, zorder=3, label="Δ MLP block")
    for layer in removed_layers:
        ax.axvspan(layer - 0.5, layer + 0.5, color=REMOVED_SPAN, lw=0, zorder=0)
    ax.set_yscale("symlog", linthresh=_symlog_threshold([*delta_layer, *delta_attn,
                                                          *delta_mlp]))
    handles = [Patch(color=LAYER_MODE, label="Δ layer — Layer-Dominant (Δ < τ)"),
               Patch(color=BLOCK_MODE, label="Δ layer — Block-Dominant (Δ ≥ τ)"),
               *ax.get_legend_handles_labels()[0]]
    if tau is not None and math.isfinite(tau):
        handles.append(ax.axhline(tau, color=REMOVED, ls="--", lw=1.3, zorder=4,
                                  label=f"τ = {tau:.4g}"))
    if removed_layers:
        handles.append(Patch(color=REMOVED_SPAN, label="layer removed"))
    _layer_axis(ax, n)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"Δ {unit} (log scale)")
    ax.grid(axis="y", alpha=0.3, zorder=0)
    ax.legend(handles=handles, loc="upper center", ncols=3, fontsize=8,
              bbox_to_anchor=(0.5, -0.16), frameon=False)
    base = f" (base perplexity {base_ppl:.4g})" if base_ppl else ""
    ax.set_title(title or f"Perplexity increase when a layer or block is skipped{base}",
                 fontsize=11)
    return _save(fig, path)


H_GSP_SCORE = "H-GSP score S = importance / cost × ln(1+Δ)^T"


def score_plot(kinds: list[str], scores: list[float], status: list[str], cut: float | None,
               path: Path, title: str = "", score_name: str = H_GSP_SCORE) -> Path:
    """Histogram of group scores per group type, split by fate, with the selection cut
    (``score_name``: what the score is, H-GSP's or a baseline method's).

    Args:
        kinds: ``attn`` or ``mlp`` per group.
        scores: the H-GSP score per group (importance per parameter × depth prior).
        status: ``kept``, ``score`` (removed by the ranking) or ``collapse`` per group.
        cut: score of the highest-ranked group the ranking removed.
        path: PNG to write.
        title: figure title.
    """
    positive = [s for s in scores if s > 0 and math.isfinite(s)]
    lo = min(positive) if positive else 1e-12
    hi = max(positive) if positive else 1.0
    if hi <= lo:
        lo, hi = lo / 10, hi * 10
    # Scores of 0 (Δ = 0 makes ln(1+Δ) = 0) cannot sit on a log axis: show them at its left edge.
    floor = lo / 2
    bins = [floor * (hi * 1.01 / floor) ** (i / 60) for i in range(61)]
    fig, axes = _figure(12.0, 5.4, rows=2, sharex=True)
    categories = (("score", REMOVED, "removed by the ranking"),
                  ("collapse", COLLAPSED, "removed with its layer (collapse)"),
                  ("kept", KEPT, "kept"))
    for ax, (kind, label) in zip(axes[:, 0], (("attn", "attention groups"),
                                              ("mlp", "MLP channels"))):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        data, colors, labels = [], [], []
        for name, color, text in categories:
            data.append([max(scores[i], floor) for i in idx if status[i] == name])
            colors.append(color)
            labels.append(text)
        # stepfilled draws one polygon per category instead of one patch per bar: much faster.
        ax.hist(data, bins=bins, stacked=True, color=colors, label=labels,
                histtype="stepfilled")
        removed = sum(status[i] != "kept" for i in idx)
        zeros = sum(scores[i] <= 0 for i in idx)
        note = f"; {zeros} with score 0 at the left edge" if zeros else ""
        ax.set_title(f"{label}: {removed:,} of {len(idx):,} removed{note}", fontsize=9,
                     loc="left")
        ax.set_xscale("log")
        ax.set_ylabel("groups")
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.grid(axis="y", alpha=0.3)
        if cut is not None and cut > 0:
            symbol = "S" if score_name == H_GSP_SCORE else "score"
            ax.axvline(cut, color="black", ls="--", lw=1.2, label=f"cut: {symbol} = {cut:.3g}")
    axes[1][0].set_xlabel(f"{score_name}  (log scale; lowest removed first)")
    handles, labels = axes[1][0].get_legend_handles_labels()
    # Reading order: the two ways to be removed, kept, then the cut (hist lists them reversed).
    present = set(status)
    order = [labels.index(text) for name, _, text in categories if name in present] + \
        [i for i, text in enumerate(labels) if text.startswith("cut")]
    fig.legend([handles[i] for i in order], [labels[i] for i in order],
               loc="outside lower center", ncols=4, fontsize=8, frameon=False)
    fig.suptitle(title or "Score distribution and the cut", fontsize=11)
    return _save(fig, path)


@dataclass
class QualityPoint:
    """One model on a quality-vs-size plot.

    Attributes:
        label: text beside the point.
        params: total parameters.
        metrics: e.g. ``{"wikitext2@128": 25.1}`` (perplexities) or ``{"zero-shot mean acc":
            0.51}``; a key containing ``acc`` goes to the accuracy panel.
        series: points with the same series are joined by a line (same method and settings).
        is_base: drawn as a star.
    """

    label: str
    params: int
    metrics: dict[str, float] = field(default_factory=dict)
    series: str = ""
    is_base: bool = False


def _is_accuracy(metric: str) -> bool:
    return "acc" in metric


def quality_vs_size_plot(points: list[QualityPoint], path: Path, title: str = "") -> Path | None:
    """Perplexity and zero-shot accuracy against parameter count; None if no metric."""
    metrics = sorted({m for p in points for m in p.metrics})
    panels = [(name, [m for m in metrics if _is_accuracy(m) == acc])
              for name, acc in (("perplexity (lower is better)", False),
                                ("zero-shot accuracy (higher is better)", True))]
    panels = [(name, ms) for name, ms in panels if ms]
    if not panels:
        return None
    fig, axes = _figure(max(8.0, 5.6 * len(panels) + 1), 4.8, cols=len(panels))
    for ax, (ylabel, names) in zip(axes[0], panels):
        _quality_panel(ax, points, names)
        ax.set_ylabel(ylabel)
        values = [p.metrics[m] for p in points for m in names if m in p.metrics]
        # Perplexities of pruned models span decades; a log axis only helps when they do.
        if not _is_accuracy(names[0]) and min(values) > 0 and max(values) / min(values) > 4:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: compact(v)))
            ax.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(title or "Quality vs size", fontsize=11)
    return _save(fig, path)


def compact(value: float) -> str:
    """Short number for a label: ``185k``, ``1,217``, ``59.44``, ``0.6123``."""
    if value >= 1e6:
        return f"{value / 1e6:,.3g}M"
    if value >= 1e4:
        return f"{value / 1e3:,.0f}k"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _size_unit(points: list[QualityPoint]) -> tuple[float, str]:
    big = max(p.params for p in points)
    for scale, name in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if big >= scale:
            return scale, name
    return 1.0, ""


def _quality_panel(ax, points: list[QualityPoint], metrics: list[str]) -> None:
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    scale, unit = _size_unit(points)
    series = list(dict.fromkeys(p.series for p in points if not p.is_base))  # given order
    styles = ["-", "--", ":", "-."]
    for m_i, metric in enumerate(metrics):
        color = colors[m_i % len(colors)]
        have = [p for p in points if metric in p.metrics]
        bases = [p for p in have if p.is_base]
        for s_i, name in enumerate(series):
            line = sorted([p for p in have if p.series == name] + bases, key=lambda p: p.params)
            ax.plot([p.params / scale for p in line], [p.metrics[metric] for p in line],
                    styles[s_i % len(styles)], color=color, lw=1, alpha=0.6)
        for p in have:
            ax.plot(p.params / scale, p.metrics[metric], "*" if p.is_base else "o", color=color,
                    ms=13 if p.is_base else 6, mec="black" if p.is_base else color, zorder=3)
            # Alternate sides by metric so close values at one size do not print on each other.
            right = m_i % 2 == 0
            ax.annotate(compact(p.metrics[metric]), (p.params / scale, p.metrics[metric]),
                        textcoords="offset points", xytext=(8 if right else -8, 0),
                        ha="left" if right else "right", va="center", fontsize=7, color=color)
        ax.plot([], [], "o-", color=color, label=metric)
    ax.plot([], [], "*", color="#777", mec="black", ms=12, ls="", label="base model")
    if len(series) > 1:  # several lines per metric: say which line style is which
        for s_i, name in enumerate(series):
            ax.plot([], [], styles[s_i % len(styles)], color="#555", lw=1, label=name)
    # Name each model once, on a top axis at its size, instead of beside every point.
    named = {}
    for p in sorted(points, key=lambda p: p.params):
        named.setdefault(p.params / scale, []).append(p.label)
    top = ax.secondary_xaxis("top")
    top.set_xticks(list(named), ["\n".join(dict.fromkeys(v)) for v in named.values()],
                   fontsize=7)
    ax.set_xlabel(f"parameters ({unit})" if unit else "parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.margins(x=0.18, y=0.12)
