"""Calibration corpora: the Alpaca instruction set, and mixes such as c4+alpaca."""

from __future__ import annotations

import json

import pytest
import torch

from hgsp.alpaca import build_prompt
from hgsp.data import build_calibration_set, load_corpus, tokenize_windows
from hgsp.errors import UserError

from conftest import synthetic_documents, tiny_tokenizer, write_data_dir


def _write_alpaca(folder, n: int = 60):
    texts = synthetic_documents(2 * n, seed=3)
    records = [{"instruction": texts[2 * i][:80], "input": "" if i % 2 else texts[2 * i + 1][:40],
                "output": texts[2 * i + 1]} for i in range(n)]
    (folder / "alpaca").mkdir(parents=True, exist_ok=True)
    (folder / "alpaca" / "alpaca_en_demo.json").write_text(json.dumps(records))
    return records


def test_alpaca_documents_are_prompt_then_response(tmp_path):
    records = _write_alpaca(tmp_path)
    corpus = load_corpus("alpaca", "train", str(tmp_path))
    assert corpus.name == "alpaca" and str(tmp_path) in corpus.origin
    assert len(corpus.documents) == len(records)
    first = corpus.documents[0]
    assert first.startswith(build_prompt(records[0])) and first.endswith(records[0]["output"])
    assert "### Input:" in first and "### Input:" not in corpus.documents[1]


def test_alpaca_gives_disjoint_calibration_and_analysis_windows(tmp_path):
    _write_alpaca(tmp_path)
    corpus = load_corpus("alpaca", "train", str(tmp_path))
    cal = build_calibration_set(tiny_tokenizer(), corpus, 8, 16, 4, seed=0)
    assert cal.calibration.shape == (8, 16) and cal.analysis.shape == (4, 16)
    assert not set(cal.calibration_windows) & set(cal.analysis_windows)


def test_alpaca_is_not_an_evaluation_corpus(tmp_path):
    _write_alpaca(tmp_path)
    with pytest.raises(UserError, match="no 'validation' split: it calibrates only"):
        load_corpus("alpaca", "validation", str(tmp_path))


def test_missing_alpaca_offline_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HGSP_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HGSP_DATA_DIR", raising=False)
    with pytest.raises(UserError, match="Hub is offline; run `hgsp fetch-assets c4`"):
        load_corpus("alpaca", "train", str(tmp_path))


def test_prune_calibrates_on_alpaca(tiny_model_dir, tmp_path, capsys):
    from hgsp.cli import main
    from test_cli import base_args

    _write_alpaca(tmp_path / "data", n=200)
    args = base_args(tiny_model_dir, tmp_path / "data", tmp_path / "results") + \
        ["--dataset", "alpaca"]
    assert main(["prune", *args]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "results" / "run" / "summary.json").read_text())
    assert "alpaca_en_demo.json" in summary["calibration"]["corpus"]
    assert summary["parameters"]["achieved_ratio_total"] == pytest.approx(0.3, abs=0.02)


def test_mix_keeps_its_corpora_apart(tmp_path):
    write_data_dir(tmp_path)
    records = _write_alpaca(tmp_path)
    mix = load_corpus("c4+alpaca", "train", str(tmp_path))
    c4 = load_corpus("c4", "train", str(tmp_path))
    assert [p.name for p in mix.parts] == ["c4", "alpaca"]
    assert mix.documents == c4.documents + mix.parts[1].documents
    assert len(mix.parts[1].documents) == len(records)
    assert "c4_demo.jsonl" in mix.origin and "alpaca_en_demo.json" in mix.origin


