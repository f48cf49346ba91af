"""The pruning run end to end: load → calibrate → analyse → score → select → apply → save.

Each stage is a library function whose output can be saved on its own; this module only
strings them together, times them, and writes the results folder atomically.
"""

from __future__ import annotations

import logging
import math
import platform
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .activations import collect_activation_stats
from .adapters import Adapter, adapter_for
from .analysis import removal_analysis
from .cache import cache_key, cached, load_analysis, load_importance, store_analysis, \
    store_importance, tensor_digest
from .config import PruneConfig
from .data import build_calibration_set, load_corpus
from .errors import UserError
from .importance import compute_importance
from .modelio import content_fingerprint, load_model, model_fingerprint, resolve_dtype
from .outputs import layer_summary, write_group_tables, write_layer_summary, \
    write_removal_analysis
from .plan import PruningPlan, plan_from_selection
from .save import ResultsDir, save_pruned_model, write_json
from .methods import (ACTIVATION_METHODS, IMPORTANCE_METHODS, Measurements, choose,
                      warn_kept_below_epsilon)
from .scoring import GroupTable, ScoreInfo
from .selection import Selection
from .reconstruction import refit_outputs
from .surgery import apply_plan, compensation_biases

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    results_dir: Path
    summary: dict
    plan: PruningPlan


