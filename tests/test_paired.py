"""Paired zero-shot comparison (hgsp.paired and benchmarks/paired_zeroshot.py), by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from hgsp.errors import UserError
from hgsp.paired import markdown, mcnemar_exact, merge_results, paired_task, paired_zeroshot

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paired_zeroshot.py"


def _result(outcomes: dict[str, tuple[str, str | None]], docs: str = "same") -> dict:
    """A run_zeroshot-shaped result from per-document outcome strings."""
    tasks, documents = {}, {}
    for task, (acc, norm) in outcomes.items():
        tasks[task] = {"acc": acc.count("1") / len(acc),
                       "acc_norm": None if norm is None else norm.count("1") / len(norm),
                       "n": len(acc)}
        documents[task] = {"acc": acc, "acc_norm": norm, "docs_sha256": f"{task}-{docs}"}
    return {"tasks": tasks, "documents": documents}


def test_mcnemar_exact_against_hand_computed_binomial_tails():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 2 · P(X = 0), X ~ Bin(5, ½)
    assert mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)  # 2 · (1 + 10) / 2¹⁰
    # Thousands of discordant documents: no float overflow, and close to the normal tail.
    p = mcnemar_exact(1000, 1100)
    z = 100 / math.sqrt(2100)
    assert 0 < p < 1
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.1)


def test_paired_task_by_hand():
    row = paired_task("t", "1100", "1010")
    assert (row.n, row.only_a, row.only_b) == (4, 1, 1)
    assert row.acc_a == row.acc_b == 0.5 and row.diff == 0.0
    # Per-document differences 0, 1, −1, 0: sample variance 2/3, SE sqrt(2/3 / 4).
    assert row.se == pytest.approx(math.sqrt(2 / 3 / 4))
    assert row.p_mcnemar == 1.0
    row = paired_task("t", "1111", "0111")
    assert row.diff == pytest.approx(0.25) and (row.only_a, row.only_b) == (1, 0)
    assert row.se == pytest.approx(math.sqrt((1 - 4 * 0.25 ** 2) / 3 / 4))


def test_pairing_is_tighter_than_independent_samples_when_models_mostly_agree():
    a = "1" * 300 + "0" * 200
    b = "1" * 290 + "0" * 210  # b gets 10 documents fewer right, agrees on the other 490
    row = paired_task("t", a, b)
    unpaired = math.sqrt(row.acc_a * (1 - row.acc_a) / 500 + row.acc_b * (1 - row.acc_b) / 500)
    assert row.diff == pytest.approx(0.02)
    assert row.se < unpaired / 3
    assert row.p_mcnemar == pytest.approx(2 / 2 ** 10)


def test_mean_over_tasks_adds_task_variances():
    a = _result({"x": ("1100", "1100"), "y": ("1111", None)})
    b = _result({"x": ("1010", "0000"), "y": ("0111", None)})
    out = paired_zeroshot(a, b)
    se_x, se_y = math.sqrt(2 / 3 / 4), math.sqrt((1 - 4 * 0.25 ** 2) / 3 / 4)
    assert out["mean"]["diff"] == pytest.approx((0 + 0.25) / 2)
    assert out["mean"]["se"] == pytest.approx(math.sqrt(se_x ** 2 + se_y ** 2) / 2)
    assert out["mean"]["mean_a"] == pytest.approx((0.5 + 1.0) / 2)
    # acc_norm: x by its acc_norm, y (acc only, like WinoGrande) by its acc.
    norm = paired_zeroshot(a, b, "acc_norm")
    assert [r["diff"] for r in norm["tasks"]] == pytest.approx([0.5, 0.25])
    same = paired_zeroshot(a, a)
    assert same["mean"]["diff"] == 0 and same["mean"]["se"] == 0
    assert same["mean"]["p_normal"] == 1.0
    assert "**+12.50**" in markdown(out, ("H", "S"))


def test_mismatched_documents_are_user_errors():
    a = _result({"x": ("1100", None)})
    with pytest.raises(UserError, match="scored 4 and 3 documents"):
        paired_zeroshot(a, _result({"x": ("110", None)}))
    with pytest.raises(UserError, match="different documents"):
        paired_zeroshot(a, _result({"x": ("1100", None)}, docs="other"))
    with pytest.raises(UserError, match="no per-document outcomes"):
        paired_zeroshot(a, {"tasks": a["tasks"]})
    with pytest.raises(UserError, match="no zero-shot task in common"):
        paired_zeroshot(a, _result({"z": ("1100", None)}))
    with pytest.raises(UserError, match="unknown metric"):
        paired_zeroshot(a, a, "f1")


def _evaluation_file(path: Path, models: dict) -> Path:
    path.write_text(json.dumps({"schema": "hgsp-evaluation-v1",
                                "models": {k: {"zeroshot": v} for k, v in models.items()}}))
    return path


def test_script_compares_two_files_and_picks_models_by_key(tmp_path):
    a = _result({"x": ("1" * 40 + "0" * 10, None)})
    b = _result({"x": ("1" * 30 + "0" * 20, None)})
    run = tmp_path / "run"
    (run / "evaluation").mkdir(parents=True)
    _evaluation_file(run / "evaluation" / "evaluation_results.json", {"base": a, "pruned": b})
    out = tmp_path / "paired.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), f"{run}:base", str(run), "--names",
                           "base,pruned", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| x | 50 | 80.0 | 60.0 | +20.0 |" in proc.stdout
    saved = json.loads(out.read_text())
    assert saved["tasks"][0]["only_a"] == 10 and saved["inputs"]["b"].endswith(":pruned")

    proc = subprocess.run([sys.executable, str(SCRIPT), f"{run}:finetuned", str(run)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: " + str(run / "evaluation" /
                                   "evaluation_results.json") +
                                   " has no zero-shot result for 'finetuned': it has base, pruned")


def test_tasks_scored_in_separate_runs_are_joined(tmp_path):
    x, y = _result({"x": ("1" * 40 + "0" * 10, None)}), _result({"y": ("1" * 10, "1" * 10)})
    merged = merge_results([x, y], ["x.json", "y.json"])
    assert sorted(merged["tasks"]) == ["x", "y"] and merged["documents"]["y"]["acc"] == "1" * 10
    with pytest.raises(UserError, match="task x is in both x.json and again.json"):
        merge_results([x, x], ["x.json", "again.json"])

    other = _result({"x": ("1" * 30 + "0" * 20, None), "y": ("0" * 10, "0" * 10)})
    files = [_evaluation_file(tmp_path / f"{n}.json", {"model": r})
             for n, r in (("x", x), ("y", y), ("other", other))]
    proc = subprocess.run([sys.executable, str(SCRIPT), f"{files[0]}+{files[1]}", str(files[2])],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| x | 50 | 80.0 | 60.0 | +20.0 |" in proc.stdout
    assert "| y | 10 | 100.0 | 0.0 | +100.0 |" in proc.stdout
    assert "**mean of 2**" in proc.stdout