def test_mix_draws_an_equal_share_from_each_corpus(tmp_path):
    write_data_dir(tmp_path)
    _write_alpaca(tmp_path, n=200)
    tok = tiny_tokenizer()
    mix = load_corpus("c4+alpaca", "train", str(tmp_path))
    c4_windows = tokenize_windows(tok, mix.parts[0], 16).shape[0]
    cal = build_calibration_set(tok, mix, 9, 16, 5, seed=0)
    assert cal.calibration.shape == (9, 16) and cal.analysis.shape == (5, 16)
    from_c4 = [w < c4_windows for w in cal.calibration_windows]
    assert sum(from_c4) == 5 and from_c4[:4] == [True, False, True, False]  # remainder, interleaved
    assert sum(w < c4_windows for w in cal.analysis_windows) == 3
    assert not set(cal.calibration_windows) & set(cal.analysis_windows)


def test_single_corpus_draw_is_unchanged_by_mixing_support(tmp_path):
    """Caches and earlier runs rely on the same seed giving the same windows as before."""
    write_data_dir(tmp_path)
    tok = tiny_tokenizer()
    corpus = load_corpus("c4", "train", str(tmp_path))
    windows = tokenize_windows(tok, corpus, 16)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(7)).tolist()
    cal = build_calibration_set(tok, corpus, 6, 16, 3, seed=7)
    assert cal.calibration_windows == order[:6] and cal.analysis_windows == order[6:9]
    assert torch.equal(cal.calibration, windows[order[:6]])


@pytest.mark.parametrize("name, message", [
    ("c4+c4", "unknown dataset mix 'c4\\+c4'"),
    ("c4+books", "unknown dataset mix 'c4\\+books'"),
])
def test_bad_mix_names_the_fix(tmp_path, name, message):
    with pytest.raises(UserError, match=message + ".*e.g. c4\\+alpaca"):
        load_corpus(name, "train", str(tmp_path))


def test_mix_is_not_an_evaluation_corpus(tmp_path):
    write_data_dir(tmp_path)
    _write_alpaca(tmp_path)
    with pytest.raises(UserError, match="no 'test' split: a mix calibrates only"):
        load_corpus("c4+alpaca", "test", str(tmp_path))


def test_mix_part_too_small_is_named(tmp_path):
    write_data_dir(tmp_path)
    _write_alpaca(tmp_path, n=2)
    mix = load_corpus("c4+alpaca", "train", str(tmp_path))
    with pytest.raises(UserError, match="^alpaca/train gives .* its share of --num_examples"):
        build_calibration_set(tiny_tokenizer(), mix, 64, 16, 8, seed=0)


def test_prune_calibrates_on_a_mix(tiny_model_dir, tmp_path, capsys):
    from hgsp.cli import main
    from test_cli import base_args

    write_data_dir(tmp_path / "data")
    _write_alpaca(tmp_path / "data", n=200)
    args = base_args(tiny_model_dir, tmp_path / "data", tmp_path / "results") + \
        ["--dataset", "c4+alpaca"]
    assert main(["prune", *args]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "results" / "run" / "summary.json").read_text())
    corpus = summary["calibration"]["corpus"]
    assert "c4_demo.jsonl" in corpus and "alpaca_en_demo.json" in corpus
    assert summary["parameters"]["achieved_ratio_total"] == pytest.approx(0.3, abs=0.02)


@pytest.mark.parametrize("split, kept", [("train", 3000), ("validation", 1100)])
def test_hub_c4_keeps_a_bounded_slice_of_its_shard(split, kept, tmp_path, monkeypatch):
    """Online C4 is a 356k-document shard: only its first documents are kept (the loader is
    replaced here, as the Hub is not reachable in tests)."""
    import datasets

    calls = []

    def fake_load_dataset(repo, data_files=None, split=None, **_):
        calls.append((repo, data_files))
        return datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(5000)]})

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HGSP_DATA_DIR", raising=False)
    monkeypatch.setenv("HGSP_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = load_corpus("c4", split, str(tmp_path / "empty"))
    assert calls and calls[0][0] == "allenai/c4"
    assert len(corpus.documents) == kept and corpus.documents[-1] == f"document {kept - 1}"
    assert corpus.origin.startswith("hub:allenai/c4")
