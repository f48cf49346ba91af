"""benchmarks/bench_speed.py: every model timed in alternating passes, medians reported."""

import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/bench_speed.py")


def test_passes_alternate_and_the_median_is_reported(bench, monkeypatch):
    import hgsp.efficiency
    import hgsp.modelio

    order = []
    speeds = {"base": iter([10.0, 16.0, 13.0]), "m20": iter([20.0, 18.0, 30.0])}

    class Loaded:
        def __init__(self, path):
            self.model = path

    def fake_efficiency(model, folder, batch_sizes, repeats):
        order.append(model)
        return {"parameters": {"total": 1}, "macs_per_token": {"total": 1}, "weight_bytes": 1,
                "disk_bytes": None, "peak_memory": {"peak_bytes": 1},
                "speed": {"batch1": {"prefill_latency_s": 0.1,
                                     "decode_tokens_per_s": next(speeds[model])}}}

    monkeypatch.setattr(hgsp.modelio, "load_model", Loaded)
    monkeypatch.setattr(hgsp.efficiency, "efficiency", fake_efficiency)
    out = bench.measure("base", {"m20": "m20"}, (1,), repeats=1, passes=3)
    assert order == ["base", "m20", "m20", "base", "base", "m20"]
    assert out["base"]["speed"]["batch1"]["decode_tokens_per_s"] == 13.0
    assert out["m20"]["speed"]["batch1"]["decode_tokens_per_s"] == 20.0
    assert out["m20"]["ratios"]["batch1_decode_speedup"] == pytest.approx(20 / 13)
    assert "ratios" not in out["base"]


def test_passes_must_be_positive(bench, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench_speed.py", "--model", "x", "--passes", "0"])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2
    assert "--passes must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--ratios", "0.2,half"], "--ratios '0.2,half' must be a number"),
    (["--ratios", "0"], "--ratios 0 must be between 0 and 1"),
    (["--round_to", "8,x"], "--round_to '8,x' must be a comma-separated list of whole numbers"),
    (["--round_to", "-8"], "--round_to '-8' must be"),
])
def test_bad_variants_stop_before_anything_is_pruned(bench, monkeypatch, capsys, argv, message):
    def no_pruning(*args, **kwargs):
        raise AssertionError("pruned despite a bad argument")

    monkeypatch.setattr(bench, "prune_variants", no_pruning)
    monkeypatch.setattr("sys.argv", ["bench_speed.py", "--model", "x", *argv])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
