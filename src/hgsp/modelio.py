"""Loading base and pruned models (folder, hub id, GGUF file, ``pruned_model.bin``).

Security: nothing here unpickles arbitrary objects (``torch.load`` runs with
``weights_only=True``) and ``trust_remote_code`` is never set for the input model. Pruned
models made by hgsp load through the classes of :mod:`hgsp.modeling_hgsp`, which are
registered with the transformers Auto classes on import, so hgsp itself never needs to run
code shipped inside a model folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .adapters import adapter_for
from .errors import UserError
from . import registry  # noqa: F401 - makes pruned folders loadable

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRUNED_BIN = "pruned_model.bin"
PRUNED_BIN_FORMAT = "hgsp-pruned-model-v1"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user passed
    kind: str  # "folder" | "hub" | "gguf" | "pruned_bin"


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``auto`` is float32 on CPU (bf16 matmuls are slow there) and bfloat16 on GPUs."""
    if name == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise UserError(f"unknown --dtype '{name}': use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _is_hub_id(spec: str) -> bool:
    """``org/name`` with no path-only characters, and nothing by that name on disk."""
    return bool(_HUB_ID.match(spec)) and not spec.endswith((".gguf", ".bin"))


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
               device_map: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer from a folder, a hub id, a GGUF file or a .bin.

    Raises:
        UserError: the path is missing or unreadable, or the architecture is unsupported.
    """
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        model, tok = load_gguf(path, dtype)
        kind = "gguf"
    elif path.is_file() and path.name.endswith(".bin"):
        model, tok = load_pruned_bin(path, dtype)
        kind = "pruned_bin"
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder '{spec}' has no config.json: pass a Hugging Face "
                            "model folder, a .gguf file or a pruned_model.bin")
        model, tok = _load_pretrained(str(path), dtype, device_map)
        kind = "folder"
    elif path.exists():
        raise UserError(f"cannot read model '{spec}': pass a Hugging Face model folder, "
                        "a .gguf file or a pruned_model.bin")
    elif not _is_hub_id(spec):
        raise UserError(f"model path '{spec}' does not exist: check the path "
                        "(or give a hub id such as meta-llama/Llama-3.1-8B)")
    else:
        model, tok = _load_pretrained(spec, dtype, device_map)
        kind = "hub"
    if device_map is None:
        model.to(device)
    model.eval()
    return LoadedModel(model, tok, spec, kind)


def _check_config(spec: str):
    try:
        config = AutoConfig.from_pretrained(spec)
    except ValueError as exc:  # unknown model_type: transformers would need remote code
        raise UserError(f"unsupported architecture in '{spec}' ({_first_line(exc)}): hgsp "
                        "prunes llama, mistral, qwen2 and qwen3 models") from None
    except OSError as exc:
        raise UserError(f"cannot load '{spec}': {_first_line(exc)} (offline? set --base_model "
                        "to a local folder)") from None
    adapter_for(config)  # raises for unsupported families
    return config


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer_files(folder: Path) -> bool:
    """transformers 5 builds an *empty* tokenizer for some configs when none is saved; look
    for the files instead of trusting AutoTokenizer to fail."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _load_pretrained(spec: str, dtype: torch.dtype, device_map: str | None):
    _check_config(spec)
    if Path(spec).is_dir() and not has_tokenizer_files(Path(spec)):
        raise UserError(f"model folder '{spec}' has no tokenizer (tokenizer.json or "
                        "tokenizer_config.json): save the tokenizer beside the model")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype, device_map=device_map)
        tok = AutoTokenizer.from_pretrained(spec)
    except OSError as exc:
        raise UserError(f"cannot load '{spec}': {_first_line(exc)}") from None
    return model, tok


def load_gguf(path: Path, dtype: torch.dtype = torch.float32):
    """Load a GGUF checkpoint, de-quantized, as a plain (saveable) transformers model.

    transformers' GGUF loader keeps a ``quantization_config`` that makes the model refuse
    ``save_pretrained``; rebuilding from a clean config and copying the state dict drops it.
    """
    folder, name = str(path.parent), path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load GGUF file '{path}': {_first_line(exc)}") from None
    adapter_for(loaded.config)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    if model.generation_config is not None and loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    return model, tok


