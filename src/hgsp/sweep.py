"""Several pruning ratios from one scoring pass.

The importances and the removal analysis do not depend on the ratio, so after the first run
they come from the cache (:mod:`hgsp.cache`) and each further ratio costs only selection,
surgery and saving.
"""

from __future__ import annotations

import dataclasses
import logging

from .config import PruneConfig
from .errors import UserError
from .pipeline import PruneResult, prune
from .save import ResultsDir

log = logging.getLogger(__name__)


def parse_ratios(text: str) -> list[float]:
    """``"0.2,0.3,0.5"`` → ``[0.2, 0.3, 0.5]``; a one-line UserError otherwise."""
    try:
        ratios = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--pruning_ratio '{text}' must be a number or a comma-separated list "
                        "such as 0.2,0.3,0.5") from None
    if not ratios:
        raise UserError("--pruning_ratio needs at least one value")
    if len(set(ratios)) != len(ratios):
        raise UserError(f"--pruning_ratio '{text}' lists a ratio twice")
    return ratios


def sweep_configs(cfg: PruneConfig, ratios: list[float]) -> list[PruneConfig]:
    """One config per ratio; with several, each result folder is named ``NAME_r{ratio}``."""
    if len(ratios) == 1:
        return [dataclasses.replace(cfg, pruning_ratio=ratios[0])]
    if not cfg.cache:
        raise UserError("a list of ratios shares one scoring pass through the cache: drop "
                        "--no-cache or give one ratio")
    return [dataclasses.replace(cfg, pruning_ratio=r, output_name=f"{cfg.output_name}_r{r:g}")
            for r in ratios]


def prune_sweep(cfg: PruneConfig, ratios: list[float]) -> list[PruneResult]:
    """Validate every run and its results folder first, then run them in order."""
    configs = sweep_configs(cfg, ratios)
    for c in configs:
        c.validate()
        ResultsDir(c.results_dir, c.output_name, c.overwrite).check()
    results = []
    for c in configs:
        log.info("ratio %g -> %s", c.pruning_ratio, c.output_name)
        results.append(prune(c))
    return results
