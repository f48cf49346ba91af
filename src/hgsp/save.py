"""Writing results: the pruned model folder, the tables, and the atomic results directory."""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

from .errors import UserError, naming_path, write_failure
from .modelio import PRUNED_BIN, PRUNED_BIN_FORMAT

log = logging.getLogger(__name__)

MODELING_FILE = Path(__file__).with_name("modeling_hgsp.py")


def save_pruned_model(model, tokenizer, folder: Path, write_bin: bool = True) -> None:
    """Save a loadable model folder: safetensors, config, tokenizer, and code if needed.

    A model with per-layer sizes gets ``modeling_hgsp.py`` beside its weights, so that
    ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` loads it with
    only transformers installed (with hgsp imported, no flag is needed).
    """
    folder.mkdir(parents=True, exist_ok=True)
    with naming_path(folder):  # safetensors' own error type, with the errno only in its text
        model.save_pretrained(folder, safe_serialization=True)
    if getattr(model.config, "auto_map", None):
        shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if write_bin:
        save_bin(model, folder / PRUNED_BIN)


def save_bin(model, path: Path) -> None:
    """``pruned_model.bin``: tensors and the config as JSON text, nothing to unpickle."""
    config = model.config.to_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # restored by tie_weights() on load
    blob = {"format": PRUNED_BIN_FORMAT, "config": json.dumps(config), "state_dict": state}
    try:
        torch.save(blob, path)
    except RuntimeError as exc:
        # torch's zip writer drops the errno ("file write failed"); a disk without room for
        # the tensors is the usual cause, and then the message must say so.
        needed = sum(t.numel() * t.element_size() for t in state.values())
        if shutil.disk_usage(path.parent).free < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        raise


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_csv(path: Path, header: list[str], rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


class ResultsDir:
    """``results/NAME`` written atomically: everything goes to a hidden temporary folder
    beside it, which replaces the final folder only when the run has succeeded.

    An interrupted or failed run removes its temporary folder and leaves an earlier result
    exactly as it was.
    """

    SUBDIRS = ("models", "analysis", "evaluation", "logs")

    def __init__(self, parent: str | os.PathLike, name: str, overwrite: bool):
        self.parent = Path(parent)
        self.final = self.parent / name
        self.overwrite = overwrite
        self.tmp = self.parent / f".{name}.tmp-{uuid.uuid4().hex[:8]}"

    def check(self) -> None:
        """Fail before any work if the result exists and may not be replaced."""
        if self.final.exists() and not self.overwrite:
            raise UserError(f"results folder '{self.final}' already exists: choose another "
                            "--output_name or pass --overwrite")
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create results folder '{self.parent}': {exc.strerror}") \
                from None
        if not os.access(self.parent, os.W_OK):
            raise UserError(f"results folder '{self.parent}' is not writable: check its "
                            "permissions or pass another --results_dir")

    def __enter__(self) -> "ResultsDir":
        self.check()
        try:
            for sub in self.SUBDIRS:
                (self.tmp / sub).mkdir(parents=True)
        except OSError as exc:  # e.g. no free inodes: __exit__ is not called for this
            self._discard(exc)
            raise
        return self

    def path(self, *parts: str) -> Path:
        return self.tmp.joinpath(*parts)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard(exc)
            return
        try:
            self._publish()
        except OSError as exc:
            self._discard(exc)
            raise

    def _discard(self, exc: BaseException) -> None:
        """Remove the temporary folder; a full disk or a refused write becomes one line
        naming the file (other errors propagate unchanged)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        path, ours = self._locate(getattr(exc, "filename", None))
        # --results_dir is the fix only for files of this folder, not e.g. for the cache
        error = write_failure(exc, path, "--results_dir" if ours else None)
        if error is not None:
            raise error from exc

    def _locate(self, filename) -> tuple[Path, bool]:
        """The file as named in the final folder (the temporary one is gone by the time the
        user reads the message), and whether it is in this folder; unknown means it is."""
        if not filename:
            return self.final, True
        path, tmp = Path(filename).absolute(), self.tmp.absolute()
        if path.is_relative_to(tmp):
            return self.final / path.relative_to(tmp), True
        return path, False

    def _publish(self) -> None:
        """Swap the finished folder in; the earlier result is deleted only once it is."""
        if self.final.exists() and not self.overwrite:
            # another run took the name while this one worked: neither result is lost
            kept = self.parent / f"{self.final.name}-{uuid.uuid4().hex[:8]}"
            self.tmp.rename(kept)
            raise UserError(f"results folder '{self.final}' was created by another run while "
                            f"this one worked: this run's results are in '{kept}' (rename it, "
                            "or pass --overwrite to replace)")
        old = None
        if self.final.exists():
            old = self.parent / f".{self.final.name}.old-{uuid.uuid4().hex[:8]}"
            self.final.rename(old)
        try:
            self.tmp.rename(self.final)
        except OSError:
            if old is not None:
                old.rename(self.final)  # put the earlier result back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
