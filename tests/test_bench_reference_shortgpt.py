"""benchmarks/reference_shortgpt.py: driving a ShortGPT-style class and comparing with hgsp.

The authors' code is not in the repository; a stand-in with the same interface (a ``ShortGPT``
class in ``shortgpt.py`` that imports ``metrics``) is written for each test.
"""

import pytest
import torch
from conftest import VOCAB, load_script, tiny_model

STANDIN = '''
import torch
from transformers import AutoModelForCausalLM
from metrics import block_influence


class ShortGPT:
    def __init__(self, model_name, layers_path, n_prune_layers=None):
        self.model = AutoModelForCausalLM.from_pretrained(model_name, dtype=torch.float16)
        self.layers = self.model.model.layers
        self.importances = [0 for _ in self.layers]

    def compute_bi(self, hiddens):
        for i in range(len(hiddens) - 1):
            self.importances[i] += block_influence(hiddens[i], hiddens[i + 1]).sum().item()
'''

METRICS = '''
import torch


def block_influence(x, y):
    return {sign}(1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1))
'''


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/reference_shortgpt.py")


def standin(folder, sign=""):
    folder.mkdir()
    (folder / "shortgpt.py").write_text(STANDIN)
    (folder / "metrics.py").write_text(METRICS.format(sign=sign))
    return str(folder)


def windows():
    return torch.randint(3, VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))


def test_the_same_metric_removes_the_same_layers(bench, tiny_model_dir, tmp_path):
    cls = bench.import_shortgpt(standin(tmp_path / "sg"))
    result = bench.compare(cls, str(tiny_model_dir), windows(), ["float32"], [0.2, 0.5], 2)
    run = result["shortgpt_code"]["float32"]
    assert run["same_as_hgsp"] == {"0.2": True, "0.5": True}
    assert len(result["hgsp"]["removed"]["0.5"]) > len(result["hgsp"]["removed"]["0.2"]) >= 1
    assert result["float16_norm_product_overflow"] == [0.0] * 4  # small hidden states
    # the last layer's output is normed in hidden_states: hgsp scores it the same way
    assert run["block_influence"] == pytest.approx(result["hgsp"]["block_influence"], abs=1e-4)


def test_another_metric_is_reported_as_different(bench, tiny_model_dir, tmp_path):
    cls = bench.import_shortgpt(standin(tmp_path / "sg", sign="-"))  # highest BI first
    result = bench.compare(cls, str(tiny_model_dir), windows(), ["float32"], [0.2], 2)
    assert result["shortgpt_code"]["float32"]["same_as_hgsp"] == {"0.2": False}


def test_a_folder_without_the_code_is_refused(bench, tmp_path, capsys):
    assert bench.main(["--shortgpt_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no shortgpt.py" in err and "icip-cas/ShortGPT" in err


def test_each_distinct_choice_is_scored_once(bench, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "removal_perplexity",
                        lambda model, removed, windows: calls.append(removed) or
                        {"wikitext2": float(len(removed)), "ptb": 1.0})
    result = {"hgsp": {"removed": {"0.2": [1], "0.5": [1, 2]}},
              "shortgpt_code": {"float32": {"removed": {"0.2": [1], "0.5": [1, 2]}},
                                "float16": {"removed": {"0.2": [3], "0.5": [1, 2]}}}}
    rows = bench.evaluate_choices(result, "model", 8)
    assert calls == [[1], [1, 2], [3]]
    assert [r["removed"] for r in rows] == calls and rows[1]["wikitext2"] == 2.0


def test_removing_a_layer_changes_the_perplexity(bench, tiny_model_dir, data_dir, monkeypatch):
    monkeypatch.setenv("HGSP_DATA_DIR", str(data_dir))
    whole = bench.removal_perplexity(str(tiny_model_dir), [], 4)
    without = bench.removal_perplexity(str(tiny_model_dir), [1], 4)
    assert set(whole) == {"wikitext2", "ptb"}
    assert all(v > 1 for v in whole.values()) and without != whole


def test_float16_overflow_is_counted_per_layer(bench, tmp_path):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e4)  # hidden states of norm ~1e4 everywhere
        model.model.norm.weight.mul_(1e3)  # and after the final norm
    model.save_pretrained(tmp_path / "big")
    shares = bench.float16_overflow(str(tmp_path / "big"), windows(), 2)
    assert len(shares) == 4 and all(s == 1.0 for s in shares)
