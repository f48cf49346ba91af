"""Alpaca-format instruction data for recovery fine-tuning: loading, prompts, loss masks.

A record has an ``instruction``, an optional ``input`` and an ``output``. The prompt is the
Stanford Alpaca template; the model learns only the response: every prompt token has the
label ``-100``, so the loss (and its gradient) comes from the response and the end-of-text
token alone.

Where the data comes from (``--finetune_data_path``):

- a local JSON file (a list of records) or JSON-lines file (one record a line);
- a Hugging Face Hub dataset id (its ``train`` split), e.g. ``yahma/alpaca-cleaned``;
- nothing: ``alpaca/alpaca_en_demo.json`` in the local data directories (``--data_dir``,
  ``HGSP_DATA_DIR``, ``$HGSP_HOME/data``, where ``hgsp fetch-assets`` puts the 999-record
  sample from the ``llamafactory==0.9.5`` source archive), else the Hub's
  ``yahma/alpaca-cleaned``.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import hub_offline
from .errors import UserError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
DEFAULT_HUB_DATASET = "yahma/alpaca-cleaned"
LOCAL_DEMO = "alpaca/alpaca_en_demo.json"

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class InstructionSet:
    """Validated records and where they came from."""

    records: list[dict]
    origin: str


@dataclass
class FinetuneData:
    """The training and held-out validation records, disjoint, chosen with a fixed seed.

    Attributes:
        train: records to train on.
        val: held-out records for the validation loss (may be empty).
        origin: file path or ``hub:ID`` the records came from.
        train_indices: positions of ``train`` in the source (recorded in the training log).
        val_indices: positions of ``val`` in the source.
        available: records in the source.
    """

    train: list[dict]
    val: list[dict]
    origin: str
    train_indices: list[int] = field(default_factory=list)
    val_indices: list[int] = field(default_factory=list)
    available: int = 0


def build_prompt(record: dict) -> str:
    """The Alpaca prompt of a record, ending right before the response."""
    text_input = (record.get("input") or "").strip()
    if text_input:
        return PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=text_input)
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def load_instructions(spec: str | None, data_dir: str | None = None) -> InstructionSet:
    """Records from a file, a Hub dataset, or (``spec=None``) the local demo set, else the Hub.

    Raises:
        UserError: the file is missing or malformed, or the Hub dataset cannot be loaded.
    """
    if spec is None:
        local = local_demo(data_dir)
        if local is not None:
            return load_instructions(str(local))
        log.info("no local %s: using the Hub dataset %s", LOCAL_DEMO, DEFAULT_HUB_DATASET)
        return _from_hub(DEFAULT_HUB_DATASET, hint="; run `hgsp fetch-assets c4` for the "
                         "offline Alpaca sample or pass --finetune_data_path FILE")
    path = Path(spec).expanduser()
    if path.is_file():
        records = validate_records(read_records(path), str(path))
        log.info("instruction data: %d records from %s", len(records), path)
        return InstructionSet(records, str(path))
    if path.exists() or _looks_like_path(spec):
        raise UserError(f"fine-tuning data file '{spec}' does not exist (or is not a file): "
                        "pass an Alpaca-format .json/.jsonl file or a Hub dataset id")
    return _from_hub(spec)


def local_demo(data_dir: str | None = None) -> Path | None:
    """The Alpaca sample in the first local data directory that has it, else None."""
    from .data import data_dirs

    return next((d / LOCAL_DEMO for d in data_dirs(data_dir) if (d / LOCAL_DEMO).is_file()), None)


def _looks_like_path(spec: str) -> bool:
    """A Hub id is ``name`` or ``org/name``; anything else is meant as a local file."""
    return spec.endswith((".json", ".jsonl")) or spec.startswith((".", "~", os.sep)) or \
        spec.count("/") > 1


def read_records(path: Path) -> list:
    """A JSON list, or JSON lines; raises a UserError naming the file and the bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read fine-tuning data '{path}': {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = _json_lines(path, text)
    if isinstance(data, dict):  # one record: a JSON-lines file of a single line
        data = [data]
    if not isinstance(data, list):
        raise UserError(f"fine-tuning data '{path}' must be a JSON list of records or JSON "
                        "lines (one record a line)")
    return data


def _json_lines(path: Path, text: str) -> list:
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"fine-tuning data '{path}' is neither JSON nor JSON lines: line "
                            f"{number}: {exc.msg}") from None
    return records


def validate_records(records: list, origin: str) -> list[dict]:
    """Check every record has string ``instruction`` and ``output`` (``input`` optional)."""
    if not records:
        raise UserError(f"fine-tuning data '{origin}' holds no records")
    clean = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"fine-tuning data '{origin}': record {i} is not an object with "
                            "instruction/input/output")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise UserError(f"fine-tuning data '{origin}': record {i} has no text field "
                                f"'{key}' (Alpaca format: instruction, input, output)")
        if rec.get("input") is not None and not isinstance(rec["input"], str):
            raise UserError(f"fine-tuning data '{origin}': record {i} has a non-text 'input'")
        clean.append({"instruction": rec["instruction"], "input": rec.get("input") or "",
                      "output": rec["output"]})
    return clean