class StageTimer:
    """Wall time of each named stage, in order."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        log.info("stage: %s", stage)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - start, 3)


def count_params(model: torch.nn.Module) -> int:
    """All parameters, tied ones once (``parameters()`` already de-duplicates)."""
    return sum(p.numel() for p in model.parameters())


def decoder_params(model: torch.nn.Module, adapter: Adapter) -> int:
    return sum(p.numel() for p in adapter.layers(model).parameters())


def resolve_device(name: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``, checked before any model is loaded."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise UserError(f"--device {name} is not a device: use cpu, cuda, cuda:N or auto")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is available: use "
                        "--device cpu")
    index = int(name.split(":")[1]) if ":" in name else 0
    if name.startswith("cuda") and index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        f"GPU(s), numbered from 0")
    return name


def _refuse_pruned(config, base_model: str) -> None:
    """A model hgsp already pruned has per-layer widths the group table cannot describe."""
    if getattr(config, "model_type", "").startswith("hgsp_"):
        raise UserError(f"{base_model} was already pruned by hgsp: prune the original model "
                        "again with the total --pruning_ratio you want (its summary.json names "
                        "it as base_model)")


def removal_budget(total: int, decoder: int, ratio: float) -> int:
    """Parameters to remove; the ratio may not need more than the decoder layers hold."""
    budget = round(ratio * total)
    if budget >= decoder:
        raise UserError(f"--pruning_ratio {ratio} asks to remove {budget:,} of {total:,} "
                        f"parameters, but the decoder layers hold only {decoder:,} "
                        f"({decoder / total:.1%}): use a ratio below "
                        f"{math.floor(decoder / total * 1000) / 1000:.3f}")
    return budget


def uses_compensation(cfg: PruneConfig) -> bool:
    """FLAP always compensates; H-GSP as ``--bias_compensation`` says; the other baselines
    never do (their papers do not)."""
    return cfg.method == "flap" or (cfg.method == "hgsp" and cfg.bias_compensation)


def keeps_constants(cfg: PruneConfig) -> bool:
    """FLAP's code never drops a block: one it empties keeps its compensation as a constant.
    H-GSP removes blocks for good (a constant there measured worse: benchmarks/README.md)."""
    return cfg.method == "flap"


def uses_refit(cfg: PruneConfig) -> bool:
    """The refit builds on bias compensation, and only for H-GSP (FLAP keeps its paper's)."""
    return cfg.method == "hgsp" and cfg.bias_compensation and cfg.refit_outputs


def bias_overhead(table: GroupTable, selection: Selection, adapter: Adapter,
                  constants: bool = False) -> int:
    """Parameters that bias compensation adds: a bias per narrowed block that had none and,
    with ``constants`` (FLAP), a constant per emptied block.

    Counted on a first selection; the one made with the raised budget may narrow or empty a
    few blocks more, each a hidden-size vector off the budget (the achieved ratio is measured
    on the saved model either way)."""
    n_layers = len(selection.attn_removed)
    touched = torch.zeros(n_layers * 2, dtype=torch.bool)
    touched[(table.layer * 2 + table.kind)[selection.selected]] = True
    removed = torch.tensor([selection.attn_removed, selection.mlp_removed]).T.reshape(-1)
    narrowed = (touched & ~removed).view(n_layers, 2)
    has_bias = torch.tensor([adapter.o_bias, adapter.mlp_bias])
    added = int((narrowed & ~has_bias).sum()) + (int(removed.sum()) if constants else 0)
    return adapter.dims().hidden * added


def output_tensors(model, adapter: Adapter, plan: PruningPlan, cfg: PruneConfig,
                   measured: Measurements) -> tuple[dict | None, dict | None]:
    """``(biases, weights)`` of the pruned model's output projections as ``cfg`` asks: bias
    compensation (with FLAP's constants), and the refit of the narrowed projections."""
    if uses_refit(cfg):
        weights, biases = refit_outputs(model, adapter, plan, measured.calibration,
                                        cfg.gradient_batch_size, measured.stats.mean("attn"),
                                        measured.stats.mean("mlp"), cfg.refit_damp)
        return biases, weights
    if uses_compensation(cfg):
        return compensation_biases(model, adapter, plan, measured.stats.mean("attn"),
                                   measured.stats.mean("mlp"), emptied=keeps_constants(cfg)), None
    return None, None


def build_pruned(model, adapter: Adapter, plan: PruningPlan, cfg: PruneConfig,
                 measured: Measurements):
    """The pruned model of ``plan``, with bias compensation (and the refit of the narrowed
    output projections) when ``cfg`` asks for it."""
    biases, weights = output_tensors(model, adapter, plan, cfg, measured)
    emptied = plan.removed_blocks()
    if keeps_constants(cfg) and emptied:
        log.info("FLAP removed every unit of %d block(s) (%s): each is kept as a constant, its "
                 "units' mean contribution, as FLAP's code does", len(emptied),
                 ", ".join(emptied))
    return apply_plan(model, adapter, plan, biases, weights)


def score_and_select(measured: Measurements, adapter: Adapter, cfg: PruneConfig, budget: int,
                     model=None) -> tuple[GroupTable, ScoreInfo, Selection]:
    """Group table, scores and selection of ``cfg.method`` for a removal ``budget``.

    With bias compensation the new biases count too: the selection is made again with the
    budget raised by what the first one's biases add.
    """
    table, info, selection = choose(cfg.method, measured, adapter, cfg, budget, model)
    if uses_compensation(cfg):
        budget += bias_overhead(table, selection, adapter, constants=keeps_constants(cfg))
        table, info, selection = choose(cfg.method, measured, adapter, cfg, budget, model)
    warn_kept_below_epsilon(selection, cfg.epsilon)
    if all(selection.layers_removed):
        raise UserError(f"--pruning_ratio {cfg.pruning_ratio} removes all "
                        f"{len(selection.layers_removed)} decoder layers (with --epsilon "
                        f"{cfg.epsilon}, the nearly empty ones collapse): use a lower "
                        "--pruning_ratio or --epsilon")
    return table, info, selection


@contextmanager
def _run_log(path: Path, level: str):
    """Copy the package's log records into the run's ``logs/run.log``."""
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    pkg = logging.getLogger("hgsp")
    pkg.addHandler(handler)
    old_level = pkg.level
    pkg.setLevel(level)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(old_level)
        handler.close()


def _refuse_unavailable(cfg: PruneConfig):
    """Fail before pruning if a later stage cannot run; returns the fine-tuning data (or None)."""
    ft_data = None
    if cfg.finetune:  # a missing or malformed data file, or too few records, stops us here
        from .finetune import FinetuneSettings, prepare

        ft_data = prepare(FinetuneSettings.from_flags(cfg))
    if cfg.evaluations:
        from .evaluate import check_request

        check_request(cfg)
    return ft_data


def prune(cfg: PruneConfig) -> PruneResult:
    """Run H-GSP as ``cfg`` says and write ``results/{output_name}/``.

    Raises:
        UserError: bad arguments or inputs; nothing is written in that case.
    """
    cfg.validate()
    results = ResultsDir(cfg.results_dir, cfg.output_name, cfg.overwrite)
    results.check()
    ft_data = _refuse_unavailable(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    timer = StageTimer()
    needs_data = (cfg.method != "hgsp" or cfg.importance_method != "magnitude"
                  or uses_analysis(cfg) or uses_compensation(cfg))
    with results, _run_log(results.path("logs", "run.log"), cfg.log_level):
        log.info("hgsp %s: pruning %s by %.1f%% (method %s, importance %s, T=%g, tau=%s, "
                 "epsilon=%g)", __version__, cfg.base_model, 100 * cfg.pruning_ratio, cfg.method,
                 cfg.importance_method, cfg.temperature, cfg.tau, cfg.epsilon)
        with timer("load"):
            corpus = load_corpus(cfg.dataset, "train", cfg.data_dir) if needs_data else None
            loaded = load_model(cfg.base_model, dtype, device, cfg.device_map)
        model, tokenizer = loaded.model, loaded.tokenizer
        _refuse_pruned(model.config, cfg.base_model)
        if ft_data is not None:  # the tokenizer is needed to check the cutoff: now, not later
            from .alpaca import check_cutoff
            check_cutoff(tokenizer, ft_data, cfg.finetune_cutoff_len)
        adapter = adapter_for(model.config)
        total, decoder = count_params(model), decoder_params(model, adapter)
        budget = removal_budget(total, decoder, cfg.pruning_ratio)
        log.info("base model: %s parameters, %s in %d decoder layers; removing %s",
                 f"{total:,}", f"{decoder:,}", len(adapter.layers(model)), f"{budget:,}")

        cal, measured = measure(cfg, model, tokenizer, adapter, corpus, dtype, timer)
        analysis = measured.analysis
        with timer("selection"):
            table, info, selection = score_and_select(measured, adapter, cfg, budget, model)
            d = adapter.dims()
            plan = plan_from_selection(table, selection, adapter.model_type, d.num_kv_heads,
                                       d.intermediate)
            plan.meta = {"base_model": cfg.base_model, "method": cfg.method,
                         "pruning_ratio": cfg.pruning_ratio, "temperature": cfg.temperature,
                         "tau": info.tau, "epsilon": cfg.epsilon,
                         "importance_method": cfg.importance_method,
                         "importance_norm": cfg.resolved_importance_norm,
                         "bias_compensation": uses_compensation(cfg),
                         "refit_outputs": uses_refit(cfg)}
        with timer("surgery"):
            pruned = build_pruned(model, adapter, plan, cfg, measured)
        pruned_total = count_params(pruned)
        with timer("save"):
            # With --finetune, models/ gets the fine-tuned model and this one moves aside.
            pruned_dir = results.path("models", *(["pruned_before_finetune"] if cfg.finetune
                                                  else []))
            save_pruned_model(pruned, tokenizer, pruned_dir, cfg.save_bin)
            analysis_dir = results.path("analysis")
            write_removal_analysis(analysis_dir, analysis, info,
                                   cal.analysis_windows if cal is not None else None,
                                   cfg.delta_metric)
            write_group_tables(analysis_dir, table, selection)
            plan.save(analysis_dir / "pruning_plan.json")
            rows = layer_summary(plan, d.gqa_ratio, info, selection,
                                 _layer_params(model, pruned, adapter, plan))
            write_layer_summary(analysis_dir, rows)
        summary = _summary(cfg, loaded.kind, total, decoder, pruned_total,
                           decoder_params(pruned, adapter), budget, selection, info, analysis,
                           rows, timer, cal)
        finetuned = None
        if cfg.finetune:
            from .finetune import FinetuneSettings, finetune_stage, parked_on_cpu

            # The base model waits on the CPU (GPU memory goes to training), and the pruned
            # model is copied only when the evaluation compares before and after.
            with timer("finetune"), parked_on_cpu(model, device != "cpu" and not cfg.device_map):
                finetuned, before, summary["finetune"] = finetune_stage(
                    FinetuneSettings.from_flags(cfg), ft_data, pruned, tokenizer, results,
                    cfg.save_bin, keep_before=bool(cfg.evaluations))
            pruned = before if before is not None else pruned
        if cfg.evaluations:
            from .evaluate import evaluate_run
            with timer("evaluation"):
                summary["evaluation"] = evaluate_run(cfg, model, pruned, tokenizer, results,
                                                     device, finetuned=finetuned)
        summary["timings_s"] = timer.seconds
        write_json(results.path("summary.json"), summary)
        write_json(results.path("logs", "config.json"), _resolved_config(cfg, device, dtype))
        _log_summary(summary)
        # Pictures and report.md/html; a failure there is only a warning (`hgsp report` redoes it).
        from .report import try_write_report
        try_write_report(results.tmp, results.final)
    return PruneResult(results.final, summary, plan)


def measure(cfg: PruneConfig, model, tokenizer, adapter: Adapter, corpus, dtype,
            timer: StageTimer | None = None):
    """Calibration windows and everything ``cfg.method`` measures on them (cached where the
    cache applies); returns ``(calibration set or None, Measurements)``."""
    timer = timer or StageTimer()
    with timer("calibration"):
        cal = None
        if corpus is not None:
            cal = build_calibration_set(tokenizer, corpus, cfg.num_examples, cfg.seq_len,
                                        cfg.analysis_samples if uses_analysis(cfg) else 0,
                                        cfg.seed)
        measured = Measurements(importance=_importance_stage(cfg, model, adapter, cal, dtype),
                                stats=_activation_stage(cfg, model, adapter, cal),
                                calibration=None if cal is None else cal.calibration)
    with timer("analysis"):
        measured.analysis = _analysis_stage(cfg, model, adapter, cal, dtype)
    return cal, measured


def uses_analysis(cfg: PruneConfig) -> bool:
    return cfg.method == "hgsp" and cfg.temperature > 0


def _activation_stage(cfg: PruneConfig, model, adapter: Adapter, cal):
    """Activation statistics, for the methods and options that use them (else None)."""
    if cfg.method not in ACTIVATION_METHODS and not uses_compensation(cfg):
        return None
    return collect_activation_stats(model, adapter, cal.calibration, cfg.gradient_batch_size)


def _importance_stage(cfg: PruneConfig, model, adapter: Adapter, cal, dtype):
    """Group importances, from the cache when the model, data and settings match."""
    if cfg.method not in IMPORTANCE_METHODS:
        return None
    windows = cal.calibration if cal is not None else None
    key = None
    if cfg.cache:
        key = cache_key(stage="importance", model=model_fingerprint(cfg.base_model),
                        method=cfg.importance_method, dataset=cfg.dataset,
                        num_examples=cfg.num_examples, seq_len=cfg.seq_len, seed=cfg.seed,
                        batch_size=cfg.gradient_batch_size, dtype=str(dtype),
                        tokens=None if windows is None else tensor_digest(windows),
                        # only when not the default, so that earlier cache entries still match
                        **({"kv_group_scoring": cfg.kv_group_scoring}
                           if cfg.kv_group_scoring != "shared" else {}))
    importance, _ = cached(load_importance, store_importance, key, lambda: compute_importance(
        model, adapter, cfg.importance_method, windows, cfg.gradient_batch_size,
        cfg.use_gradient_checkpointing, cfg.gradient_sums_on_cpu, cfg.gradient_passes,
        cfg.kv_group_scoring))
    return importance


def _analysis_stage(cfg: PruneConfig, model, adapter: Adapter, cal, dtype):
    """Layer/block removal perplexities (None when T = 0), cached like the importances."""
    if not uses_analysis(cfg):
        return None
    key = None
    if cfg.cache:
        key = cache_key(stage="analysis", model=model_fingerprint(cfg.base_model),
                        dtype=str(dtype), tokens=tensor_digest(cal.analysis))
    analysis, _ = cached(load_analysis, store_analysis, key, lambda: removal_analysis(
        model, adapter, cal.analysis, cfg.analysis_batch_size))
    log.info("base perplexity on the analysis set: %.3f", analysis.base_ppl)
    return analysis


def _layer_params(model, pruned, adapter, plan) -> list[tuple[int, int]]:
    before = [sum(p.numel() for p in layer.parameters()) for layer in adapter.layers(model)]
    # a pruned model lists its layers' base indices (a FLAP layer of constants is kept too)
    sources = getattr(pruned.config, "hgsp_source_layers", None) or \
        [lp.index for lp in plan.kept_layers]
    after = {source: sum(p.numel() for p in layer.parameters())
             for source, layer in zip(sources, adapter.layers(pruned))}
    return [(b, after.get(lp.index, 0)) for b, lp in zip(before, plan.layers)]


def _summary(cfg, kind, total, decoder, pruned_total, pruned_decoder, budget, selection, info,
             analysis, rows, timer, cal) -> dict:
    removed = total - pruned_total
    return {
        "base_model": cfg.base_model,
        "base_model_kind": kind,
        "parameters": {
            "base_total": total, "pruned_total": pruned_total, "removed": removed,
            "target_removed": budget, "target_ratio": cfg.pruning_ratio,
            "achieved_ratio_total": removed / total,
            "base_decoder": decoder, "pruned_decoder": pruned_decoder,
            "achieved_ratio_decoder": (decoder - pruned_decoder) / decoder,
        },
        "layers": {
            "base": len(rows),
            "kept": sum(not r["layer_removed"] for r in rows),
            "removed": [r["layer"] for r in rows if r["layer_removed"]],
            "collapsed": selection.collapsed_layers,
            "kept_below_epsilon": selection.kept_below_epsilon,
            "attn_blocks_removed": [r["layer"] for r in rows if r["attn_removed"]],
            "mlp_blocks_removed": [r["layer"] for r in rows if r["mlp_removed"]],
        },
        "method": cfg.method,
        "bias_compensation": uses_compensation(cfg),
        "refit_outputs": uses_refit(cfg),
        "score": {"temperature": info.temperature, "tau": info.tau, "modes": info.modes,
                  # the normalization of the hybrid score (none is used when T = 0)
                  "importance_norm": cfg.resolved_importance_norm if info.temperature else None,
                  "analysis_base_ppl": None if analysis is None else analysis.base_ppl},
        "calibration": None if cal is None else {
            "corpus": cal.origin, "windows": cal.calibration_windows,
            "analysis_windows": cal.analysis_windows, "seq_len": cfg.seq_len},
    }


def _resolved_config(cfg: PruneConfig, device: str, dtype: torch.dtype) -> dict:
    import transformers

    return {"arguments": cfg.to_dict(), "resolved": {"device": device, "dtype": str(dtype)},
            "base_model": {"content_fingerprint": content_fingerprint(cfg.base_model)},
            "versions": {"hgsp": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "processor": platform.machine()}}


def _log_summary(summary: dict) -> None:
    p = summary["parameters"]
    log.info("pruned: %s -> %s parameters (%.2f%% of the total removed, target %.2f%%; "
             "%.2f%% of the decoder layers)", f"{p['base_total']:,}", f"{p['pruned_total']:,}",
             100 * p["achieved_ratio_total"], 100 * p["target_ratio"],
             100 * p["achieved_ratio_decoder"])
    lay = summary["layers"]
    log.info("layers: %d of %d kept; removed %s; attention blocks removed %s; MLP blocks "
             "removed %s", lay["kept"], lay["base"], lay["removed"] or "none",
             lay["attn_blocks_removed"] or "none", lay["mlp_blocks_removed"] or "none")
    log.info("stage times (s): %s", summary.get("timings_s"))
