"""Pictures, report.md/html, ``hgsp report``, ``hgsp compare`` and the generated CLI docs.

The results folders come from the real command line on the tiny model (see test_cli.py);
one of them is evaluated (perplexity on a few windows) so the base-vs-pruned parts render.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import load_script

from hgsp.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num_examples", "4", "--seq_len", "16", "--gradient_batch_size", "2",
        "--analysis_samples", "2", "--dataset", "c4"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _prune(model_dir, data_dir, results, name, *extra):
    args = ["prune", "--base_model", str(model_dir), "--output_name", name, "--data_dir",
            str(data_dir), "--results_dir", str(results), *FAST, *extra]
    assert main(args) == 0
    return results / name


@pytest.fixture(scope="module")
def runs(tiny_model_dir, data_dir, tmp_path_factory):
    """Two finished runs: 30% with a quick perplexity evaluation, 50% at T = 0."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HGSP_HOME", str(home))  # the evaluation cache stays in the test's folder
        results = tmp_path_factory.mktemp("results")
        evaluated = _prune(tiny_model_dir, data_dir, results, "r30", "--pruning_ratio", "0.3",
                           "--run_evaluation", "ppl", "--eval_ppl_max_windows", "4")
        plain = _prune(tiny_model_dir, data_dir, results, "r50", "--pruning_ratio", "0.5",
                       "--temperature", "0")
    return evaluated, plain


def _assert_png(path: Path) -> None:
    assert path.is_file(), path
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC), path


def test_run_writes_pictures_and_report(runs):
    evaluated, plain = runs
    for name in ("retention", "removal_delta", "score_distribution", "quality_vs_size"):
        _assert_png(evaluated / "visualization" / f"{name}.png")
    # T = 0 has no removal analysis and no evaluation: those two pictures are not drawn.
    names = sorted(p.name for p in (plain / "visualization").iterdir())
    assert names == ["retention.png", "score_distribution.png"]
    assert (evaluated / "report.md").is_file() and (evaluated / "report.html").is_file()


def test_run_log_names_the_final_report_not_the_temporary_folder(runs):
    evaluated, _ = runs
    line = next(x for x in (evaluated / "logs" / "run.log").read_text().splitlines()
                if "report: " in x)
    assert f"{evaluated / 'report.md'}, {evaluated / 'report.html'}" in line, line


def test_report_md_has_layer_table_and_ratio(runs):
    evaluated, _ = runs
    summary = json.loads((evaluated / "summary.json").read_text())
    text = (evaluated / "report.md").read_text()
    achieved = f"{100 * summary['parameters']['achieved_ratio_total']:.2f}%"
    assert f"Achieved ratio: {achieved} of all parameters removed" in text
    section = text.split("## Per-layer table")[1].split("\n## ")[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in rows[0][:2]] == ["layer", "mode"]
    assert [r[0].strip() for r in rows[1:]] == ["0", "1", "2", "3"]
    layers = json.loads((evaluated / "analysis" / "layer_removal_ppl.json").read_text())
    modes = {"layer": "Layer-Dominant", "block": "Block-Dominant"}
    assert [r[1].strip() for r in rows[1:]] == [modes[e["mode"]] for e in layers["layers"]]
    for needle in ("## Per-layer table", "## Evaluation", "wikitext2", "pruned / base",
                   "## Timings", "## Versions", "hgsp prune", "--pruning_ratio 0.3",
                   "visualization/retention.png"):
        assert needle in text, needle