def _from_hub(dataset_id: str, hint: str = "") -> InstructionSet:
    if hub_offline():
        raise UserError(f"fine-tuning data '{dataset_id}' is not a local file and the Hub is "
                        f"offline{hint}")
    try:
        import datasets  # optional: pip install 'hgsp[hub]'
    except ImportError:
        raise UserError(f"loading the Hub dataset '{dataset_id}' needs `pip install datasets`"
                        f"{hint}") from None
    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as exc:  # noqa: BLE001 - network and hub errors vary widely
        raise UserError(f"cannot load fine-tuning data '{dataset_id}' from the Hub "
                        f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                        f"{hint}") from None
    origin = f"hub:{dataset_id}"
    records = validate_records(ds.to_list(), origin)
    log.info("instruction data: %d records from %s", len(records), origin)
    return InstructionSet(records, origin)


def select_examples(data: InstructionSet, n_train: int, n_val: int, seed: int) -> FinetuneData:
    """``n_train`` training and ``n_val`` held-out records, disjoint, drawn with ``seed``.

    Raises:
        UserError: the source holds fewer than ``n_train + n_val`` records.
    """
    available = len(data.records)
    if n_train + n_val > available:
        raise UserError(f"fine-tuning data '{data.origin}' has {available} records, but "
                        f"--finetune_samples {n_train} + --finetune_val_samples {n_val} = "
                        f"{n_train + n_val} are needed: lower them, or pass "
                        "--finetune_data_path with a larger Alpaca-format file or Hub dataset")
    order = random.Random(seed).sample(range(available), n_train + n_val)
    train_idx, val_idx = order[:n_train], order[n_train:]
    return FinetuneData([data.records[i] for i in train_idx], [data.records[i] for i in val_idx],
                        data.origin, train_idx, val_idx, available)


def encode(tokenizer, record: dict, cutoff_len: int) -> dict | None:
    """Token ids and labels of one record; prompt tokens get :data:`IGNORE_INDEX`.

    The prompt and the response are tokenized together, as the model will see them, and the
    character offsets decide which tokens belong to the prompt (a token that straddles the
    boundary counts as prompt). The end-of-text token is appended and learned, so the model
    learns to stop. Returns None when nothing of the response fits in ``cutoff_len`` tokens.
    """
    prompt = build_prompt(record)
    ids, n_prompt = _tokenize_with_boundary(tokenizer, prompt, prompt + record["output"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    if all(t == IGNORE_INDEX for t in labels[1:]):  # position 0 is never predicted
        return None
    return {"input_ids": ids, "labels": labels}


def _tokenize_with_boundary(tokenizer, prompt: str, full: str) -> tuple[list[int], int]:
    """Ids of ``full`` and how many of them lie (at least partly) inside ``prompt``."""
    try:
        enc = tokenizer(full, return_offsets_mapping=True, add_special_tokens=True)
    except (NotImplementedError, ValueError, TypeError):
        # Tokenizers without offsets: the prompt's own token count (exact when the prompt
        # ends on a token boundary, which "### Response:\n" does for common vocabularies).
        ids = tokenizer(full, add_special_tokens=True)["input_ids"]
        return ids, len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    ids = enc["input_ids"]
    n_prompt = 0
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        # Special tokens have empty (0, 0) spans: a leading one (BOS) belongs to the prompt,
        # a trailing one (an EOS some tokenizers add) to the response.
        if start == end == 0 and i != n_prompt:
            continue
        if start < len(prompt):
            n_prompt = i + 1
    return ids, n_prompt


def check_cutoff(tokenizer, data: FinetuneData, cutoff_len: int) -> None:
    """Fail now, not after pruning or an evaluation, if no example of a set keeps a response
    token within ``cutoff_len`` (stops at the first one that does)."""
    for what, records in (("training", data.train), ("validation", data.val)):
        if records and not any(encode(tokenizer, r, cutoff_len) is not None for r in records):
            raise _no_response_left(what, cutoff_len)


def _no_response_left(what: str, cutoff_len: int) -> UserError:
    return UserError(f"no {what} example keeps any response token within "
                     f"--finetune_cutoff_len {cutoff_len}: raise it")


def encode_all(tokenizer, records: list[dict], cutoff_len: int, what: str) -> list[dict]:
    """Encode records, dropping (and counting) those with no response token left."""
    examples = [e for e in (encode(tokenizer, r, cutoff_len) for r in records) if e is not None]
    dropped = len(records) - len(examples)
    if dropped:
        log.warning("%d of %d %s examples dropped: their prompt fills --finetune_cutoff_len %d",
                    dropped, len(records), what, cutoff_len)
    if records and not examples:
        raise _no_response_left(what, cutoff_len)
    return examples


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padding is masked out of attention and of the loss."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
