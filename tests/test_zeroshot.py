"""Zero-shot evaluation through lm-evaluation-harness (DESIGN.md §8-9), offline and small.

A tiny data root in the layout of the ``zeroshot`` asset (``hf_datasets`` save_to_disk folders
and OLMES ``requests.jsonl.gz`` files) is written in a temporary folder, so the tests need
neither the 85 MB asset nor the Hub. lm-eval runs for real on the tiny random models.
"""

from __future__ import annotations

import gzip
import json
import math
import random

import pytest

pytest.importorskip("lm_eval")
datasets = pytest.importorskip("datasets")

from conftest import WORDS, tiny_model, tiny_tokenizer  # noqa: E402
from hgsp import zeroshot  # noqa: E402
from hgsp.adapters import adapter_for  # noqa: E402
from hgsp.errors import UserError  # noqa: E402
from hgsp.paired import paired_zeroshot  # noqa: E402
from hgsp.plan import uniform_plan  # noqa: E402
from hgsp.surgery import apply_plan  # noqa: E402

ROWS = 4  # documents per task in the tiny data root


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _save(root, rel: str, rows: list[dict], features=None) -> None:
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(root / rel))


def _write_requests(root, rel: str, docs: list[dict], context) -> None:
    """An OLMES request file: one request per answer, in shuffled order, plus the
    unconditional requests (``doc_id >= 1000000``) that the loader must skip."""
    lines = []
    for doc_id, doc in enumerate(docs):
        for i, choice in enumerate(doc["choices"]):
            lines.append({"request_type": "loglikelihood", "doc": doc, "idx": i,
                          "request": {"context": context(doc), "continuation": " " + choice},
                          "task_name": rel.split("/")[1], "doc_id": doc_id,
                          "native_id": doc.get("id", doc_id), "label": doc["gold"]})
            lines.append({"request_type": "loglikelihood",
                          "doc": {**doc, "query": "Answer:"}, "idx": i,
                          "request": {"context": "Answer:", "continuation": " " + choice},
                          "task_name": rel.split("/")[1], "doc_id": 1_000_000 + doc_id,
                          "native_id": doc.get("id", doc_id), "label": doc["gold"]})
    random.Random(0).shuffle(lines)
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def write_zeroshot_root(root, rows: int = ROWS, seed: int = 0):
    """Every task of :data:`hgsp.zeroshot.TASKS`, ``rows`` documents each."""
    rng = random.Random(seed)
    _save(root, "hf_datasets/piqa/plain_text/validation",
          [{"goal": _words(rng, 4, 8).capitalize() + "?", "sol1": _words(rng, 3, 8),
            "sol2": _words(rng, 3, 8), "label": i % 2} for i in range(rows)],
          datasets.Features({"goal": datasets.Value("string"), "sol1": datasets.Value("string"),
                             "sol2": datasets.Value("string"),
                             "label": datasets.ClassLabel(names=["0", "1"])}))
    _save(root, "hf_datasets/hellaswag/none/validation",
          [{"ind": i, "activity_label": _words(rng, 1, 2).title(), "ctx_a": _words(rng, 5, 9),
            "ctx_b": _words(rng, 1, 3), "ctx": "", "endings": [_words(rng, 3, 6)
                                                             for _ in range(4)],
            "source_id": f"src~{i}", "split": "val", "split_type": "indomain",
            "label": str(i % 4)} for i in range(rows)])
    _save(root, "hf_datasets/winogrande/winogrande_xl/validation",
          [{"sentence": f"{_words(rng, 3, 6).capitalize()} _ {_words(rng, 3, 6)}.",
            "option1": rng.choice(WORDS), "option2": rng.choice(WORDS),
            "answer": str(1 + i % 2)} for i in range(rows)])

    def mc_docs(prefix: str, n_choices: int) -> list[dict]:
        docs = []
        for i in range(rows):
            question = _words(rng, 5, 10).capitalize() + "?"
            docs.append({"id": f"{prefix}_{i}", "query": f"Question: {question}\nAnswer:",
                         "choices": [_words(rng, 1, 4) for _ in range(n_choices)],
                         "gold": i % n_choices})
        return docs

    for task, n_choices in (("arc_easy", 4), ("arc_challenge", 3), ("openbookqa", 4)):
        _write_requests(root, f"oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz",
                        mc_docs(task, n_choices), lambda d: "Question: x\nAnswer: y\n\n"
                        + d["query"])
    boolq = [{"idx": i, "query": f"{_words(rng, 1, 3).title()} -- {_words(rng, 12, 20)}."
                                 f"\nQuestion: {_words(rng, 4, 7)}?\nAnswer:",
              "choices": ["yes", "no"], "gold": i % 2} for i in range(rows)]
    _write_requests(root, "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", boolq,
                    lambda d: d["query"])
    return root


