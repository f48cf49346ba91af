"""The importance / analysis cache: a second run reuses them, any change of a key input
recomputes them, and the cached values give the same plan."""

from __future__ import annotations

import pytest

from hgsp.cli import main

FAST = ["--num_examples", "4", "--seq_len", "16", "--gradient_batch_size", "2",
        "--analysis_samples", "2", "--dataset", "c4"]


def run(tiny_model_dir, data_dir, results, name, *extra):
    args = ["prune", "--base_model", str(tiny_model_dir), "--output_name", name,
            "--pruning_ratio", "0.3", "--data_dir", str(data_dir), "--results_dir",
            str(results), *FAST, *extra]
    assert main(args) == 0
    log = (results / name / "logs" / "run.log").read_text()
    return "importance: cached result" in log, "removal analysis: cached result" in log


def test_second_run_reuses_and_gives_same_plan(tiny_model_dir, data_dir, tmp_path):
    assert run(tiny_model_dir, data_dir, tmp_path, "a") == (False, False)
    # another ratio, temperature, tau and epsilon: nothing to recompute
    assert run(tiny_model_dir, data_dir, tmp_path, "b", "--pruning_ratio", "0.4",
               "--temperature", "1.5", "--epsilon", "0.2", "--tau", "1.0") == (True, True)
    assert run(tiny_model_dir, data_dir, tmp_path, "c") == (True, True)
    plans = [(tmp_path / n / "analysis" / "pruning_plan.json").read_bytes() for n in "ac"]
    assert plans[0] == plans[1]


@pytest.mark.parametrize("extra,importance_hit,analysis_hit", [
    (["--importance_method", "wanda"], False, True),
    (["--num_examples", "6"], False, False),  # shifts which windows the analysis gets
    (["--seq_len", "12"], False, False),
    (["--seed", "7"], False, False),
    (["--gradient_batch_size", "4"], False, True),
    (["--analysis_samples", "3"], True, False),
    (["--no-cache"], False, False),
])
def test_each_key_input_invalidates(extra, importance_hit, analysis_hit, tiny_model_dir,
                                    data_dir, tmp_path):
    run(tiny_model_dir, data_dir, tmp_path, "first")
    assert run(tiny_model_dir, data_dir, tmp_path, "second", *extra) == \
        (importance_hit, analysis_hit)


def test_another_model_invalidates(tmp_path, data_dir):
    from conftest import write_tiny_model

    first = write_tiny_model(tmp_path / "m1", seed=0)
    second = write_tiny_model(tmp_path / "m2", seed=1)
    run(first, data_dir, tmp_path, "x")
    assert run(second, data_dir, tmp_path, "y") == (False, False)
    assert run(first, data_dir, tmp_path, "z") == (True, True)


def test_ratio_list_writes_one_folder_per_ratio(tiny_model_dir, data_dir, tmp_path, capsys):
    args = ["prune", "--base_model", str(tiny_model_dir), "--output_name", "sweep",
            "--pruning_ratio", "0.2,0.4", "--data_dir", str(data_dir), "--results_dir",
            str(tmp_path), *FAST]
    assert main(args) == 0
    import json

    ratios, norms = {}, {}
    for name in ("sweep_r0.2", "sweep_r0.4"):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        ratios[name] = summary["parameters"]["achieved_ratio_total"]
        norms[name] = summary["score"]["importance_norm"]
    # --importance_norm auto resolves per ratio within one sweep
    assert norms == {"sweep_r0.2": "layer", "sweep_r0.4": "block"}
    assert ratios["sweep_r0.2"] == pytest.approx(0.2, abs=0.01)
    assert ratios["sweep_r0.4"] == pytest.approx(0.4, abs=0.01)
    second_log = (tmp_path / "sweep_r0.4" / "logs" / "run.log").read_text()
    assert "importance: cached result" in second_log


@pytest.mark.parametrize("value,message", [("0.2,abc", "comma-separated list"),
                                            ("0.2,0.2", "lists a ratio twice"),
                                            ("0.2,1.2", "must be between 0 and 1")])
def test_bad_ratio_lists(value, message, tiny_model_dir, data_dir, tmp_path, capsys):
    args = ["prune", "--base_model", str(tiny_model_dir), "--output_name", "s",
            "--pruning_ratio", value, "--data_dir", str(data_dir), "--results_dir",
            str(tmp_path), *FAST]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("s_r*"))
