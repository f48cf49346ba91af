"""Text corpora for calibration, analysis and evaluation, local first, then the Hub.

Every corpus is looked up in the local data directories (``--data_dir``, then the
``HGSP_DATA_DIR`` list, then ``<HGSP_HOME>/data`` where ``hgsp fetch-assets`` puts its files),
and only then on the Hugging Face Hub. Calibration always reads a *training* split so that it
never sees the text that perplexity is later measured on.

Local layout of a data directory::

    wikitext2/wiki.{train,valid,test}.raw   one paragraph a line (CRLF allowed)
    ptb/ptb.{train,valid,test}.txt          one sentence a line
    c4/c4_demo.jsonl                        JSON lines with a "text" field
    alpaca/alpaca_en_demo.json              Alpaca-format instructions (calibration only)

Offline, the 300 C4 demo documents are split in two disjoint parts: the first 200 are the
"train" split (calibration), the last 100 the "validation" split (evaluation).

``alpaca`` calibrates on instruction data, each record written as its Alpaca prompt followed by
its response: text closer to what an instruction-tuned model is used for than web pages. It has
only a training split, so it is never an evaluation corpus.

A mix such as ``c4+alpaca`` calibrates on an equal share of windows from each named corpus:
web text keeps the web-text perplexity, instruction text keeps what zero-shot questions need.
Like ``alpaca`` it calibrates only.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

log = logging.getLogger(__name__)

DATASETS = ("wikitext2", "ptb", "c4", "alpaca")
# A web corpus joined with instruction data; other mixes work through load_corpus alone.
MIXES = tuple(f"{d}+alpaca" for d in DATASETS if d != "alpaca")
CALIBRATION_DATASETS = DATASETS + MIXES  # what --dataset accepts
C4_DEMO_TRAIN_DOCS = 200  # documents [0, 200) calibrate, [200, 300) evaluate

_LOCAL_FILES = {
    ("wikitext2", "train"): "wikitext2/wiki.train.raw",
    ("wikitext2", "validation"): "wikitext2/wiki.valid.raw",
    ("wikitext2", "test"): "wikitext2/wiki.test.raw",
    ("ptb", "train"): "ptb/ptb.train.txt",
    ("ptb", "validation"): "ptb/ptb.valid.txt",
    ("ptb", "test"): "ptb/ptb.test.txt",
    ("c4", "train"): "c4/c4_demo.jsonl",
    ("c4", "validation"): "c4/c4_demo.jsonl",
}


@dataclass
class Corpus:
    """Documents of one split, and where they came from (recorded in the run log)."""

    name: str
    split: str
    documents: list[str]
    origin: str
    parts: tuple[Corpus, ...] = ()  # the corpora of a mix, each drawn from equally


def data_dirs(extra: str | os.PathLike | None = None) -> list[Path]:
    """The local data directories, in lookup order."""
    from .assets import assets_home  # late import: assets pulls in pip plumbing

    dirs = [Path(extra)] if extra else []
    env = os.environ.get("HGSP_DATA_DIR", "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs.append(assets_home() / "data")
    return [d.expanduser() for d in dirs]


def load_corpus(name: str, split: str, data_dir: str | None = None) -> Corpus:
    """Documents of ``name``/``split`` from a local directory, else from the Hub.

    Raises:
        UserError: unknown dataset, or the split is neither local nor reachable.
    """
    if "+" in name:
        return _mixed_corpus(name, split, data_dir)
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': use one of {', '.join(DATASETS)}")
    if name == "alpaca":
        return _alpaca_corpus(split, data_dir)
    if (name, split) not in _LOCAL_FILES:
        raise UserError(f"dataset '{name}' has no '{split}' split")
    path = _local_file(name, split, data_dir)
    if path is not None:
        docs = _read_local(name, split, path)
        log.info("%s/%s: %d documents from %s", name, split, len(docs), path)
        return Corpus(name, split, docs, f"{path}{_c4_range(name, split)}")
    return _load_from_hub(name, split, data_dir)


def _local_file(name: str, split: str, data_dir: str | None) -> Path | None:
    """The file of ``name``/``split`` in the first local data directory that has it."""
    rel = _LOCAL_FILES.get((name, split))
    return next((d / rel for d in data_dirs(data_dir) if rel and (d / rel).is_file()), None)


def corpus_source(name: str, split: str, data_dir: str | None = None) -> str:
    """Where :func:`load_corpus` would read ``name``/``split`` from, without reading it: the
    absolute local file, else the Hub (for evaluation-cache keys: one ``--data_dir`` string
    can name different folders, and a local file can appear after a Hub run)."""
    path = _local_file(name, split, data_dir)
    return str(path.resolve()) if path is not None else f"hub:{name}/{split}"


def _alpaca_corpus(split: str, data_dir: str | None) -> Corpus:
    """Alpaca records as documents: the prompt, then the response, as in fine-tuning."""
    from .alpaca import (DEFAULT_HUB_DATASET, LOCAL_DEMO, build_prompt, load_instructions,
                         local_demo)

    _calibrates_only("dataset 'alpaca'", "it", split)
    local = local_demo(data_dir)
    if local is None and hub_offline():
        raise UserError(f"dataset alpaca/train: {LOCAL_DEMO} is not in the local data "
                        f"directories ({', '.join(str(d) for d in data_dirs(data_dir))}) and the "
                        "Hub is offline; run `hgsp fetch-assets c4` to get it")
    # load_instructions logs how many records it read and from where.
    data = load_instructions(str(local) if local else DEFAULT_HUB_DATASET)
    docs = [build_prompt(r) + r["output"] for r in data.records]
    return Corpus("alpaca", split, docs, data.origin)


def _mixed_corpus(name: str, split: str, data_dir: str | None) -> Corpus:
    """A mix of distinct corpora (``c4+alpaca``): their documents, kept apart as ``parts``."""
    names = name.split("+")
    if len(set(names)) != len(names) or any(n not in DATASETS for n in names):
        raise UserError(f"unknown dataset mix '{name}': join distinct datasets of "
                        f"{', '.join(DATASETS)} with '+', e.g. c4+alpaca")
    _calibrates_only(f"dataset mix '{name}'", "a mix", split)
    parts = tuple(load_corpus(n, split, data_dir) for n in names)
    docs = [d for p in parts for d in p.documents]
    return Corpus(name, split, docs, " + ".join(p.origin for p in parts), parts)


def _calibrates_only(what: str, subject: str, split: str) -> None:
    """Corpora without an evaluation split (alpaca, mixes) accept only ``train``."""
    if split != "train":
        raise UserError(f"{what} has no '{split}' split: {subject} calibrates only; measure "
                        "perplexity on wikitext2, ptb, ptb_val or c4")


def _c4_range(name: str, split: str) -> str:
    if name != "c4":
        return ""
    return f" [documents 0-{C4_DEMO_TRAIN_DOCS - 1}]" if split == "train" else \
        f" [documents {C4_DEMO_TRAIN_DOCS}-end]"


def _read_local(name: str, split: str, path: Path) -> list[str]:
    if name == "c4":
        with path.open(encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f if line.strip()]
        return docs[:C4_DEMO_TRAIN_DOCS] if split == "train" else docs[C4_DEMO_TRAIN_DOCS:]
    # newline="" keeps the CRLF of wiki.test.raw visible so that it can be stripped.
    with path.open(encoding="utf-8", newline="") as f:
        lines = [line.rstrip("\r\n") for line in f]
    return [line for line in lines if line.strip()]


_HUB = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence"),
    "c4": ("allenai/c4", "en", "text"),
}
_C4_HUB_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
# Documents kept from each C4 shard (of about 356k / 45k): the corpus is tokenized in one call,
# and a whole shard would take tens of GB for the few hundred windows a run uses. 3,000
# training documents give about 1.4M tokens (700 windows of 2,048); the validation cut is
# GPTQ's, the first 1,100 documents.
C4_HUB_DOCS = {"train": 3000, "validation": 1100}


def hub_offline() -> bool:
    """True when the user has switched the Hugging Face Hub off (``HF_HUB_OFFLINE`` and co)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_from_hub(name: str, split: str, data_dir: str | None) -> Corpus:
    looked = ", ".join(str(d) for d in data_dirs(data_dir))
    hint = _offline_hint(name, split)
    if hub_offline():
        raise UserError(f"dataset {name}/{split} is not in the local data directories "
                        f"({looked}) and the Hub is offline{hint}")
    try:
        import datasets  # optional: pip install 'hgsp[hub]'
    except ImportError:
        raise UserError(f"dataset {name}/{split} is not local ({looked}); loading it from the "
                        f"Hub needs `pip install datasets`{hint}") from None
    repo, subset, field = _HUB[name]
    try:
        if name == "c4":
            ds = datasets.load_dataset(repo, data_files={split: _C4_HUB_FILES[split]}, split=split)
        else:
            ds = datasets.load_dataset(repo, subset, split=split)
    except Exception as exc:  # noqa: BLE001 - network and hub errors vary widely
        raise UserError(f"cannot load dataset {name}/{split} from the Hub ({exc}) and it is not "
                        f"in the local data directories ({looked}){hint}") from None
    if name == "c4":
        ds = ds.select(range(min(len(ds), C4_HUB_DOCS[split])))
    docs = [t for t in ds[field] if t.strip()]
    return Corpus(name, split, docs, f"hub:{repo}/{subset}/{split}")