def test_report_html_is_self_contained(runs):
    evaluated, _ = runs
    page = (evaluated / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 4
    assert "visualization/" not in page.split("<body>")[1].replace("visualization/*.png", "")
    assert "<table>" in page and "</html>" in page


def test_hgsp_report_regenerates(runs, capsys):
    evaluated, _ = runs
    for f in [evaluated / "report.md", evaluated / "report.html",
              *(evaluated / "visualization").iterdir()]:
        f.unlink()
    assert main(["report", str(evaluated)]) == 0
    _assert_png(evaluated / "visualization" / "removal_delta.png")
    assert "Per-layer table" in (evaluated / "report.md").read_text()
    assert "data:image/png;base64," in (evaluated / "report.html").read_text()
    assert f"hgsp report {evaluated}" in (evaluated / "report.md").read_text()


def test_report_renders_zeroshot_and_efficiency(runs, tmp_path, capsys):
    """The evaluation sections read the evaluation_results.json schema (hgsp.evaluate)."""
    evaluated, _ = runs
    copy = shutil.copytree(evaluated, tmp_path / "copy")
    path = copy / "evaluation" / "evaluation_results.json"
    doc = json.loads(path.read_text())

    def eff(params, tok_s):
        return {"parameters": {"total": params, "non_embedding": params - 100},
                "macs_per_token": {"total": 2 * params, "context": 128},
                "weight_bytes": 4 * params, "disk_bytes": 4 * params + 10,
                "speed": {"prompt_len": 128, "new_tokens": 32, "repeats": 3,
                          "batch1": {"prefill_latency_s": 0.01, "decode_tokens_per_s": tok_s}},
                "peak_memory": {"peak_bytes": 10 ** 8, "kind": "process_rss"}}

    def zs(acc):
        return {"tasks": {"piqa": {"acc": acc, "acc_norm": acc + 0.01, "n": 10},
                          "winogrande": {"acc": acc, "acc_norm": None, "n": 10}},
                "mean_acc": acc, "mean_acc_norm": acc + 0.005, "num_fewshot": 0,
                "acc_norm_from_acc": ["winogrande"], "lm_eval_version": "0.4.13"}

    doc["models"]["base"].update(efficiency=eff(27936, 100.0), zeroshot=zs(0.6))
    doc["models"]["pruned"].update(efficiency=eff(19520, 150.0), zeroshot=zs(0.5))
    path.write_text(json.dumps(doc))
    assert main(["report", str(copy)]) == 0
    text = (copy / "report.md").read_text()
    assert "| piqa | 10 | 0.6000 | 0.6100 | 0.5000 | 0.5100 | -0.1000 |" in text
    assert "| decode speed, batch 1 | 100.0 tok/s | 150.0 tok/s | 1.500× |" in text
    # After --finetune the file also holds the fine-tuned model: a third column everywhere.
    doc["models"]["finetuned"] = {**doc["models"]["pruned"], "zeroshot": zs(0.55),
                                  "efficiency": eff(19520, 140.0)}
    path.write_text(json.dumps(doc))
    assert main(["report", str(copy)]) == 0
    text = (copy / "report.md").read_text()
    assert ("| piqa | 10 | 0.6000 | 0.6100 | 0.5000 | 0.5100 | 0.5500 | 0.5600 | -0.1000 | "
            "-0.0500 |") in text
    assert "| 150.0 tok/s | 140.0 tok/s | 1.500× | 1.400× |" in text
    assert main(["compare", str(copy), "--output", str(tmp_path / "cmp")]) == 0
    assert "copy +ft" not in capsys.readouterr().out  # the run's name comes from its config
    assert "r30 +ft" in (tmp_path / "cmp" / "comparison.csv").read_text()


def test_report_failure_does_not_lose_the_run(tiny_model_dir, data_dir, tmp_path, capsys,
                                              monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no pictures today")

    monkeypatch.setattr("hgsp.report.make_pictures", broken)
    run = _prune(tiny_model_dir, data_dir, tmp_path, "run", "--pruning_ratio", "0.3")
    assert (run / "summary.json").is_file() and (run / "models" / "config.json").is_file()
    assert not (run / "report.md").exists()
    err = capsys.readouterr().err
    assert "could not write the report" in err and "no pictures today" in err
    assert f"hgsp report {run}" in err


def test_hgsp_compare(runs, tmp_path, capsys):
    evaluated, plain = runs
    out = tmp_path / "cmp"
    assert main(["compare", str(evaluated), str(plain), "--output", str(out)]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["run", "removed", "method"]
    assert any(line.startswith("r30 ") for line in lines)
    assert any(line.startswith("r50 ") for line in lines)
    assert any(line.startswith("base: ") for line in lines)  # r30 evaluated its base
    assert "wikitext2@16 ppl" in lines[0] or "wikitext2@128 ppl" in lines[0]
    csv_text = (out / "comparison.csv").read_text()
    assert csv_text.splitlines()[0].startswith("run,ratio,method,T,tau,epsilon,params")
    assert "r30" in csv_text and "r50" in csv_text
    assert "| r50 |" in (out / "comparison.md").read_text()
    _assert_png(out / "quality_vs_size.png")


@pytest.mark.parametrize("command", ["report", "compare"])
def test_not_a_results_dir(command, runs, tmp_path, capsys):
    evaluated, _ = runs
    for bad in (tmp_path / "missing", tmp_path):
        args = [command, str(bad)] + ([str(evaluated), "--output", str(tmp_path / "o")]
                                      if command == "compare" else [])
        assert main(args) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0], err
    assert not (tmp_path / "o").exists()


def test_cli_docs_up_to_date():
    gen = load_script("scripts/gen_cli_docs.py")
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/cli.md is stale: run python scripts/gen_cli_docs.py"


def test_report_states_the_importance_normalization_used(runs):
    evaluated, plain = runs
    text = (evaluated / "report.md").read_text()
    assert "| importance normalization | per layer (auto, by the pruning ratio) |" in text
    assert "| gate threshold τ |" in text and "automatic: 25th percentile" in text
    assert "| importance normalization | not used |" in (plain / "report.md").read_text()


def test_report_names_layers_the_ratio_kept_below_epsilon(runs, tmp_path):
    evaluated, _ = runs
    assert json.loads((evaluated / "summary.json").read_text())["layers"][
        "kept_below_epsilon"] == []
    assert "Kept below ε" not in (evaluated / "report.md").read_text()
    copy = shutil.copytree(evaluated, tmp_path / "copy")
    summary = json.loads((copy / "summary.json").read_text())
    summary["layers"]["kept_below_epsilon"] = [1]
    (copy / "summary.json").write_text(json.dumps(summary))
    assert main(["report", str(copy)]) == 0
    assert ("Kept below ε because removing them whole would exceed the ratio: 1 (layer 1)."
            in (copy / "report.md").read_text())


def test_compare_merges_what_each_run_measured_of_their_base(runs, tmp_path, capsys):
    """One run scored the base's perplexity, another its zero-shot accuracy: one base row
    with both."""
    evaluated, _ = runs
    other = shutil.copytree(evaluated, tmp_path / "other")
    path = other / "evaluation" / "evaluation_results.json"
    doc = json.loads(path.read_text())
    del doc["models"]["base"]["ppl"]
    doc["models"]["base"]["zeroshot"] = {"tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.6,
                                                            "n": 10}},
                                         "mean_acc": 0.6, "mean_acc_norm": 0.6}
    path.write_text(json.dumps(doc))
    assert main(["compare", str(evaluated), str(other), "--output", str(tmp_path / "c")]) == 0
    base_rows = [r for r in (tmp_path / "c" / "comparison.csv").read_text().splitlines()
                 if r.startswith("base: ")]
    assert len(base_rows) == 1
    cells = base_rows[0].split(",")
    assert "0.6" in cells and any(c.replace(".", "", 1).isdigit() and float(c) > 1
                                  for c in cells[7:])  # zero-shot and a perplexity


