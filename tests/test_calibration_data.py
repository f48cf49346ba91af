"""Calibration corpora: the Alpaca instruction set as a calibration corpus."""

from __future__ import annotations

import json

import pytest

from hgsp.alpaca import build_prompt
from hgsp.data import build_calibration_set, load_corpus
from hgsp.errors import UserError

from conftest import synthetic_documents, tiny_tokenizer


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