def _offline_hint(name: str, split: str) -> str:
    if split == "train" and name in ("wikitext2", "ptb"):
        return ("; its test split must not be used for calibration (it is the evaluation "
                "text): use --dataset c4 after `hgsp fetch-assets`")
    if name == "c4":
        return "; run `hgsp fetch-assets` to get the C4 sample"
    return ""


def tokenize_windows(tokenizer, corpus: Corpus, seq_len: int) -> torch.Tensor:
    """Join the documents with blank lines, tokenize once, cut ``seq_len`` windows.

    Returns a ``(n_windows, seq_len)`` tensor of token ids; the tail shorter than a window is
    dropped so every window is full (no padding inside calibration batches).
    """
    text = "\n\n".join(corpus.documents)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len)


@dataclass
class CalibrationSet:
    """Token windows for importance (``calibration``) and removal analysis (``analysis``).

    The two are disjoint windows of the same training corpus; ``*_windows`` record which.
    """

    calibration: torch.Tensor
    analysis: torch.Tensor
    calibration_windows: list[int]
    analysis_windows: list[int]
    origin: str


def build_calibration_set(tokenizer, corpus: Corpus, num_samples: int, seq_len: int,
                          analysis_samples: int, seed: int) -> CalibrationSet:
    """Pick disjoint random windows for calibration and analysis, reproducibly from ``seed``.

    A mix draws an equal share from each of its corpora (the first ones take the remainder),
    so that a small corpus is not drowned by a large one. Window indices count the windows of
    the parts one after the other.
    """
    parts = corpus.parts or (corpus,)
    generator = torch.Generator().manual_seed(seed)
    windows, cal, ana, offset = [], [], [], 0
    for i, part in enumerate(parts):
        part_windows = tokenize_windows(tokenizer, part, seq_len)
        n_cal, n_ana = _share(num_samples, len(parts), i), _share(analysis_samples, len(parts), i)
        needed = n_cal + n_ana
        if part_windows.shape[0] < needed:
            raise UserError(
                f"{part.name}/{part.split} gives {part_windows.shape[0]} windows of {seq_len} "
                f"tokens, but {_needed_text(num_samples, analysis_samples, len(parts))} = "
                f"{needed} are needed: lower them or --seq_len")
        order = torch.randperm(part_windows.shape[0], generator=generator) + offset
        cal.append(order[:n_cal].tolist())
        ana.append(order[n_cal:needed].tolist())
        windows.append(part_windows)
        offset += part_windows.shape[0]
    everything = torch.cat(windows)
    cal, ana = _interleave(cal), _interleave(ana)
    return CalibrationSet(everything[cal], everything[ana], cal, ana, corpus.origin)


def _share(total: int, parts: int, index: int) -> int:
    return total // parts + (index < total % parts)


def _needed_text(num_samples: int, analysis_samples: int, parts: int) -> str:
    text = f"--num_examples {num_samples} + --analysis_samples {analysis_samples}"
    return text if parts == 1 else f"its share of {text}"


def _interleave(lists: list[list[int]]) -> list[int]:
    """Round-robin over the parts, so that every gradient batch of a mix holds each corpus."""
    longest = max((len(x) for x in lists), default=0)
    return [x[i] for i in range(longest) for x in lists if i < len(x)]


def batches(windows: torch.Tensor, batch_size: int):
    """Yield ``(input_ids, attention_mask, labels)`` batches of full windows."""
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        yield ids, torch.ones_like(ids), ids.clone()
