"""Several runs side by side: one table and one quality-vs-size picture (``hgsp compare``).

Each row is one results folder; when the runs were evaluated, their base model gets a row
too (ratio 0), so every pruned model can be read against the model it came from.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write
from .errors import UserError
from .report import (
    RunData,
    decode_speed,
    eval_models,
    evaluated_models,
    fmt_num,
    load_run,
    ppl_metrics,
    zeroshot_mean,
)

log = logging.getLogger(__name__)

FIXED_COLUMNS = ["run", "ratio", "method", "T", "tau", "epsilon", "params", "layers"]
TAIL_COLUMNS = ["zeroshot_mean", "decode_tok_s", "decode_speedup"]


@dataclass
class Comparison:
    """The comparison table.

    Attributes:
        columns: column keys, in order (perplexity columns are ``ppl:DATASET@LEN``).
        rows: one dict per row, values as numbers or text (None = not measured).
        runs: the loaded runs, in the order given.
    """

    columns: list[str]
    rows: list[dict]
    runs: list[RunData]

    def header(self) -> list[str]:
        names = {"ratio": "removed", "tau": "τ", "epsilon": "ε", "zeroshot_mean": "0-shot mean",
                 "decode_tok_s": "decode tok/s", "decode_speedup": "speed-up"}
        return [c.removeprefix("ppl:") + " ppl" if c.startswith("ppl:") else names.get(c, c)
                for c in self.columns]

    def cells(self) -> list[list[str]]:
        return [[_cell(c, row.get(c)) for c in self.columns] for row in self.rows]

    def text(self) -> str:
        """Aligned plain-text table: text columns left, numbers right."""
        header, cells = self.header(), self.cells()
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
        left = {0, FIXED_COLUMNS.index("method")}

        def line(values):
            return "  ".join(v.ljust(w) if i in left else v.rjust(w)
                             for i, (v, w) in enumerate(zip(values, widths))).rstrip()
        return "\n".join([line(header), line(["-" * w for w in widths]),
                          *(line(r) for r in cells)])

    def markdown(self) -> str:
        rows = [self.header(), *self.cells()]
        lines = ["| " + " | ".join(r) + " |" for r in rows]
        lines.insert(1, "|" + "|".join("---" for _ in self.header()) + "|")
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(self.columns)
        writer.writerows([["" if row.get(c) is None else row.get(c) for c in self.columns]
                          for row in self.rows])
        return out.getvalue()


def _cell(column: str, value) -> str:
    if value is None:
        return "—"
    if column == "ratio":
        return f"{100 * value:.2f}%"
    if column == "params":
        for scale, unit in ((1e9, "B"), (1e6, "M")):
            if value >= scale:
                return f"{value / scale:,.2f}{unit}"
        return f"{value:,}"
    if column == "decode_speedup":
        return f"{value:.2f}×"
    if column == "decode_tok_s":
        return f"{value:,.1f}"
    if column == "zeroshot_mean":
        return f"{value:.4f}"
    if isinstance(value, float):
        return "∞" if math.isinf(value) else fmt_num(value)
    return str(value)


def method_label(arguments: dict, summary: dict) -> str:
    """``hgsp/taylor``, ``flap``...: the method, and for gradient methods the importance."""
    method = arguments.get("method", "hgsp")
    if method in ("hgsp", "llm_pruner"):
        method = f"{method}/{arguments.get('importance_method')}"
    if arguments.get("method", "hgsp") != "hgsp" or not summary.get("bias_compensation"):
        return method
    return method + ("+refit" if summary.get("refit_outputs") else "+bc")


def _run_row(run: RunData) -> dict:
    s, a = run.summary, run.arguments
    base, pruned = eval_models(run)
    is_hgsp = a.get("method", "hgsp") == "hgsp"  # T, τ and ε are H-GSP settings only
    temperature = s.get("score", {}).get("temperature") if is_hgsp else None
    speed, base_speed = decode_speed(pruned), decode_speed(base)
    return {
        "run": run.name, "ratio": s["parameters"]["achieved_ratio_total"],
        "method": method_label(a, s), "T": temperature,
        # τ means nothing at T = 0 (no analysis), so leave it empty rather than "None".
        "tau": None if not temperature else s.get("score", {}).get("tau"),
        "epsilon": a.get("epsilon") if is_hgsp else None, "params": s["parameters"]["pruned_total"],
        "layers": f"{s['layers']['kept']}/{s['layers']['base']}",
        **{f"ppl:{k}": v for k, v in ppl_metrics(pruned).items()},
        "zeroshot_mean": zeroshot_mean(pruned), "decode_tok_s": speed,
        "decode_speedup": speed / base_speed if speed and base_speed else None,
    }


def _finetuned_row(run: RunData, row: dict) -> dict | None:
    """The run's fine-tuned model (same size and settings), when it was evaluated."""
    models = evaluated_models(run)
    tuned, base = models.get("fine-tuned"), models.get("base")
    if tuned is None:
        return None
    speed, base_speed = decode_speed(tuned), decode_speed(base)
    return {**{k: v for k, v in row.items() if not k.startswith("ppl:")},
            "run": f"{row['run']} +ft", **{f"ppl:{k}": v for k, v in ppl_metrics(tuned).items()},
            "zeroshot_mean": zeroshot_mean(tuned), "decode_tok_s": speed,
            "decode_speedup": speed / base_speed if speed and base_speed else None}


