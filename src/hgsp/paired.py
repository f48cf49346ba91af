"""Paired comparison of two models' zero-shot results on the same documents.

Many documents are easy or hard for both of two models, so comparing their accuracies as if
they were independent samples (each with its own standard error) overstates the noise of
their difference. (For the 20% models of the quality benchmark, 500 documents per task, the
paired standard error of the 4-task mean difference is about 0.010, against 0.015 from the
two means' own errors.) Here the difference is measured document by
document: its standard error is that of the mean per-document difference, and each task also
gets McNemar's exact test on the documents only one of the two models got right.

Inputs are the ``zeroshot`` results of :func:`hgsp.zeroshot.run_zeroshot`, whose
``documents`` entry holds per-document outcomes. Pure arithmetic, no torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import UserError


@dataclass(frozen=True)
class PairedTask:
    """One task's paired difference ``a − b`` (in accuracy, 0–1).

    Attributes:
        task: task name.
        n: documents scored by both.
        acc_a: accuracy of model a.
        acc_b: accuracy of model b.
        diff: ``acc_a − acc_b``.
        se: standard error of ``diff`` from the per-document differences.
        only_a: documents right for a and wrong for b.
        only_b: documents right for b and wrong for a.
        p_mcnemar: two-sided exact McNemar p-value (binomial test on ``only_a`` of
            ``only_a + only_b`` at one half).
    """

    task: str
    n: int
    acc_a: float
    acc_b: float
    diff: float
    se: float
    only_a: int
    only_b: int
    p_mcnemar: float


@dataclass(frozen=True)
class PairedMean:
    """The difference of the task means, ``mean_a − mean_b``, over the tasks compared.

    The tasks' documents are disjoint samples, so the variances of their differences add:
    ``se = sqrt(Σ se_t²) / k`` for ``k`` tasks. ``p_normal`` is the two-sided p-value of
    ``diff / se`` under a normal approximation.
    """

    tasks: int
    mean_a: float
    mean_b: float
    diff: float
    se: float
    p_normal: float


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven | no difference)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    # Integer arithmetic: comb(n, i) / 2**n overflows floats for large n as separate terms.
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_task(task: str, a: str, b: str) -> PairedTask:
    """Paired difference of two per-document outcome strings (``"1"`` right, ``"0"`` wrong).

    Raises:
        UserError: the strings differ in length (the runs scored different documents).
    """
    if len(a) != len(b):
        raise UserError(f"zero-shot task {task}: the two results scored {len(a)} and {len(b)} "
                        f"documents: evaluate both models with the same --zeroshot_limit")
    n = len(a)
    if n == 0:
        raise UserError(f"zero-shot task {task}: no documents to compare")
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    mean = (only_a - only_b) / n
    # Sample variance of the per-document differences (values −1, 0, 1: their squares sum
    # to the discordant count).
    var = (only_a + only_b - n * mean * mean) / (n - 1) if n > 1 else 0.0
    return PairedTask(task=task, n=n, acc_a=a.count("1") / n, acc_b=b.count("1") / n,
                      diff=mean, se=math.sqrt(max(var, 0.0) / n), only_a=only_a,
                      only_b=only_b, p_mcnemar=mcnemar_exact(only_a, only_b))


def _outcomes(result: dict, task: str, metric: str, label: str) -> tuple[str, str]:
    """The outcome string of ``task`` under ``metric`` and the hash of its documents."""
    documents = result.get("documents")
    if not documents or task not in documents:
        raise UserError(f"the zero-shot result of {label} has no per-document outcomes for "
                        f"{task}: evaluate it again with this version of hgsp")
    entry = documents[task]
    # Tasks scored with acc only count with their acc under acc_norm (as in mean_acc_norm).
    outcomes = entry.get(metric) or entry.get("acc")
    return outcomes, entry.get("docs_sha256", "")


def merge_results(results: list[dict], labels: list[str]) -> dict:
    """One model's ``zeroshot`` results of separate evaluations, as one result.

    A long task set is often scored in parts (one task in one run, the others in another);
    pairing needs all of a model's tasks in one result. Only ``tasks`` and ``documents`` are
    kept: the means of the parts are not means of the whole.

    Raises:
        UserError: two parts scored the same task (which one counts would be a guess).
    """
    tasks, documents, seen = {}, {}, {}
    for result, label in zip(results, labels):
        for task in result.get("tasks", {}):
            if task in seen:
                raise UserError(f"zero-shot task {task} is in both {seen[task]} and {label}: "
                                f"join only evaluations of different tasks")
            seen[task] = label
            tasks[task] = result["tasks"][task]
            if task in result.get("documents", {}):
                documents[task] = result["documents"][task]
    return {"tasks": tasks, "documents": documents}


def paired_zeroshot(a: dict, b: dict, metric: str = "acc",
                    labels: tuple[str, str] = ("a", "b")) -> dict:
    """Paired comparison of two ``zeroshot`` results on the tasks both scored.

    Args:
        a, b: results of :func:`hgsp.zeroshot.run_zeroshot` (with ``documents``).
        metric: ``"acc"`` or ``"acc_norm"`` (tasks without acc_norm use acc).
        labels: names of the two models in error messages.

    Returns:
        ``{"metric", "tasks": [PairedTask as dict], "mean": PairedMean as dict}``.

    Raises:
        UserError: no common task, results without per-document outcomes, or the two runs
            scored different documents.
    """
    if metric not in ("acc", "acc_norm"):
        raise UserError(f"unknown metric '{metric}': use acc or acc_norm")
    common = [t for t in a.get("tasks", {}) if t in b.get("tasks", {})]
    if not common:
        raise UserError(f"{labels[0]} and {labels[1]} have no zero-shot task in common: "
                        f"evaluate both on the same tasks")
    rows = []
    for task in common:
        out_a, hash_a = _outcomes(a, task, metric, labels[0])
        out_b, hash_b = _outcomes(b, task, metric, labels[1])
        row = paired_task(task, out_a, out_b)  # first: a count mismatch says more
        if hash_a != hash_b:
            raise UserError(f"zero-shot task {task}: {labels[0]} and {labels[1]} scored "
                            f"different documents: evaluate both with the same data and "
                            f"--zeroshot_limit")
        rows.append(row)
    k = len(rows)
    diff = math.fsum(r.diff for r in rows) / k
    se = math.sqrt(math.fsum(r.se ** 2 for r in rows)) / k
    p = math.erfc(abs(diff) / se / math.sqrt(2)) if se > 0 else float(diff == 0)
    mean = PairedMean(tasks=k, mean_a=math.fsum(r.acc_a for r in rows) / k,
                      mean_b=math.fsum(r.acc_b for r in rows) / k, diff=diff, se=se,
                      p_normal=p)
    return {"metric": metric, "tasks": [asdict(r) for r in rows], "mean": asdict(mean)}


def markdown(result: dict, names: tuple[str, str] = ("a", "b")) -> str:
    """The comparison as a Markdown table (accuracies and differences in points, 0–100)."""
    a, b = names
    lines = [f"| task | n | {a} | {b} | {a} − {b} | paired SE | only {a} / only {b} "
             f"| McNemar p |", "|---|---|---|---|---|---|---|---|"]
    for r in result["tasks"]:
        lines.append(f"| {r['task']} | {r['n']} | {100 * r['acc_a']:.1f} | "
                     f"{100 * r['acc_b']:.1f} | {100 * r['diff']:+.1f} | {100 * r['se']:.1f} | "
                     f"{r['only_a']} / {r['only_b']} | {r['p_mcnemar']:.3f} |")
    m = result["mean"]
    lines.append(f"| **mean of {m['tasks']}** | | {100 * m['mean_a']:.2f} | "
                 f"{100 * m['mean_b']:.2f} | **{100 * m['diff']:+.2f}** | {100 * m['se']:.2f} "
                 f"| | p = {m['p_normal']:.3f} (normal) |")
    return "\n".join(lines)


__all__ = ["PairedTask", "PairedMean", "mcnemar_exact", "paired_task", "paired_zeroshot",
           "markdown"]
