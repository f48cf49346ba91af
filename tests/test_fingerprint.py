"""The content fingerprint of a base model: cheap (ends of each weight file only), stable for
the same files wherever they are, and changed by an edit at either end of a weight file even
when the edit keeps the file's modification time."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from hgsp.modelio import MIB, content_fingerprint, model_fingerprint


@pytest.fixture
def model_dir(tmp_path):
    """A folder shaped like a model: config.json and a 3 MiB safetensors file, so that its
    middle is outside both hashed ends."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({"w": torch.arange(3 * MIB // 4, dtype=torch.float32)},
              str(folder / "model.safetensors"))
    return folder


def edit_keeping_mtime(path, offset: int) -> None:
    """Flip one byte, then restore the times, as ``cp -p`` or ``rsync -t`` would keep them."""
    st = path.stat()
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


def test_same_files_same_fingerprint(model_dir, tmp_path):
    first = content_fingerprint(str(model_dir))
    assert len(first) == 64 and first == content_fingerprint(str(model_dir))
    (model_dir / "README.md").write_text("not a weight file")
    assert content_fingerprint(str(model_dir)) == first
    copy = shutil.copytree(model_dir, tmp_path / "elsewhere")  # the path is not part of it
    assert content_fingerprint(str(copy)) == first


@pytest.mark.parametrize("where", ["start", "end"])
def test_one_byte_edit_changes_fingerprints(model_dir, where):
    weights = model_dir / "model.safetensors"
    header_end = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    content, key = content_fingerprint(str(model_dir)), model_fingerprint(str(model_dir))
    # the first tensor byte, or the file's last byte
    edit_keeping_mtime(weights, header_end if where == "start" else weights.stat().st_size - 1)
    assert content_fingerprint(str(model_dir)) != content
    assert model_fingerprint(str(model_dir)) != key  # so cached results are not reused


def test_config_edit_changes_fingerprint(model_dir):
    before = content_fingerprint(str(model_dir))
    edit_keeping_mtime(model_dir / "config.json", 2)
    assert content_fingerprint(str(model_dir)) != before


def test_single_weight_file(model_dir):
    """A .gguf or pruned_model.bin passed on its own is fingerprinted by itself."""
    weights = model_dir / "model.safetensors"
    before = content_fingerprint(str(weights))
    assert before is not None and before != content_fingerprint(str(model_dir))
    edit_keeping_mtime(weights, weights.stat().st_size - 1)
    assert content_fingerprint(str(weights)) != before


def test_hub_id_has_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing named like the hub id here
    assert content_fingerprint("meta-llama/Llama-3.1-8B") is None
    assert content_fingerprint(None) is None
    assert model_fingerprint("meta-llama/Llama-3.1-8B") == "hub:meta-llama/Llama-3.1-8B"
