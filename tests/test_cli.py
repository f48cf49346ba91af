"""The command line end to end on a tiny model saved to a temporary folder."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script
from transformers import AutoModelForCausalLM

from hgsp.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num_examples", "4", "--seq_len", "16", "--gradient_batch_size", "2",
        "--analysis_samples", "2", "--dataset", "c4"]


def run_cli(args, capsys):
    code = main(["prune", *args])
    return code, capsys.readouterr().err


def base_args(model_dir, data_dir, results, name="run", ratio="0.3"):
    return ["--base_model", str(model_dir), "--output_name", name, "--pruning_ratio", ratio,
            "--data_dir", str(data_dir), "--results_dir", str(results), *FAST]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, data_dir, tmp_path_factory):
    """One complete run shared by the output checks (the run itself is the slow part)."""
    results = tmp_path_factory.mktemp("results")
    assert main(["prune", *base_args(tiny_model_dir, data_dir, results)]) == 0
    return results / "run"


def test_output_layout(finished_run):
    expected = [
        "models/config.json", "models/model.safetensors", "models/pruned_model.bin",
        "models/tokenizer.json", "analysis/layer_removal_ppl.json",
        "analysis/block_removal_ppl.json", "analysis/global_group_table.csv",
        "analysis/groups_to_prune.csv", "analysis/pruning_plan.json",
        "analysis/layer_summary.csv", "logs/run.log", "logs/config.json", "summary.json",
    ]
    for rel in expected:
        assert (finished_run / rel).is_file(), rel
    assert (finished_run / "evaluation").is_dir()
    leftovers = [p.name for p in finished_run.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_summary_meets_budget(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    p = summary["parameters"]
    assert p["target_ratio"] == 0.3
    assert abs(p["removed"] - p["target_removed"]) <= 3 * 32 + 2 * 32  # one MLP channel + norms
    assert p["base_total"] - p["pruned_total"] == p["removed"]
    assert 0 < p["achieved_ratio_decoder"] < 1
    model = AutoModelForCausalLM.from_pretrained(finished_run / "models")
    assert sum(t.numel() for t in model.parameters()) == p["pruned_total"]


def test_group_tables(finished_run):
    with (finished_run / "analysis" / "global_group_table.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["layer", "type", "index", "importance", "cost", "delta", "score",
                             "selected"]
    assert len(rows) == 4 * (2 + 24)  # 4 layers x (2 KV groups + 24 channels)
    with (finished_run / "analysis" / "groups_to_prune.csv").open() as f:
        pruned = list(csv.DictReader(f))
    assert len(pruned) == sum(r["selected"] == "1" for r in rows)
    scores = [float(r["score"]) for r in pruned]
    assert scores == sorted(scores)
    assert {r["reason"] for r in pruned} <= {"score", "collapse"}


def test_removal_analysis_files(finished_run):
    layer = json.loads((finished_run / "analysis" / "layer_removal_ppl.json").read_text())
    block = json.loads((finished_run / "analysis" / "block_removal_ppl.json").read_text())
    assert len(layer["layers"]) == len(block["layers"]) == 4
    assert layer["base_ppl"] > 1 and layer["tau"] is not None
    for entry in layer["layers"]:
        assert entry["delta"] == pytest.approx(max(0.0, entry["ppl"] - layer["base_ppl"]))
        assert entry["mode"] in ("layer", "block")


def test_layer_summary_matches_plan(finished_run):
    plan = json.loads((finished_run / "analysis" / "pruning_plan.json").read_text())
    with (finished_run / "analysis" / "layer_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(plan["layers"]) == 4
    for row, lp in zip(rows, plan["layers"]):
        assert int(row["kv_heads_after"]) == len(lp["kept_kv_heads"])
        assert int(row["channels_after"]) == len(lp["kept_channels"])
        assert int(row["q_heads_after"]) == 2 * len(lp["kept_kv_heads"])


def test_resolved_config_logged(finished_run):
    cfg = json.loads((finished_run / "logs" / "config.json").read_text())
    assert cfg["arguments"]["pruning_ratio"] == 0.3
    assert cfg["resolved"]["device"] == "cpu"
    assert "torch" in cfg["versions"]
    log = (finished_run / "logs" / "run.log").read_text()
    assert "stage: calibration" in log and "pruned:" in log


def test_temperature_zero_skips_analysis(tiny_model_dir, data_dir, tmp_path, capsys):
    args = base_args(tiny_model_dir, data_dir, tmp_path) + ["--temperature", "0"]
    assert run_cli(args, capsys)[0] == 0
    layer = json.loads((tmp_path / "run" / "analysis" / "layer_removal_ppl.json").read_text())
    assert layer["skipped"] is True


def test_same_inputs_same_plan(tiny_model_dir, data_dir, tmp_path, capsys):
    for name in ("a", "b"):
        assert run_cli(base_args(tiny_model_dir, data_dir, tmp_path, name=name), capsys)[0] == 0
    plan = [(tmp_path / n / "analysis" / "pruning_plan.json").read_bytes() for n in "ab"]
    assert plan[0] == plan[1]


BAD_INPUTS = [
    (["--pruning_ratio", "1.5"], "--pruning_ratio 1.5 must be between 0 and 1"),
    (["--pruning_ratio", "0"], "--pruning_ratio 0 must be between 0 and 1"),
    (["--pruning_ratio", "0.95"], "decoder layers hold only"),
    (["--temperature", "-1"], "--temperature -1.0 must be a finite number >= 0"),
    (["--epsilon", "1"], "--epsilon 1.0 must be in [0, 1)"),
    (["--epsilon", "-0.1"], "--epsilon -0.1 must be in [0, 1)"),
    (["--dataset", "imagenet"], "unknown --dataset 'imagenet'"),
    (["--importance_method", "random"], "unknown --importance_method 'random'"),
    (["--dataset", "wikitext2"], "use --dataset c4"),
    (["--dataset", "alpaca"], "alpaca_en_demo.json is not in the local data directories"),
    (["--base_model", "/no/such/model"], "model path '/no/such/model' does not exist"),
    (["--run_evaluation", "speed"], "unknown --run_evaluation 'speed'"),
    (["--output_name", "../escape"], "must be a plain folder name"),
    (["--num_examples", "0"], "--num_examples must be a positive integer"),
    (["--method", "sparsegpt"], "unknown --method 'sparsegpt'"),
    (["--tau_quantile", "2"], "--tau_quantile 2.0 must be in [0, 1]"),
    (["--delta_metric", "kl"], "unknown --delta_metric 'kl'"),
]


@pytest.mark.parametrize("extra,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_one_line_exit_2(extra, message, tiny_model_dir, data_dir, tmp_path, capsys,
                                   monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HGSP_HOME", str(tmp_path / "home"))  # no fetched assets to fall back on
    code, err = run_cli(base_args(tiny_model_dir, data_dir, tmp_path) + extra, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "run").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]


def test_unsupported_architecture(tmp_path, data_dir, capsys):
    from transformers import AutoConfig

    folder = tmp_path / "gpt2"
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    code, err = run_cli(base_args(folder, data_dir, tmp_path), capsys)
    assert code == 2 and "unsupported architecture 'gpt2'" in err
    assert "llama, mistral, qwen2, qwen3" in err


def test_existing_results_are_kept(tiny_model_dir, data_dir, tmp_path, capsys):
    marker = tmp_path / "run" / "keep.txt"
    marker.parent.mkdir()
    marker.write_text("earlier result")
    code, err = run_cli(base_args(tiny_model_dir, data_dir, tmp_path), capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert marker.read_text() == "earlier result"
    # With --overwrite the old folder is replaced only once the new run is complete.
    code, _ = run_cli(base_args(tiny_model_dir, data_dir, tmp_path) + ["--overwrite"], capsys)
    assert code == 0 and not marker.exists()
    assert (tmp_path / "run" / "summary.json").is_file()


def test_failure_midway_leaves_no_partial_results(tiny_model_dir, data_dir, tmp_path, capsys,
                                                  monkeypatch):
    marker = tmp_path / "run" / "keep.txt"
    marker.parent.mkdir()
    marker.write_text("earlier result")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("hgsp.pipeline.save_pruned_model", interrupted)
    code, err = run_cli(base_args(tiny_model_dir, data_dir, tmp_path) + ["--overwrite"], capsys)
    assert code == 130 and "no results were written" in err
    assert marker.read_text() == "earlier result"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


WRITE_FAILURES = [
    (OSError, errno.ENOSPC, "disk full while writing '{file}': free space or use --results_dir "
     "on another disk"),
    (PermissionError, errno.EACCES, "permission denied for '{file}': check its permissions or "
     "use another --results_dir"),
]


@pytest.mark.parametrize("kind,code,message", WRITE_FAILURES, ids=["ENOSPC", "EACCES"])
def test_write_failure_keeps_earlier_result(kind, code, message, finished_run, tiny_model_dir,
                                            data_dir, tmp_path, capsys, monkeypatch):
    """A full disk (or a refused write) while saving: the earlier result stays byte for byte,
    the half-written folder goes, and the user reads one line naming the file and the fix."""
    results = tmp_path / "results"
    earlier = shutil.copytree(finished_run, results / "run")
    before = snapshot(earlier)

    def fail_midway(model, path):
        path.write_bytes(b"PK\x03\x04 half a file")  # the disk fills during the write
        raise kind(code, os.strerror(code), str(path))

    monkeypatch.setattr("hgsp.save.save_bin", fail_midway)
    exit_code, err = run_cli(base_args(tiny_model_dir, data_dir, results) + ["--overwrite"],
                             capsys)
    assert exit_code == 2, err
    assert snapshot(earlier) == before
    assert [p.name for p in results.iterdir()] == ["run"]  # no .run.tmp-* or .run.old-*
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    expected = message.format(file=results / "run" / "models" / "pruned_model.bin")
    assert lines == [f"error: {expected}"], err
    assert "Traceback" not in err


def test_run_global_pruning_script(tiny_model_dir, data_dir, tmp_path):
    """The usage document's command, in a separate process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(ROOT / "run_global_pruning.py"),
           *base_args(tiny_model_dir, data_dir, tmp_path, ratio="0.4"), "--importance_method",
           "wanda", "--no-save_bin"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "done:" in proc.stderr
    assert not (tmp_path / "run" / "models" / "pruned_model.bin").exists()
    tok_ids = torch.tensor([[5, 6, 7, 8]])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "models")
    out = model.generate(tok_ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 8)


