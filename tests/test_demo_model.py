"""Integration test on the real demo model (SmolLM2-135M-Instruct, fetched by
``hgsp fetch-assets``): prune it with small sample counts, then load the result in a separate
process with nothing but transformers and generate text."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hgsp.assets import asset_paths
from hgsp.cli import main

pytestmark = pytest.mark.slow

DEMO = asset_paths()["model"]
C4 = asset_paths()["c4"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    if not (DEMO / "config.json").is_file() or not C4.is_file():
        pytest.skip("demo model not fetched: run `hgsp fetch-assets` (make test does)")
    results = tmp_path_factory.mktemp("results")
    code = main(["prune", "--base_model", str(DEMO), "--output_name", "demo",
                 "--pruning_ratio", "0.2", "--dataset", "c4", "--num_examples", "4",
                 "--seq_len", "64", "--analysis_samples", "2", "--results_dir", str(results)])
    assert code == 0
    return results / "demo"


def test_ratio_within_half_a_percent(demo_run):
    p = json.loads((demo_run / "summary.json").read_text())["parameters"]
    assert p["base_total"] == 134_515_008
    assert abs(p["achieved_ratio_total"] - 0.2) < 0.005


def test_loads_with_plain_transformers_and_generates(demo_run):
    code = f"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path = {str(demo_run / "models")!r}
tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
ids = tok("The capital of France is", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=12, do_sample=False)
text = tok.decode(out[0][ids.input_ids.shape[1]:], skip_special_tokens=True)
print(json.dumps({{"text": text, "hgsp_imported": "hgsp" in sys.modules,
                   "params": sum(p.numel() for p in model.parameters())}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=demo_run.parent, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["hgsp_imported"]
    assert len(result["text"].strip()) > 0
    summary = json.loads((demo_run / "summary.json").read_text())
    assert result["params"] == summary["parameters"]["pruned_total"]