@pytest.fixture(scope="module")
def zs_root(tmp_path_factory):
    return write_zeroshot_root(tmp_path_factory.mktemp("zeroshot"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def check_result(result: dict, tasks: list[str], n: int, limit) -> None:
    assert list(result["tasks"]) == tasks
    for name, row in result["tasks"].items():
        assert 0.0 <= row["acc"] <= 1.0, name
        assert row["n"] == n, name
        if name in ("boolq", "winogrande"):  # lm-eval scores these with acc only
            assert row["acc_norm"] is None
        else:
            assert 0.0 <= row["acc_norm"] <= 1.0, name
    accs = [r["acc"] for r in result["tasks"].values()]
    norms = [r["acc"] if r["acc_norm"] is None else r["acc_norm"]
             for r in result["tasks"].values()]
    assert math.isclose(result["mean_acc"], sum(accs) / len(accs))
    assert math.isclose(result["mean_acc_norm"], sum(norms) / len(norms))
    assert result["limit"] == limit and result["num_fewshot"] == 0
    assert result["lm_eval_version"].startswith("0.4.")
    assert set(result["data"]) == set(tasks)
    assert all(f"{n} of" in d for d in result["data"].values())
    # Per-document outcomes (for paired comparisons) agree with lm-eval's aggregates.
    assert list(result["documents"]) == tasks
    for name, row in result["tasks"].items():
        docs = result["documents"][name]
        assert len(docs["acc"]) == n and set(docs["acc"]) <= {"0", "1"}
        assert docs["acc"].count("1") / n == pytest.approx(row["acc"]), name
        if row["acc_norm"] is None:
            assert docs["acc_norm"] is None
        else:
            assert docs["acc_norm"].count("1") / n == pytest.approx(row["acc_norm"]), name


# --------------------------------------------------------------------------- task names

def test_resolve_tasks_suites_and_names():
    assert zeroshot.resolve_tasks("default") == ["piqa", "hellaswag", "winogrande", "arc_easy"]
    assert zeroshot.resolve_tasks("llm_pruner") == ["boolq", "piqa", "hellaswag", "winogrande",
                                                   "arc_easy", "arc_challenge", "openbookqa"]
    assert zeroshot.resolve_tasks("slicegpt") == ["piqa", "winogrande", "hellaswag",
                                                 "arc_easy", "arc_challenge"]
    assert zeroshot.resolve_tasks(" boolq, default ,piqa,") == [
        "boolq", "piqa", "hellaswag", "winogrande", "arc_easy"]


@pytest.mark.parametrize("spec", ["piqa,mmlu", "", " , "])
def test_resolve_tasks_unknown_is_a_user_error(spec):
    with pytest.raises(UserError) as err:
        zeroshot.resolve_tasks(spec)
    message = str(err.value)
    assert "\n" not in message
    assert "arc_challenge" in message and "llm_pruner" in message


def test_run_zeroshot_unknown_task(tok, zs_root):
    with pytest.raises(UserError, match="unknown zero-shot task 'mmlu'"):
        zeroshot.run_zeroshot(object(), tok, ["mmlu"], data_root=zs_root)


# --------------------------------------------------------------------------- local data

def test_local_splits_are_rebuilt_in_lm_eval_schema(zs_root):
    arc = zeroshot.load_local_split("arc_challenge", zs_root)
    assert len(arc) == ROWS and arc[0]["id"] == "arc_challenge_0"  # doc_id order, deduplicated
    assert arc[1]["choices"]["label"] == ["A", "B", "C"] and arc[1]["answerKey"] == "B"
    assert not arc[0]["question"].startswith("Question:")
    obqa = zeroshot.load_local_split("openbookqa", zs_root, limit=2)
    assert len(obqa) == 2 and "question_stem" in obqa.features
    boolq = zeroshot.load_local_split("boolq", zs_root)
    assert " -- " in boolq[0]["passage"] and not boolq[0]["question"].endswith("?")
    assert [r["label"] for r in boolq] == [1, 0, 1, 0]  # gold 0 = "yes" = SuperGLUE True


def test_data_roots_are_searched_in_order(zs_root, tmp_path):
    found = zeroshot.find_local("piqa", [tmp_path, zs_root])
    assert found == zs_root / zeroshot.TASKS["piqa"].local
    assert zeroshot.find_local("piqa", tmp_path) is None


def test_lm_eval_prompts_reproduce_the_source_queries(zs_root):
    """lm-eval's own doc_to_text/choice/target on the rebuilt rows give back the request
    files' queries and gold answers: the rows went in intact."""
    tasks, _, _ = zeroshot.build_tasks(["arc_easy", "boolq", "piqa"], data_root=zs_root)
    for name in ("arc_easy", "boolq"):
        task = tasks[name]
        with gzip.open(zs_root / zeroshot.TASKS[name].local, "rt") as f:
            source = {r["doc_id"]: r["doc"] for r in map(json.loads, f) if r["doc_id"] < 10**6}
        docs = list(task.eval_docs)
        assert len(docs) == ROWS
        for doc_id, doc in enumerate(docs):
            want = source[doc_id]
            assert task.doc_to_text(doc) == want["query"]
            choices = task.doc_to_choice(doc)
            assert choices[task.doc_to_target(doc)] == want["choices"][want["gold"]]
    piqa = tasks["piqa"]
    assert piqa.doc_to_text(piqa.eval_docs[0]).startswith("Question: ")


def test_missing_data_offline_is_a_user_error(tok, tmp_path):
    with pytest.raises(UserError) as err:
        zeroshot.run_zeroshot(object(), tok, ["piqa"], data_root=tmp_path)
    assert str(err.value) == (f"zero-shot data for piqa not found in {tmp_path}: "
                              "run `hgsp fetch-assets zeroshot`")


def test_check_task_data(zs_root, tmp_path):
    found = zeroshot.check_task_data(zeroshot.resolve_tasks("llm_pruner"), zs_root)
    assert found["arc_easy"] == str(zs_root / zeroshot.TASKS["arc_easy"].local)
    with pytest.raises(UserError, match="zero-shot data for boolq not found in"):
        zeroshot.check_task_data(["boolq"], tmp_path)
    with pytest.raises(UserError, match="unknown zero-shot task 'mmlu'"):
        zeroshot.check_task_data(["mmlu"], zs_root)


def test_unreadable_data_is_a_user_error(tmp_path):
    path = tmp_path / zeroshot.TASKS["arc_easy"].local
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"doc_id": 0, "doc": {"id": "a", "query": "no prefix",
                                                 "choices": ["x"], "gold": 0}}) + "\n")
    with pytest.raises(UserError, match="arc_easy .* unreadable"):
        zeroshot.load_local_split("arc_easy", tmp_path)


