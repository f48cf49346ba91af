"""Evaluation of a model, and of a pruned model side by side with its base (DESIGN.md §8).

``evaluation_results.json`` schema (``schema: hgsp-evaluation-v1``)::

    {
      "schema": "hgsp-evaluation-v1", "timestamp": ISO-8601 UTC,
      "settings": {ppl datasets and window lengths, window cap, zero-shot tasks and limit,
                   efficiency prompt/new tokens/batch sizes},
      "versions": {"hgsp", "torch", "transformers", "lm_eval"},
      "machine": {"platform", "processor", "threads", "device"},
      "models": {
        "base":   {"source", "cached", "ppl": {DATASET: {SEQ_LEN: {...}}},
                   "zeroshot": {"tasks": {TASK: {"acc", "acc_norm", "n", ...}}, "mean_acc",
                                "mean_acc_norm", "documents", ...},
                   "efficiency": {...}},
        "pruned": {same keys}
      },
      "ratios": {"ppl": {DATASET: {SEQ_LEN: pruned/base}},
                 "zeroshot_mean_acc_difference": pruned-base,
                 "efficiency": {figure: pruned/base}}
    }

After recovery fine-tuning (``--finetune``) ``models`` also holds ``finetuned`` (``pruned`` is
then the model before fine-tuning), and ``finetuned_ratios`` holds ``vs_pruned`` and
``vs_base``, each with the keys of ``ratios`` (finetuned relative to that model).

``zeroshot`` is the result of :func:`hgsp.zeroshot.run_zeroshot`; its ``documents`` entry
holds every task's per-document outcomes, for paired comparisons of two models
(:mod:`hgsp.paired`, ``benchmarks/paired_zeroshot.py``).

A model evaluated alone has only ``models.model``. Perplexity and zero-shot results of a base
model are cached under ``$HGSP_HOME/cache/eval`` keyed by the model's fingerprint, dtype and
device type, the files the evaluation text resolves to, and the settings, so a sweep of ratios
evaluates the base once; efficiency is always measured afresh, in the same process for both
models, so the two timings compare.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import __version__
from .errors import UserError
from .atomic import atomic_write
from .modelio import model_fingerprint
from .perplexity import EVAL_SPLITS, perplexity

log = logging.getLogger(__name__)

SCHEMA = "hgsp-evaluation-v1"
KINDS = ("ppl", "zeroshot", "efficiency")


@dataclass
class EvalSettings:
    """What to evaluate and how; part of the cache key of base-model results."""

    kinds: list[str]
    ppl_datasets: list[str] = field(default_factory=lambda: ["wikitext2", "ptb"])
    ppl_seq_lens: list[int] = field(default_factory=lambda: [128])
    ppl_max_windows: int | None = None
    zeroshot_tasks: list[str] = field(default_factory=list)
    zeroshot_limit: int | None = None
    zeroshot_batch_size: int = 8
    prompt_len: int = 128
    new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 8)
    data_dir: str | None = None

    def cache_key(self, fingerprint: str, kind: str, placement: str) -> str:
        """``placement``: the model's dtype and device type, which change the numbers; the
        evaluation text enters as the files it resolves to, not as the ``--data_dir`` given."""
        relevant = {"ppl": ("ppl_datasets", "ppl_seq_lens", "ppl_max_windows"),
                    "zeroshot": ("zeroshot_tasks", "zeroshot_limit")}[kind]
        payload = {k: getattr(self, k) for k in relevant}
        payload.update(fingerprint=fingerprint, kind=kind, hgsp=__version__, placement=placement,
                       sources=self.sources(kind))
        if kind == "zeroshot":  # results now hold per-document outcomes: older ones lack them
            payload["documents"] = True
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]

    def sources(self, kind: str) -> list[str]:
        """The evaluation text of ``kind`` as the files (or Hub sets) it resolves to."""
        from .data import corpus_source
        from .zeroshot import default_data_roots

        if kind == "ppl":
            return [corpus_source(*EVAL_SPLITS[d], self.data_dir) for d in self.ppl_datasets]
        return [str(root.resolve()) for root in default_data_roots(self.data_dir)]


def _split_list(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def parse_settings(kinds: str | list[str], ppl_datasets: str, ppl_seq_len: str,
                   zeroshot_tasks: str, ppl_max_windows: int | None = None,
                   zeroshot_limit: int | None = None, data_dir: str | None = None) -> EvalSettings:
    """Settings from command-line strings; every error is a one-line UserError."""
    kinds = _split_list(kinds) if isinstance(kinds, str) else list(kinds)
    if "all" in kinds:
        kinds = list(KINDS)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise UserError(f"unknown evaluation '{','.join(unknown)}': use ppl, zeroshot, "
                        "efficiency or all")
    datasets = _split_list(ppl_datasets)
    bad = [d for d in datasets if d not in EVAL_SPLITS]
    if bad:
        raise UserError(f"unknown perplexity dataset '{bad[0]}': use {', '.join(EVAL_SPLITS)}")
    try:
        seq_lens = [int(s) for s in _split_list(ppl_seq_len)]
    except ValueError:
        raise UserError(f"--eval_ppl_seq_len '{ppl_seq_len}' must be integers, e.g. 128,2048") \
            from None
    if not seq_lens or min(seq_lens) < 2:
        raise UserError("--eval_ppl_seq_len needs window lengths of at least 2 tokens")
    for name, value in (("eval_ppl_max_windows", ppl_max_windows),
                        ("eval_zeroshot_limit", zeroshot_limit)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be a positive integer, got {value}")
    tasks: list[str] = []
    if "zeroshot" in kinds:
        from .zeroshot import resolve_tasks

        tasks = resolve_tasks(zeroshot_tasks)
    return EvalSettings(kinds=kinds, ppl_datasets=datasets, ppl_seq_lens=seq_lens,
                        ppl_max_windows=ppl_max_windows, zeroshot_tasks=tasks,
                        zeroshot_limit=zeroshot_limit, data_dir=data_dir)


def settings_from_config(cfg) -> EvalSettings:
    return parse_settings(cfg.evaluations, cfg.eval_ppl_datasets, cfg.eval_ppl_seq_len,
                          cfg.eval_zeroshot_tasks, cfg.eval_ppl_max_windows,
                          cfg.eval_zeroshot_limit, cfg.data_dir)


def check_request(cfg) -> None:
    """Fail before pruning if the evaluation asked for cannot run (bad names, missing data)."""
    settings = settings_from_config(cfg)
    check_data(settings)


def check_data(settings: EvalSettings) -> None:
    """Every perplexity text must be local or reachable; found now, not after an hour."""
    if "ppl" in settings.kinds:
        from .data import load_corpus

        for dataset in settings.ppl_datasets:
            load_corpus(*EVAL_SPLITS[dataset], settings.data_dir)
    if "zeroshot" in settings.kinds:
        from .zeroshot import check_task_data, default_data_roots

        check_task_data(settings.zeroshot_tasks, default_data_roots(settings.data_dir))


def _cache_dir() -> Path:
    from .cache import cache_root

    return cache_root() / "eval"


def _placement(model) -> str:
    """``torch.float32@cpu``: a base model's results hold only for its dtype and device."""
    weight = next(model.parameters())
    return f"{weight.dtype}@{weight.device.type}"


