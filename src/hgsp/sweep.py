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


def parse_ratios(text: str, flag: str = "--pruning_ratio") -> list[float]:
    """``"0.2,0.3,0.5"`` → ``[0.2, 0.3, 0.5]``; a one-line UserError naming ``flag`` otherwise."""
    try:
        ratios = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag} '{text}' must be a number or a comma-separated list "
                        "such as 0.2,0.3,0.5") from None
    if not ratios:
        raise UserError(f"{flag} needs at least one value")
    if len(set(ratios)) != len(ratios):
        raise UserError(f"{flag} '{text}' lists a ratio twice")
    outside = [r for r in ratios if not 0 < r < 1]
    if outside:
        raise UserError(f"{flag} {outside[0]:g} must be between 0 and 1 (exclusive), e.g. 0.5")
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
