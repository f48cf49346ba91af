"""benchmarks/reference_llm_pruner.py: driving LLM-Pruner's MetaPruner and comparing with hgsp.

The authors' code is not in the repository; the tests write a stand-in with the parts of its
interface the script relies on: ``MetaPruner(model, example_inputs, **kwargs)`` whose
``step(interactive=True)`` yields groups of ``(dependency, indices)`` that ``prune()`` slices,
``TaylorImportance`` and ``hf_rmsnorm_pruner``.
"""

import copy
import json

import pytest
import torch
from conftest import VOCAB, load_script, make_plan

# The stand-in removes, in each root's layer, the lowest-scoring KV groups (|w·g| of k_proj)
# and MLP channels (of gate_proj), as many as MetaPruner's count for the root's share; the
# query heads it removes with a KV group are those sharing it, or with POSITIONAL those at its
# position modulo the KV-head count.
PRUNER = '''
import torch

POSITIONAL = {positional}
ROWS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")


class Dep:
    def __init__(self, module):
        self.target = type("Target", (), {{"module": module}})()


class Group(list):
    def prune(self):
        for dep, idxs in self:
            m, gone = dep.target.module, set(idxs)
            rows = m.kind in ROWS
            keep = [i for i in range(m.weight.shape[0 if rows else 1]) if i not in gone]
            w = m.weight.data[keep] if rows else m.weight.data[:, keep]
            m.weight = torch.nn.Parameter(w)
            if rows:
                m.out_features = len(keep)
            else:
                m.in_features = len(keep)


class MetaPruner:
    def __init__(self, model, example_inputs, importance, ch_sparsity_dict, consecutive_groups,
                 root_instances, customized_pruners, **kwargs):
        model(**example_inputs)  # the tracing forward
        assert not kwargs["global_pruning"] and kwargs["iterative_steps"] == 1
        self.model, self.ratios = model, ch_sparsity_dict
        self.roots, self.width = root_instances, consecutive_groups
        for layer in model.model.layers:
            for block in (layer.self_attn, layer.mlp):
                for name, m in block.named_children():
                    m.kind = name

    def step(self, interactive=False):
        for layer in self.model.model.layers:
            for root in (layer.self_attn.k_proj, layer.mlp.gate_proj):
                if root in self.roots:
                    yield self.group(layer, root)

    def group(self, layer, root):
        n = root.out_features - int(root.out_features * (1 - self.ratios[root]))
        score = (root.weight * root.weight.grad).abs().sum(1)
        if root.kind == "gate_proj":
            idxs = score.argsort()[:n].tolist()
            return Group((Dep(m), idxs) for m in (root, layer.mlp.up_proj, layer.mlp.down_proj))
        hd = self.width[root]
        kv = score.view(-1, hd).sum(1)
        n_kv, rep = kv.numel(), layer.self_attn.q_proj.out_features // root.out_features
        groups = kv.argsort()[:n // hd].tolist()
        heads = [g + n_kv * j if POSITIONAL else g * rep + j for g in groups for j in range(rep)]
        k_rows = [g * hd + i for g in groups for i in range(hd)]
        q_rows = [h * hd + i for h in heads for i in range(hd)]
        a = layer.self_attn
        return Group([(Dep(a.k_proj), k_rows), (Dep(a.v_proj), k_rows), (Dep(a.q_proj), q_rows),
                      (Dep(a.o_proj), q_rows)])
'''


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/reference_llm_pruner.py")


def standin(folder, positional=False):
    tp = folder / "LLMPruner" / "torch_pruning"
    (tp / "pruner").mkdir(parents=True)
    (folder / "LLMPruner" / "__init__.py").write_text("")
    (tp / "__init__.py").write_text("from . import pruner\n")
    (tp / "pruner" / "__init__.py").write_text(PRUNER.format(positional=positional))
    (folder / "LLMPruner" / "pruner").mkdir()
    (folder / "LLMPruner" / "pruner" / "__init__.py").write_text("")
    (folder / "LLMPruner" / "pruner" / "hf_llama_pruner.py").write_text(
        "class TaylorImportance:\n"
        "    def __init__(self, group_reduction, taylor):\n"
        "        assert (group_reduction, taylor) == ('sum', 'param_first')\n"
        "hf_rmsnorm_pruner = object()\n")
    return folder


def llm_pruner_run(folder, drops, method="llm_pruner"):
    plan = make_plan("llama", drops)
    plan.meta = {"method": method, "pruning_ratio": 0.2}
    (folder / "analysis").mkdir(parents=True)
    plan.save(folder / "analysis" / "pruning_plan.json")
    return folder


