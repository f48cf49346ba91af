"""Evaluation after pruning (perplexity, zero-shot, efficiency)."""

from __future__ import annotations

from .errors import UserError


def check_request(cfg) -> None:
    """Refuse evaluation kinds that this version cannot run, before any work is done."""
    raise UserError("--run_evaluation is not available in this version of hgsp yet: run "
                    "without it")
