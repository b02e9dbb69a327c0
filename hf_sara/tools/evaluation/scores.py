"""Scores: the accuracy per language (and per subject category) read from the harness's per-item samples."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .sources import EvalSource

PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "f1")


@dataclass
class LanguageScore:
    """Accuracy of one model on one language: overall and per subject category (when the items have one)."""

    metric: str
    items: int
    score: float
    categories: dict[str, tuple[int, float]] = field(default_factory=dict)


def _leaf_tasks(task: str, group_subtasks: Mapping[str, list[str]]) -> list[str]:
    if task not in group_subtasks:
        return [task]
    return [leaf for child in group_subtasks[task] for leaf in _leaf_tasks(child, group_subtasks)]


def _primary_metric(sample: Mapping[str, Any]) -> str:
    for metric in PRIMARY_METRICS:
        if metric in sample:
            return metric
    metrics = sample.get("metrics") or []
    if metrics:
        return metrics[0]
    raise ValueError(f"no metric found in the harness's samples (keys: {sorted(sample)})")


def _category(doc: Mapping[str, Any]) -> str | None:
    for column in ("subject_category", "subject"):
        value = doc.get(column)
        if isinstance(value, str) and value:
            return value
    return None


def scores_from_results(results: Mapping[str, Any], sources: Sequence[EvalSource]) -> dict[str, LanguageScore]:
    """
    Accuracy per language from the per-item samples of `lm_eval.simple_evaluate(..., log_samples=True)`: the mean of
    the primary metric (`acc` for multiple choice, `exact_match` for generation) over every item of the source's
    leaf tasks, with the first filter of a task when it has several; per subject category as well.
    """
    group_subtasks = results.get("group_subtasks", {})
    scores = {}
    for source in sources:
        values: list[float] = []
        by_category: dict[str, list[float]] = defaultdict(list)
        metric = None
        for leaf in _leaf_tasks(source.task, group_subtasks):
            samples = results["samples"].get(leaf, [])
            if not samples:
                continue
            first_filter = samples[0].get("filter")
            for sample in samples:
                if sample.get("filter") != first_filter:
                    continue
                metric = metric or _primary_metric(sample)
                value = float(sample[metric])
                values.append(value)
                category = _category(sample.get("doc", {}))
                if category is not None:
                    by_category[category].append(value)
        if not values:
            raise ValueError(f"the harness returned no scored items for {source.task!r} ({source.language})")
        scores[source.language] = LanguageScore(
            metric=metric,
            items=len(values),
            score=sum(values) / len(values),
            categories={name: (len(v), sum(v) / len(v)) for name, v in sorted(by_category.items())},
        )
    return scores