def windows():
    return torch.randint(3, VOCAB, (4, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("total", [24, 64, 192, 1536, 11008])
def test_share_gives_metapruners_count_exactly(bench, total):
    for count in range(total + 1):
        r = bench.share(total, count)
        assert total - int(total * (1 - r)) == count


@pytest.mark.parametrize("positional", [False, True])
def test_check_run_compares_choices_and_rebuilds_its_tensors(bench, tiny_model_dir, tmp_path,
                                                             positional):
    tp, lp = bench.import_llm_pruner(str(standin(tmp_path / "clone", positional)))
    # layers 1 and 2 pruned (one of two KV groups, 5 of 24 channels), as LLM-Pruner's range
    run = llm_pruner_run(tmp_path / "run", {1: ([0], range(5)), 2: ([1], range(19, 24))})
    record, pruned, ctx = bench.check_run(tp, lp, str(tiny_model_dir), windows(), run)
    assert ctx["plan"].layers[1].kept_kv_heads == [1]
    assert record["pruned_layers"] == 2 and [r["layer"] for r in record["layers"]] == [1, 2]
    assert all(r["channels_removed"] == [5, 5] for r in record["layers"])
    assert all(len(r["llm_pruner_kv_groups"]) == 1 for r in record["layers"])
    assert record["parameters"]["llm_pruner"] == record["parameters"]["hgsp_run"]
    # the stand-in's positional slicing is not a KV group's query heads; hgsp's surgery of the
    # choice (query heads sharing the KV head) then differs from the stand-in's tensors
    assert record["query_heads_share_the_kv_head"] == (0 if positional else 2)
    assert record["layers_losing_kv_groups"] == 2
    assert record["hgsp_surgery_of_its_choice_is_identical"] is (not positional)
    assert [r["hgsp_kv_groups"] for r in record["layers"]] == [[0], [1]]
    # the stand-in removes the lowest |w·g| groups and channels of the run's counts
    its = [r["llm_pruner_kv_groups"] for r in record["layers"]]
    assert its == [expected_groups(ctx["base"], i) for i in (1, 2)]
    same = sum(g == [[0], [1]][k] for k, g in enumerate(its))
    assert record["same_kv_groups"] == same
    assert record["kv_group_scoring"] == "shared"  # a run without logs/config.json
    assert record["same_units_in_every_layer"] is False  # channels 0-4 / 19-23 are not its
    assert record["hgsp_run_is_identical"] is False


def expected_groups(base, layer: int) -> list[int]:
    """The KV group the stand-in removes in ``layer``: the lowest |w·g| of k_proj rows, from
    the gradients of the same windows on the unpruned model."""
    model = copy.deepcopy(base)
    ids = windows()
    model(input_ids=ids, labels=ids).loss.backward()
    k = model.model.layers[layer].self_attn.k_proj
    return [int((k.weight * k.weight.grad).abs().sum(1).view(2, -1).sum(1).argmin())]


def test_a_run_that_removes_its_choice_is_reported_as_such(bench, tiny_model_dir, tmp_path):
    tp, lp = bench.import_llm_pruner(str(standin(tmp_path / "clone")))
    drops = {1: ([0], range(5)), 2: ([1], range(19, 24))}
    _, _, ctx = bench.check_run(tp, lp, str(tiny_model_dir), windows(),
                                llm_pruner_run(tmp_path / "first", drops))
    # a run whose plan is the stand-in's own choice, as a --kv_group_scoring positional run's
    # is LLM-Pruner's
    run = tmp_path / "second"
    (run / "analysis").mkdir(parents=True)
    ctx["its_plan"].save(run / "analysis" / "pruning_plan.json")
    (run / "logs").mkdir()
    (run / "logs" / "config.json").write_text('{"arguments": {"kv_group_scoring": "positional"}}')
    again, _, _ = bench.check_run(tp, lp, str(tiny_model_dir), windows(), run)
    assert again["kv_group_scoring"] == "positional"
    assert again["same_units_in_every_layer"] and again["same_kv_groups"] == 2
    assert again["hgsp_run_is_identical"] is True


def test_a_run_of_another_method_is_refused(bench, tiny_model_dir, tmp_path, capsys):
    clone = standin(tmp_path / "clone")
    run = llm_pruner_run(tmp_path / "run", {1: ([0], [])}, method="hgsp")
    code = bench.main(["--llm_pruner_dir", str(clone), "--run", str(run),
                       "--model", str(tiny_model_dir), "--out", str(tmp_path / "out.json")])
    assert code == 2 and "--method llm_pruner" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_a_folder_without_its_code_is_refused(bench, tmp_path, capsys):
    code = bench.main(["--llm_pruner_dir", str(tmp_path), "--run", str(tmp_path),
                       "--out", str(tmp_path / "out.json")])
    assert code == 2 and "horseee/LLM-Pruner" in capsys.readouterr().err


def test_main_writes_the_comparison_and_perplexities(bench, tiny_model_dir, data_dir, tmp_path,
                                                     monkeypatch):
    monkeypatch.setenv("HGSP_DATA_DIR", str(data_dir))
    calibration = tmp_path / "calibration.pt"
    torch.save({"calibration": windows()}, calibration)
    clone = standin(tmp_path / "clone")
    tp, lp = bench.import_llm_pruner(str(clone))
    _, _, ctx = bench.check_run(tp, lp, str(tiny_model_dir), windows(),
                                llm_pruner_run(tmp_path / "first", {1: ([0], range(3))}))
    run = tmp_path / "run"  # a run whose plan is the stand-in's own choice
    (run / "analysis").mkdir(parents=True)
    ctx["its_plan"].save(run / "analysis" / "pruning_plan.json")
    out = tmp_path / "out.json"
    assert bench.main(["--llm_pruner_dir", str(clone), "--run", str(run),
                       "--model", str(tiny_model_dir), "--calibration", str(calibration),
                       "--evaluate", "--ppl_max_windows", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["windows"] == [4, 8] and result["ppl_max_windows"] == 2
    assert result["llm_pruner_commit"] == "not a git checkout"
    (record,) = result["runs"]
    assert record["hgsp_run_is_identical"] is True
    ppl = record["perplexity"]
    assert all(v > 1 for side in ppl.values() for v in side.values())
    assert ppl["llm_pruner"] == ppl["hgsp_run"]  # the same model: the same perplexity