def test_compare_output_that_is_a_file_is_one_line(runs, tmp_path, capsys):
    evaluated, _ = runs
    (tmp_path / "taken").write_text("x")
    assert main(["compare", str(evaluated), "--output", str(tmp_path / "taken")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "x"


@pytest.mark.parametrize("method, expected", [("hgsp", "H-GSP scores of all"),
                                              ("flap", "flap scores of all")])
def test_score_picture_names_the_methods_own_score(method, expected, runs, tmp_path,
                                                   monkeypatch):
    from hgsp import plots
    from hgsp.report import load_run, make_pictures

    evaluated, _ = runs
    copy = shutil.copytree(evaluated, tmp_path / "copy")
    summary = json.loads((copy / "summary.json").read_text())
    summary["method"] = method
    (copy / "summary.json").write_text(json.dumps(summary))
    seen = {}

    def capture(*args, title="", score_name="", **kwargs):
        seen.update(title=title, score_name=score_name)
        return args[4]

    monkeypatch.setattr(plots, "score_plot", capture)
    make_pictures(load_run(copy), tmp_path / "pictures")
    assert seen["title"].startswith(expected)
    assert ("H-GSP" in seen["score_name"]) == (method == "hgsp")
    assert ("T =" in seen["title"]) == (method == "hgsp")