def _cached(settings: EvalSettings, fingerprint: str | None, kind: str, placement: str,
            compute):
    """``compute()``, or its earlier result for the same model, placement and settings."""
    if fingerprint is None:
        return compute(), False
    path = _cache_dir() / f"{settings.cache_key(fingerprint, kind, placement)}.json"
    if path.is_file():
        log.info("%s of the base model: cached result %s", kind, path)
        return json.loads(path.read_text()), True
    value = compute()
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(value)))
    return value, False


def evaluate_model(model, tokenizer, settings: EvalSettings, folder: str | None = None,
                   fingerprint: str | None = None) -> dict:
    """Every requested evaluation of one model; ``fingerprint`` enables the cache."""
    out: dict = {"cached": []}
    placement = _placement(model)
    if "ppl" in settings.kinds:
        def ppl():
            return {d: {str(s): perplexity(model, tokenizer, d, s, settings.ppl_max_windows,
                                           settings.data_dir)
                        for s in settings.ppl_seq_lens} for d in settings.ppl_datasets}
        out["ppl"], hit = _cached(settings, fingerprint, "ppl", placement, ppl)
        if hit:
            out["cached"].append("ppl")
    if "zeroshot" in settings.kinds:
        from .zeroshot import default_data_roots, run_zeroshot

        def zeroshot():
            return run_zeroshot(model, tokenizer, settings.zeroshot_tasks,
                                limit=settings.zeroshot_limit,
                                batch_size=settings.zeroshot_batch_size,
                                data_root=default_data_roots(settings.data_dir))
        out["zeroshot"], hit = _cached(settings, fingerprint, "zeroshot", placement, zeroshot)
        if hit:
            out["cached"].append("zeroshot")
    if "efficiency" in settings.kinds:
        from .efficiency import efficiency

        out["efficiency"] = efficiency(model, folder, settings.prompt_len, settings.new_tokens,
                                       settings.batch_sizes)
    return out


def compare(pruned: dict, base: dict) -> dict:
    """Pruned relative to base: perplexity ratios, zero-shot differences, efficiency ratios."""
    out: dict = {}
    if "ppl" in pruned and "ppl" in base:
        out["ppl"] = {d: {s: r["ppl"] / base["ppl"][d][s]["ppl"] for s, r in by_len.items()}
                      for d, by_len in pruned["ppl"].items()}
    if "zeroshot" in pruned and "zeroshot" in base:
        out["zeroshot_mean_acc_difference"] = pruned["zeroshot"]["mean_acc"] - \
            base["zeroshot"]["mean_acc"]
    if "efficiency" in pruned and "efficiency" in base:
        from .efficiency import ratios

        out["efficiency"] = ratios(pruned["efficiency"], base["efficiency"])
    return out