def load_pruned_bin(path: Path, dtype: torch.dtype = torch.float32):
    """Load the ``pruned_model.bin`` written by :func:`hgsp.save.save_pruned_model`.

    The file holds only a config (as JSON text) and tensors, so ``weights_only=True`` reads it.
    The tokenizer is read from the same folder.
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
        # torch's own message suggests weights_only=False: advice not to pass on
        reason = ("it holds pickled objects besides tensors, which hgsp does not load"
                  if "Weights only load failed" in str(exc) else _first_line(exc))
        raise UserError(f"cannot read '{path}' as an hgsp pruned model: {reason}") from None
    if not isinstance(blob, dict) or blob.get("format") != PRUNED_BIN_FORMAT:
        raise UserError(f"'{path}' is not a pruned_model.bin written by hgsp")
    config = config_from_dict(json.loads(blob["config"]))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(blob["state_dict"], strict=False)
    model.tie_weights()
    missing = set(model.state_dict()) - set(blob["state_dict"])
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if missing - tied:
        raise UserError(f"'{path}' lacks weights {sorted(missing - tied)[:3]}...")
    tok = None
    if has_tokenizer_files(path.parent):
        tok = AutoTokenizer.from_pretrained(str(path.parent))
    else:
        log.warning("no tokenizer next to %s", path)
    return model, tok


def config_from_dict(config_dict: dict):
    """Rebuild a config (stock or pruned) from its ``to_dict()`` form."""
    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    return AutoConfig.for_model(model_type, **config_dict)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")  # pruned_model.bin is a .bin
MIB = 1 << 20
SAFETENSORS_MAX_HEADER = 100_000_000  # the format's own limit


def content_fingerprint(source: str | None) -> str | None:
    """sha256 of what makes a model: ``config.json`` and, per weight file sorted by name, its
    name, size and the sha256 of its first and last MiB; None if ``source`` is not on disk.

    Reading every byte of a 140 GB model would take minutes, so the middle of each file is
    left out. What is read covers a safetensors header whole (every tensor's name, shape,
    dtype and offset), so a changed architecture, tensor list or file length always shows,
    as does any edit at either end of a file.
    """
    if source is None or not Path(source).expanduser().exists():
        return None  # a hub id: its revision, not its bytes, identifies it
    path = Path(source).expanduser()
    digest = hashlib.sha256()
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            digest.update(b"config.json\0" + config.read_bytes())
        files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    else:
        files = [path]
    for f in files:
        digest.update(f"\0{f.name}\0{f.stat().st_size}\0{_ends_sha256(f)}\n".encode())
    return digest.hexdigest()


def _ends_sha256(path: Path) -> str:
    """sha256 of a file's first MiB and of its last MiB (the first extends over a larger
    safetensors header, so that the header is always hashed whole)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = MIB
        if path.suffix == ".safetensors" and size >= 8:
            header = int.from_bytes(f.read(8), "little")
            head = max(head, 8 + min(header, SAFETENSORS_MAX_HEADER))
            f.seek(0)
        first = hashlib.sha256(f.read(head)).hexdigest()
        f.seek(max(size - MIB, 0))
        return f"{first}\0{hashlib.sha256(f.read()).hexdigest()}"


def model_fingerprint(source: str | None) -> str | None:
    """The cache key of a model: its path, its files' sizes and modification times, and its
    :func:`content_fingerprint`.

    The times notice any rewrite by ordinary tools; the content fingerprint also catches an
    edit whose time was kept (``cp -p``, ``rsync -t``, ``touch -r``), for a few MiB read.
    """
    if source is None:
        return None
    path = Path(source).expanduser()
    if not path.exists():
        return f"hub:{source}"
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    parts = [str(path.resolve()), content_fingerprint(source)]
    parts += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
              for f in files if f.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
