"""On-disk cache of the expensive, ratio-independent stages: importances and removal analysis.

A sweep over ratios, temperatures, τ or ε recomputes neither: both depend only on the model,
the data and the calibration settings, which make up the key. Entries are written to a
temporary name and renamed, so a crash never leaves a truncated entry that a later run reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .analysis import RemovalAnalysis
from .atomic import atomic_write
from .importance import Importance

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$HGSP_CACHE_DIR``, else ``$HGSP_HOME/cache``."""
    from .assets import assets_home

    return Path(os.environ.get("HGSP_CACHE_DIR") or assets_home() / "cache")


def cache_key(**inputs) -> str:
    """A stable hash of everything that determines a cached result."""
    payload = json.dumps({**inputs, "hgsp": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def load_importance(key: str) -> Importance | None:
    path = cache_root() / "importance" / f"{key}.safetensors"
    meta_path = path.with_suffix(".json")
    if not (path.is_file() and meta_path.is_file()):
        return None
    tensors = load_file(path)
    meta = json.loads(meta_path.read_text())
    log.info("importance: cached result %s", path)
    return Importance(attn=tensors["attn"], mlp=tensors["mlp"], method=meta["method"],
                      tokens=meta["tokens"])


def store_importance(key: str, importance: Importance) -> None:
    path = cache_root() / "importance" / f"{key}.safetensors"
    atomic_write(path, lambda p: save_file(
        {"attn": importance.attn.contiguous(), "mlp": importance.mlp.contiguous()}, str(p)))
    meta = {"method": importance.method, "tokens": importance.tokens}
    atomic_write(path.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta)))


def load_analysis(key: str) -> RemovalAnalysis | None:
    path = cache_root() / "analysis" / f"{key}.json"
    if not path.is_file():
        return None
    log.info("removal analysis: cached result %s", path)
    return RemovalAnalysis(**json.loads(path.read_text()))


def store_analysis(key: str, analysis: RemovalAnalysis) -> None:
    path = cache_root() / "analysis" / f"{key}.json"
    atomic_write(path, lambda p: p.write_text(json.dumps(asdict(analysis))))


def cached(load, store, key: str | None, compute):
    """``compute()``, or the entry stored under ``key`` (``None`` disables the cache).

    Returns:
        ``(value, hit)``.
    """
    if key is not None:
        value = load(key)
        if value is not None:
            return value, True
    value = compute()
    if key is not None:
        store(key, value)
    return value, False


def tensor_digest(t: torch.Tensor) -> str:
    """Hash of a tensor's contents (for keys that depend on data, e.g. calibration ids)."""
    return hashlib.sha256(t.contiguous().cpu().numpy().tobytes()).hexdigest()[:16]