def _versions() -> dict:
    import transformers

    versions = {"hgsp": __version__, "torch": torch.__version__,
                "transformers": transformers.__version__}
    try:
        from importlib.metadata import version

        versions["lm_eval"] = version("lm_eval")
    except Exception:  # noqa: BLE001 - not installed: zero-shot was not run
        versions["lm_eval"] = None
    return versions


def results_document(models: dict, settings: EvalSettings, device: str) -> dict:
    doc = {
        "schema": SCHEMA,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine(),
                    "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                    "device": device},
        "models": models,
    }
    if "base" in models and "pruned" in models:
        doc["ratios"] = compare(models["pruned"], models["base"])
    if "finetuned" in models:  # recovery fine-tuning: against the model before it, and the base
        doc["finetuned_ratios"] = {f"vs_{ref}": compare(models["finetuned"], models[ref])
                                   for ref in ("pruned", "base") if ref in models}
    return doc


def evaluate_run(cfg, base, pruned, tokenizer, results, device: str, finetuned=None) -> dict:
    """Evaluate the base and the pruned model of a pruning run into ``evaluation/``.

    With ``finetuned`` (``--finetune``), ``pruned`` is the model before fine-tuning (saved in
    ``models/pruned_before_finetune/``) and the fine-tuned one (``models/``) is added.
    """
    settings = settings_from_config(cfg)
    base_res = evaluate_model(base, tokenizer, settings, folder=cfg.base_model,
                              fingerprint=model_fingerprint(cfg.base_model))
    base_res["source"] = cfg.base_model
    pruned_dir = ("models", "pruned_before_finetune") if finetuned is not None else ("models",)
    pruned_res = evaluate_model(pruned, tokenizer, settings,
                                folder=str(results.path(*pruned_dir)))
    pruned_res["source"] = str(results.final.joinpath(*pruned_dir))
    models = {"base": base_res, "pruned": pruned_res}
    if finetuned is not None:
        models["finetuned"] = evaluate_model(finetuned, tokenizer, settings,
                                             folder=str(results.path("models")))
        models["finetuned"]["source"] = str(results.final / "models")
    doc = results_document(models, settings, device)
    path = results.path("evaluation", "evaluation_results.json")
    path.write_text(json.dumps(doc, indent=2) + "\n")
    log_comparison(doc)
    out = {"file": "evaluation/evaluation_results.json", "ratios": doc.get("ratios", {})}
    if "finetuned_ratios" in doc:
        out["finetuned_ratios"] = doc["finetuned_ratios"]
    return out


def log_comparison(doc: dict) -> None:
    models = doc["models"]
    for name, res in models.items():
        for dataset, by_len in res.get("ppl", {}).items():
            for seq_len, r in by_len.items():
                log.info("%-6s ppl %s@%s = %.3f", name, dataset, seq_len, r["ppl"])
        if "zeroshot" in res:
            log.info("%-6s zero-shot mean acc = %.4f", name, res["zeroshot"]["mean_acc"])
        if "efficiency" in res:
            sp = res["efficiency"]["speed"]
            log.info("%-6s decode tok/s batch1 = %.1f", name, sp["batch1"]["decode_tokens_per_s"])


def evaluate_paths(model_spec: str, settings: EvalSettings, base_spec: str | None = None,
                   device: str = "cpu", dtype: str = "auto", output: Path | None = None) -> dict:
    """``hgsp eval``: evaluate a saved model (and optionally its base) into a JSON file.

    The file is written to a temporary name and renamed, so an interrupted evaluation leaves
    no half-written result.
    """
    from .modelio import load_model, resolve_dtype
    from .pipeline import resolve_device

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_data(settings)
    models = {}
    specs = {"base": base_spec, "pruned": model_spec} if base_spec else {"model": model_spec}
    for name, spec in specs.items():
        loaded = load_model(spec, torch_dtype, device)
        if loaded.tokenizer is None:
            raise UserError(f"no tokenizer found with '{spec}': save one beside the model")
        folder = spec if Path(spec).is_dir() else None
        result = evaluate_model(loaded.model, loaded.tokenizer, settings, folder,
                                fingerprint=model_fingerprint(spec) if name != "pruned" else None)
        result["source"] = spec
        models[name] = result
        del loaded
    doc = results_document(models, settings, device)
    if output is not None:
        atomic_write(Path(output), lambda tmp: tmp.write_text(json.dumps(doc, indent=2) + "\n"))
    log_comparison(doc)
    return doc