def test_replay_from_saved_config(finished_run, tmp_path, capsys):
    """`hgsp prune --config results/x/logs/config.json` redoes the run: same plan."""
    config = finished_run / "logs" / "config.json"
    code = main(["prune", "--config", str(config), "--results_dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    replayed = (tmp_path / "run" / "analysis" / "pruning_plan.json").read_bytes()
    assert replayed == (finished_run / "analysis" / "pruning_plan.json").read_bytes()


def test_replay_of_a_config_older_than_an_option(finished_run, tmp_path, capsys):
    """A saved config without a later scoring option replays with the value of its time."""
    saved = json.loads((finished_run / "logs" / "config.json").read_text())
    arguments = saved.get("arguments", saved)
    assert arguments["block_delta"] == "shapley"
    del arguments["block_delta"]
    old = tmp_path / "old_config.json"
    old.write_text(json.dumps(saved))
    code = main(["prune", "--config", str(old), "--results_dir", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    assert "predates block_delta: replaying with block_delta=alone" in capsys.readouterr().err
    replayed = json.loads((tmp_path / "run" / "logs" / "config.json").read_text())
    assert replayed.get("arguments", replayed)["block_delta"] == "alone"


def test_replay_does_not_carry_overwrite(finished_run, tmp_path, capsys):
    """A config saved by an --overwrite run, replayed with one change into the same folder,
    must not replace the run it came from unless this command line says --overwrite."""
    saved = json.loads((finished_run / "logs" / "config.json").read_text())
    saved.get("arguments", saved)["overwrite"] = True
    config = tmp_path / "config.json"
    config.write_text(json.dumps(saved))
    plan = (finished_run / "analysis" / "pruning_plan.json").read_bytes()
    code = main(["prune", "--config", str(config), "--results_dir", str(finished_run.parent),
                 "--temperature", "2"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (finished_run / "analysis" / "pruning_plan.json").read_bytes() == plan


def test_pruning_a_pruned_model_is_refused(finished_run, data_dir, tmp_path, capsys):
    code = main(["prune", "--base_model", str(finished_run / "models"), "--output_name", "again",
                 "--pruning_ratio", "0.1", "--data_dir", str(data_dir), "--dataset", "c4",
                 "--results_dir", str(tmp_path)])
    assert code == 2
    assert "was already pruned by hgsp: prune the original model" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:99"])
def test_a_bad_device_is_one_line(device, tiny_model_dir, tmp_path, capsys):
    code = main(["prune", "--base_model", str(tiny_model_dir), "--output_name", "d",
                 "--pruning_ratio", "0.1", "--device", device, "--results_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and f"\nerror: --device {device}" in err and "Traceback" not in err


def test_replay_bad_config(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text('{"something": 1}')
    assert main(["prune", "--config", str(bad)]) == 2
    assert "holds no hgsp arguments" in capsys.readouterr().err
    assert main(["prune", "--config", str(tmp_path / "missing.json")]) == 2


def test_missing_required_flag(capsys):
    assert main(["prune", "--output_name", "x"]) == 2
    assert "--base_model is required" in capsys.readouterr().err


def test_exported_calibration_windows_are_the_runs(finished_run, tiny_model_dir, data_dir,
                                                   tmp_path):
    """benchmarks/export_calibration.py writes the windows `prune` calibrated on."""
    module = load_script("benchmarks/export_calibration.py")
    out = tmp_path / "calibration"
    assert module.main(["--model", str(tiny_model_dir), "--data_dir", str(data_dir),
                        "--dataset", "c4", "--num_examples", "4", "--seq_len", "16",
                        "--analysis_samples", "2", "--out_dir", str(out)]) == 0
    recorded = json.loads((finished_run / "summary.json").read_text())["calibration"]
    meta = json.loads((out / "calibration_meta.json").read_text())
    assert meta["calibration_windows"] == recorded["windows"]
    assert meta["analysis_windows"] == recorded["analysis_windows"]
    ids = torch.load(out / "calibration.pt", weights_only=True)
    assert ids["calibration"].shape == (4, 16) and ids["analysis"].shape == (2, 16)
    lines = [json.loads(line) for line in (out / "calibration.jsonl").read_text().splitlines()]
    assert [x["split"] for x in lines] == ["calibration"] * 4 + ["analysis"] * 2
    assert [x["index"] for x in lines] == recorded["windows"] + recorded["analysis_windows"]
    assert lines[0]["input_ids"] == ids["calibration"][0].tolist()
    assert not list(out.glob("*.tmp*")) and not list(out.glob(".*.tmp*"))
    # A bad corpus name is a one-line error and a non-zero exit, and writes nothing.
    assert module.main(["--model", str(tiny_model_dir), "--data_dir", str(data_dir),
                        "--dataset", "nope", "--out_dir", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_a_ratio_that_empties_the_decoder_is_one_line(tiny_model_dir, data_dir, tmp_path,
                                                      capsys):
    """Just under the decoder's share, collapse would remove every layer; at or above it the
    suggested limit is itself accepted."""
    args = ["prune", "--base_model", str(tiny_model_dir), "--data_dir", str(data_dir),
            "--dataset", "c4", "--results_dir", str(tmp_path), "--num_examples", "4",
            "--seq_len", "16", "--analysis_samples", "2"]
    assert main([*args, "--output_name", "over", "--pruning_ratio", "0.95"]) == 2
    err = capsys.readouterr().err
    limit = err.rsplit("use a ratio below ", 1)[1].strip()
    assert main([*args, "--output_name", "under", "--pruning_ratio", limit]) == 2
    err = capsys.readouterr().err
    assert "removes all 4 decoder layers" in err and "Traceback" not in err
    assert not (tmp_path / "over").exists() and not (tmp_path / "under").exists()


def test_delta_metric_loss_writes_deltas_in_the_unit_of_tau(tiny_model_dir, data_dir, tmp_path):
    """τ and the modes come from loss deltas: the removal files hold those, not perplexity."""
    import math

    assert main(["prune", *base_args(tiny_model_dir, data_dir, tmp_path),
                 "--delta_metric", "loss"]) == 0
    doc = json.loads((tmp_path / "run" / "analysis" / "layer_removal_ppl.json").read_text())
    assert doc["delta_metric"] == "loss"
    for entry in doc["layers"]:
        expected = max(0.0, math.log(entry["ppl"]) - math.log(doc["base_ppl"]))
        assert entry["delta"] == pytest.approx(expected)
        assert (entry["mode"] == "layer") == (entry["delta"] < doc["tau"])
    blocks = json.loads((tmp_path / "run" / "analysis" / "block_removal_ppl.json").read_text())
    for entry in blocks["layers"]:
        assert entry["attn_delta"] == pytest.approx(
            max(0.0, math.log(entry["attn_ppl"]) - math.log(doc["base_ppl"])))