def _base_row(run: RunData) -> dict | None:
    """The base model of an evaluated run, as a row (None if the base was not evaluated)."""
    base, _ = eval_models(run)
    if base is None:
        return None
    s = run.summary
    return {"run": f"base: {Path(s['base_model']).name}", "ratio": 0.0, "method": None,
            "params": s["parameters"]["base_total"], "layers": f"{s['layers']['base']}/"
            f"{s['layers']['base']}", **{f"ppl:{k}": v for k, v in ppl_metrics(base).items()},
            "zeroshot_mean": zeroshot_mean(base), "decode_tok_s": decode_speed(base),
            "decode_speedup": 1.0 if decode_speed(base) else None}


def compare_runs(folders: list[str | os.PathLike]) -> Comparison:
    """Load results folders and build the table (base rows first, then runs as given).

    Raises:
        UserError: a folder is missing or is not a results folder.
    """
    runs = [load_run(f) for f in folders]
    bases: dict[str, dict] = {}
    for run in runs:
        row = _base_row(run)
        if row is None:
            continue
        # One row per base model, a sweep of ratios shares it: each run fills in what the
        # earlier ones did not measure (one scored perplexity, another zero-shot).
        shared = bases.setdefault(run.summary["base_model"], row)
        for key, value in row.items():
            if shared.get(key) is None and value is not None:
                shared[key] = value
    rows = list(bases.values())
    for run in runs:
        rows.append(_run_row(run))
        tuned = _finetuned_row(run, rows[-1])
        if tuned is not None:
            rows.append(tuned)
    ppl_cols = sorted({k for row in rows for k in row if k.startswith("ppl:")})
    columns = FIXED_COLUMNS + ppl_cols + TAIL_COLUMNS
    return Comparison(columns, rows, runs)


def quality_points(comparison: Comparison) -> list:
    """Every run and base model with at least one quality figure, for the picture."""
    from .plots import QualityPoint

    points = []
    for row in comparison.rows:
        metrics = {k.removeprefix("ppl:"): v for k, v in row.items()
                   if k.startswith("ppl:") and v is not None}
        if row.get("zeroshot_mean") is not None:
            metrics["zero-shot mean acc"] = row["zeroshot_mean"]
        if not metrics:
            continue
        is_base = row["run"].startswith("base: ")
        # Runs that differ only in the ratio form one line in the picture.
        series = "" if is_base else f"{row['method']}" + \
            (f", T={row['T']:g}" if row["T"] is not None else "") + \
            (" +ft" if row["run"].endswith(" +ft") else "")
        points.append(QualityPoint(row["run"], row["params"], metrics, series, is_base))
    return points


def write_comparison(comparison: Comparison, out_dir: str | os.PathLike) -> list[Path]:
    """``comparison.csv``, ``comparison.md`` and (if any run was evaluated)
    ``quality_vs_size.png`` in ``out_dir``; returns the files written."""
    from .plots import quality_vs_size_plot

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output '{out}' is a file; the comparison is a folder of files: "
                        "choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("comparison.csv", comparison.csv()),
                       ("comparison.md", comparison.markdown())):
        atomic_write(out / name, lambda tmp, text=text: tmp.write_text(text, encoding="utf-8"))
        written.append(out / name)
    points = quality_points(comparison)
    shown = {p.label for p in points if not p.is_base}
    missing = [r["run"] for r in comparison.rows
               if not r["run"].startswith("base: ") and r["run"] not in shown]
    title = "Quality vs size" + (f" (not evaluated, not shown: {', '.join(missing)})"
                                 if missing else "")
    picture = quality_vs_size_plot(points, out / "quality_vs_size.png", title=title)
    if picture is None:
        # An older picture in the same folder would belong to other runs.
        (out / "quality_vs_size.png").unlink(missing_ok=True)
        log.info("no run was evaluated: no quality-vs-size picture (prune with "
                 "--run_evaluation ppl to get one)")
    else:
        written.append(picture)
    return written
