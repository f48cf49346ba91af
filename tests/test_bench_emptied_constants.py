"""benchmarks/emptied_block_constants.py: a run rebuilt with and without its emptied blocks'
constants, on tiny models."""

import json

import pytest
from conftest import load_script, write_tiny_model

from hgsp.config import PruneConfig
from hgsp.pipeline import prune

FAST = dict(num_examples=4, seq_len=16, gradient_batch_size=2, analysis_samples=2,
            dataset="c4")


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/emptied_block_constants.py")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model"))


def _run(model_dir, data_dir, results, method, ratio, **extra):
    return prune(PruneConfig(base_model=str(model_dir), output_name=method, pruning_ratio=ratio,
                             method=method, data_dir=str(data_dir), results_dir=str(results),
                             **FAST, **extra))


@pytest.mark.parametrize("method, ratio", [("flap", 0.75), ("hgsp", 0.6)])
def test_rebuilds_the_run_and_scores_the_other_treatment(bench, method, ratio, model_dir,
                                                         data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HGSP_DATA_DIR", str(data_dir))
    result = _run(model_dir, data_dir, tmp_path, method, ratio)
    emptied = [lp for lp in result.plan.layers if lp.attn_removed or lp.mlp_removed]
    assert emptied, "the test needs a run that empties a block"
    out = tmp_path / "out.json"
    assert bench.main(["--run", str(result.results_dir), "--ppl_max_windows", "2",
                       "--out", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    as_run, other = run["builds"]
    assert as_run["params"] == result.summary["parameters"]["pruned_total"]
    n_blocks = sum(lp.attn_removed + lp.mlp_removed for lp in result.plan.layers)
    assert len(run["emptied_blocks"]) == n_blocks
    # one hidden-size constant per emptied block: FLAP's run has them, H-GSP's does not
    hidden = json.loads((result.results_dir / "models" / "config.json").read_text())[
        "hidden_size"]
    sign = 1 if method == "flap" else -1
    assert as_run["params"] - other["params"] == sign * n_blocks * hidden
    assert as_run["wikitext2"] != other["wikitext2"]


def test_refuses_a_folder_that_is_not_a_run(bench, tmp_path, capsys):
    assert bench.main(["--run", str(tmp_path), "--out", str(tmp_path / "o.json")]) == 2
    assert "not a results folder" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_refuses_a_run_whose_saved_model_it_cannot_rebuild(bench, model_dir, data_dir, tmp_path,
                                                           monkeypatch, capsys):
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("HGSP_DATA_DIR", str(data_dir))
    result = _run(model_dir, data_dir, tmp_path, "flap", 0.75)
    weights = result.results_dir / "models" / "model.safetensors"
    state = load_file(weights)
    name = next(k for k in state if k.endswith("down_proj.weight"))
    state[name] = state[name] + 1e-3
    save_file(state, weights, metadata={"format": "pt"})
    out = tmp_path / "out.json"
    assert bench.main(["--run", str(result.results_dir), "--out", str(out)]) == 2
    assert "differs from the saved one" in capsys.readouterr().err
    assert not out.exists()