# --------------------------------------------------------------------------- real runs

def test_default_tasks_run_through_lm_eval(tok, zs_root):
    model = tiny_model("llama", vocab_size=len(tok))
    tasks = zeroshot.resolve_tasks("default")
    result = zeroshot.run_zeroshot(model, tok, tasks, batch_size=4, data_root=zs_root)
    check_result(result, tasks, n=ROWS, limit=None)
    assert not model.training


def test_pruned_model_with_removed_layer_runs(tok, zs_root):
    base = tiny_model("llama", vocab_size=len(tok))
    cfg = base.config
    plan = uniform_plan(cfg.model_type, cfg.num_hidden_layers, cfg.num_key_value_heads,
                        cfg.intermediate_size)
    plan.layers[1].kept_kv_heads = []  # layer 1 removed entirely
    plan.layers[1].kept_channels = []
    plan.layers[2].kept_channels = plan.layers[2].kept_channels[::3]  # narrower MLP
    plan.layers[3].kept_kv_heads = [1]  # one KV group fewer
    pruned = apply_plan(base, adapter_for(cfg), plan)
    assert pruned.config.num_hidden_layers == cfg.num_hidden_layers - 1
    tasks = zeroshot.resolve_tasks("llm_pruner")
    result = zeroshot.run_zeroshot(pruned, tok, tasks, limit=2, batch_size=8,
                                   data_root=zs_root)
    check_result(result, tasks, n=2, limit=2)
    # Paired against the base model on the same documents: the per-task differences are
    # the differences of lm-eval's accuracies.
    before = zeroshot.run_zeroshot(base, tok, tasks, limit=2, batch_size=8, data_root=zs_root)
    paired = paired_zeroshot(result, before)
    assert [r["task"] for r in paired["tasks"]] == tasks
    for row in paired["tasks"]:
        expected = result["tasks"][row["task"]]["acc"] - before["tasks"][row["task"]]["acc"]
        assert row["diff"] == pytest.approx(expected)
    assert paired["mean"]["diff"] == pytest.approx(result["mean_acc"] - before["mean_acc"])
    with pytest.raises(UserError, match="scored 2 and 4 documents"):
        paired_zeroshot(result, zeroshot.run_zeroshot(base, tok, ["boolq"], batch_size=8,
                                                      data_root=zs_root))
