"""The quality benchmark's table text and --update bookkeeping (no model needed)."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bq():
    return load_script("benchmarks/bench_quality.py")


def _row(label, full=True, windows=(2358, 794)):
    return {"ratio": 0.2, "label": label, "params": 1e8, "achieved": 0.2, "layers_kept": 29,
            "wikitext2": 100.0, "ptb": 200.0, "zeroshot_mean": 0.5, "decode_tok_s_b1": 10.0,
            "ppl_windows": {"wikitext2": windows[0], "ptb": windows[1]}, "ppl_full": full}


def test_footnote_states_the_calibration_size_of_the_run(bq):
    rows = [_row("a"), _row("b")]
    default = bq.markdown(rows, {"zeroshot_limit": 60, "dataset": "c4", "extra": "{}"})
    assert "c4, 32 windows of 128 tokens for every method" in default
    changed = bq.markdown(rows, {"zeroshot_limit": 60, "dataset": "c4",
                                 "extra": '{"num_examples": 64, "seq_len": 256}'})
    assert "c4, 64 windows of 256 tokens for every method" in changed
    assert "all 2358 WikiText-2 and 794 PTB test windows" in default


def test_rows_on_other_windows_are_marked(bq):
    rows = [_row("a"), _row("b"), _row("c", full=False, windows=(128, 128))]
    text = bq.markdown(rows, {"zeroshot_limit": 60, "dataset": "c4", "extra": "{}"})
    assert "| c† |" in text and "† the first 128 WikiText-2 and 128 PTB test windows." in text
    assert "| a |" in text


def test_update_keeps_the_table_settings_and_lists_the_update(bq):
    previous = {"dataset": "c4", "zeroshot_limit": 60, "speed_remeasured": "2026-12-01",
                "updates": [{"rows": "hgsp"}]}
    args = Namespace(rows="hgsp_q40", ratios="0.5", extra="{}")
    new = bq._updated_settings(previous, args)
    assert new["zeroshot_limit"] == 60 and "speed_remeasured" not in new
    assert [u["rows"] for u in new["updates"]] == ["hgsp", "hgsp_q40"]


def test_speed_footnote_says_whether_rows_were_timed_in_one_session(bq):
    rows = [_row("a"), _row("b")]
    settings = {"zeroshot_limit": 60, "dataset": "c4", "extra": "{}"}
    assert "run `--speed_only` before comparing rows" in bq.markdown(rows, settings)
    timed = bq.markdown(rows, {**settings, "speed_remeasured": "2026-12-01T10:00:00"})
    assert "measured again, one after the other, on 2026-12-01" in timed
    assert "--speed_only` before comparing" not in timed


def test_write_leaves_the_three_files_and_no_temporary(bq, tmp_path):
    rows = [_row("a"), _row("b")]
    bq._write(tmp_path, rows, {"zeroshot_limit": 60, "dataset": "c4", "extra": "{}"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "quality.json", "quality.md", "quality_vs_size.png"]
    assert "| a |" in (tmp_path / "quality.md").read_text()


def test_an_update_replaces_a_row_only_when_its_new_figures_exist(bq):
    old = [{**_row("a"), "row": "hgsp"}, {**_row("b"), "row": "hgsp_t0"},
           {**_row("b"), "row": "hgsp_t0", "ratio": 0.5}]
    new = {**_row("b2"), "row": "hgsp_t0"}
    rows = bq._replaced(old, new)
    assert [(r["row"], r["ratio"], r["label"]) for r in rows] == [
        ("hgsp", 0.2, "a"), ("hgsp_t0", 0.5, "b"), ("hgsp_t0", 0.2, "b2")]


def test_a_row_keeps_both_zero_shot_conventions(bq, monkeypatch):
    import hgsp.evaluate

    tasks = {"piqa": {"acc": 0.6, "acc_norm": 0.7}, "winogrande": {"acc": 0.5, "acc_norm": None}}
    result = {"efficiency": {"parameters": {"total": 10},
                             "speed": {"batch1": {"decode_tokens_per_s": 3.0}}},
              "ppl": {d: {"128": {"ppl": 9.0, "windows": 4, "capped": False}}
                      for d in ("wikitext2", "ptb")},
              "zeroshot": {"tasks": tasks, "mean_acc": 0.55, "mean_acc_norm": 0.6}}
    monkeypatch.setattr(hgsp.evaluate, "evaluate_model", lambda *a, **k: result)
    row = bq.evaluate(None, None, None)
    assert (row["zeroshot_mean"], row["zeroshot_mean_norm"]) == (0.55, 0.6)
    assert row["zeroshot"] == {"piqa": 0.6, "winogrande": 0.5}


def test_variant_rows_use_the_normalization_of_the_defaults(bq):
    """A variant row's difference from the defaults is its own setting at every ratio, so
    only the normalization rows may choose a normalization."""
    from hgsp.config import PruneConfig

    norm_rows = {"hgsp_norm_none", "hgsp_norm_block", "hgsp_norm_layer"}
    variants = [n for n in bq.ROWS if n.startswith("hgsp_") and n not in norm_rows]
    assert {"hgsp_tau_inf", "hgsp_q40", "hgsp_no_refit", "hgsp_block_alone"} <= set(variants)
    for ratio in (0.2, 0.5):
        default = PruneConfig(base_model="m", output_name="o", pruning_ratio=ratio)
        for name in variants:
            cfg = PruneConfig(base_model="m", output_name="o", pruning_ratio=ratio,
                              **bq.ROWS[name][1])
            assert cfg.resolved_importance_norm == default.resolved_importance_norm, name
    text = bq.markdown([{**_row("H-GSP τ=∞ (layer-wise)"), "row": "hgsp_tau_inf"}],
                       {"zeroshot_limit": 60, "dataset": "c4", "extra": "{}"})
    assert "| H-GSP τ=∞ (layer-wise) |" in text and "‡" not in text


def test_a_model_of_another_size_or_depth_is_refused_for_the_speed_column(bq):
    row = {**_row("H-GSP (defaults)"), "row": "hgsp", "params": 107612928, "layers_kept": 30}
    same = {"parameters": {"pruned_total": 107612928}, "layers": {"kept": 30}}
    bq._check_same_model(row, same)
    for found in ({"parameters": {"pruned_total": 107612352}, "layers": {"kept": 30}},
                  {"parameters": {"pruned_total": 107612928}, "layers": {"kept": 29}}):
        with pytest.raises(SystemExit, match="rerun the row with --update --rows hgsp"):
            bq._check_same_model(row, found)


def test_speed_only_times_every_model_in_alternating_passes_and_keeps_the_median(
        bq, tmp_path, monkeypatch):
    rows = [{**_row("base"), "ratio": 0.0}, {**_row("a"), "row": "hgsp"},
            {**_row("b"), "row": "shortgpt"}]
    settings = {"zeroshot_limit": 60, "dataset": "c4", "extra": "{}"}
    bq._write(tmp_path, rows, settings)
    calls = []
    speeds = {"base": iter([5.0, 9.0, 6.0]), "a": iter([20.0, 1.0, 30.0]),
              "b": iter([12.0, 11.0, 10.0])}

    def timed(folder, _settings):
        calls.append(folder)
        return {"efficiency": {"speed": {"batch1": {"decode_tokens_per_s":
                                                    next(speeds[folder])}}}}

    monkeypatch.setattr(bq, "_saved_model", lambda m, row, a, w: row["label"])
    monkeypatch.setattr(bq, "_evaluate_folder", timed)
    bq.remeasure_speed("model", tmp_path, tmp_path, Namespace(speed_passes=3))
    assert calls == ["base", "a", "b", "b", "a", "base", "base", "a", "b"]
    doc = json.loads((tmp_path / "quality.json").read_text())
    got = {r["label"]: (r["decode_tok_s_b1"], r["decode_tok_s_b1_passes"]) for r in doc["rows"]}
    assert got == {"base": (6.0, [5.0, 9.0, 6.0]), "a": (20.0, [20.0, 1.0, 30.0]),
                   "b": (11.0, [12.0, 11.0, 10.0])}
    assert doc["settings"]["speed_passes"] == 3
    assert "(`--speed_only`, median of 3 passes)" in (tmp_path / "quality.md").read_text()


def test_rows_name_a_set_or_a_list_of_known_rows(bq):
    assert bq.row_names("all") == list(bq.ROWS)
    core = bq.row_names("core")
    assert core[0] == "hgsp" and set(core) < set(bq.ROWS)
    assert {"llm_pruner", "wanda_sp", "flap", "shortgpt", "hgsp_t0", "hgsp_tau_inf",
            "hgsp_tau_0"} <= set(core)
    assert bq.row_names("flap, hgsp") == ["flap", "hgsp"]


@pytest.mark.parametrize("argv,message", [
    (["--rows", "hgsp,slicegpt"], "unknown row slicegpt in --rows"),
    (["--rows", ","], "unknown row ',' in --rows"),
    (["--ratios", "0.2,half"], "--ratios '0.2,half' must be a number or a comma-separated"),
    (["--ratios", "1.5"], "--ratios 1.5 must be between 0 and 1"),
    (["--ratios", "0.2,0.2"], "lists a ratio twice"),
    (["--speed_only", "--speed_passes", "0"], "--speed_passes must be at least 1"),
])
def test_bad_arguments_stop_before_any_work(bq, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bq.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def _save(folder, tensors):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_model_digest_follows_the_tensors_not_the_file(bq, tmp_path):
    import torch

    w = {"a.weight": torch.arange(6.0).view(2, 3), "b.bias": torch.ones(4)}
    one = bq.model_digest(_save(tmp_path / "one", w))
    assert bq.model_digest(_save(tmp_path / "two", dict(reversed(list(w.items()))))) == one
    changed = {**w, "b.bias": torch.tensor([1.0, 1.0, 1.0, 1.0 + 2 ** -20])}
    assert bq.model_digest(_save(tmp_path / "three", changed)) != one
    reshaped = {**w, "a.weight": w["a.weight"].view(3, 2)}
    assert bq.model_digest(_save(tmp_path / "four", reshaped)) != one


def test_rows_with_the_same_model_are_evaluated_once(bq, tmp_path, monkeypatch):
    import hgsp.evaluate
    import hgsp.modelio

    models = {"hgsp": "m1", "hgsp_norm_layer": "m1", "shortgpt": "m2"}
    evaluated = []

    def prune_row(model_path, name, ratio, args, work_dir):
        folder = tmp_path / "runs" / models[name]
        summary = {"parameters": {"achieved_ratio_total": 0.2}, "layers": {"kept": 30}}
        return Namespace(results_dir=folder, summary=summary), 1.0

    def evaluate(model, tokenizer, settings, folder=None):
        evaluated.append(model)
        return {**{k: v for k, v in _row(model).items() if k not in bq.OWN_FIELDS},
                "wikitext2": float(len(evaluated))}

    monkeypatch.setattr(bq, "prune_row", prune_row)
    monkeypatch.setattr(bq, "evaluate", evaluate)
    monkeypatch.setattr(bq, "model_digest", lambda folder: Path(folder).parent.name)
    monkeypatch.setattr(hgsp.evaluate, "check_data", lambda settings: None)
    monkeypatch.setattr(hgsp.modelio, "load_model", lambda path, *a: Namespace(
        model=_Model("base" if path == "base" else Path(path).parent.name), tokenizer=None))
    out = tmp_path / "out"
    argv = ["--model", "base", "--ratios", "0.2", "--rows", "hgsp,hgsp_norm_layer,shortgpt",
            "--out_dir", str(out), "--work_dir", str(tmp_path / "runs")]
    assert bq.main(argv) == 0
    assert [str(m) for m in evaluated] == ["base", "m1", "m2"]
    doc = json.loads((out / "quality.json").read_text())
    rows = {r.get("row", "base"): r for r in doc["rows"]}
    assert rows["hgsp_norm_layer"]["same_model_as"] == "hgsp"
    assert rows["hgsp_norm_layer"]["wikitext2"] == rows["hgsp"]["wikitext2"] == 2.0
    assert rows["shortgpt"]["wikitext2"] == 3.0 and "same_model_as" not in rows["shortgpt"]
    assert rows["hgsp_norm_layer"]["model_sha256"] == "m1"
    table = (out / "quality.md").read_text()
    assert table.count("‡") == 2  # the row's mark and its footnote


class _Model(str):
    """A stand-in model: its name, with the config the base row reads."""

    config = Namespace(num_hidden_layers=30)


def test_a_row_whose_twin_holds_another_model_now_loses_its_mark(bq):
    twin = {**_row("defaults"), "row": "hgsp", "model_sha256": "new"}
    copy = {**_row("per layer"), "row": "hgsp_norm_layer", "model_sha256": "old",
            "same_model_as": "hgsp"}
    settings = {"zeroshot_limit": 60, "dataset": "c4", "extra": "{}"}
    assert "‡" not in bq.markdown([twin, copy], settings)
    assert "‡" in bq.markdown([twin, {**copy, "model_sha256": "new"}], settings)


def test_earlier_rows_are_reused_only_when_measured_the_same_way(bq):
    rows = [{**_row("a"), "row": "hgsp", "model_sha256": "x"},
            {**_row("b", full=False), "row": "flap", "model_sha256": "y"},
            {**_row("c"), "row": "hgsp_norm_layer", "model_sha256": "x", "same_model_as": "hgsp"}]
    full = Namespace(ppl_max_windows=None, zeroshot_limit=60)
    assert list(bq.measured_models(rows, {"zeroshot_limit": 60}, full, set())) == [(0.2, "x")]
    assert bq.measured_models(rows, {"zeroshot_limit": 100}, full, set()) == {}
    capped = Namespace(ppl_max_windows=128, zeroshot_limit=60)
    assert bq.measured_models(rows, {"zeroshot_limit": 60}, capped, set()) == {}
    # a row measured again now does not lend its old figures
    assert bq.measured_models(rows, {"zeroshot_limit": 60}, full, {("hgsp", 0.2)}) == {}


def test_speed_only_times_a_shared_model_once(bq, tmp_path, monkeypatch):
    rows = [{**_row("base"), "ratio": 0.0}, {**_row("a"), "row": "hgsp", "model_sha256": "x"},
            {**_row("b"), "row": "hgsp_norm_layer", "model_sha256": "x"}]
    bq._write(tmp_path, rows, {"zeroshot_limit": 60, "dataset": "c4", "extra": "{}"})
    calls = []

    def timed(folder, _settings):
        calls.append(folder)
        speed = {"base": 5.0, "a": 7.0}[folder] + len(calls)
        return {"efficiency": {"speed": {"batch1": {"decode_tokens_per_s": speed}}}}

    monkeypatch.setattr(bq, "_saved_model", lambda m, row, a, w: row["label"])
    monkeypatch.setattr(bq, "_evaluate_folder", timed)
    bq.remeasure_speed("model", tmp_path, tmp_path, Namespace(speed_passes=2))
    assert calls == ["base", "a", "a", "base"]
    doc = json.loads((tmp_path / "quality.json").read_text())
    assert [r["decode_tok_s_b1_passes"] for r in doc["rows"]] == [[6.0, 9.0], [9.0, 10.0],
                                                                  [9.0, 10.0]]


def test_ppl_only_scores_a_shared_model_once(bq, tmp_path, monkeypatch):
    rows = [{**_row("base"), "ratio": 0.0},
            {**_row("a", full=False), "row": "hgsp", "model_sha256": "x"},
            {**_row("b", full=False), "row": "hgsp_norm_layer", "model_sha256": "x"},
            {**_row("c", full=False), "row": "flap", "model_sha256": "y"}]
    bq._write(tmp_path, rows, {"zeroshot_limit": 60, "dataset": "c4", "extra": "{}"})
    scored = []

    def ppl(model_path, row, args, work_dir, settings):
        scored.append(row["label"])
        value = {"windows": 9, "capped": False, "ppl": float(len(scored))}
        return {"ppl": {d: {"128": value} for d in ("wikitext2", "ptb")}}

    monkeypatch.setattr(bq, "_evaluate_saved", ppl)
    args = Namespace(rows="all", ratios="0.2", ppl_max_windows=None)
    bq.rescore_perplexity("model", tmp_path, tmp_path, args)
    assert scored == ["a", "c"]  # the base row is already on the full sets
    doc = json.loads((tmp_path / "quality.json").read_text())
    assert [r["wikitext2"] for r in doc["rows"]] == [100.0, 1.0, 1.0, 2.0]
