"""The evaluation report: accuracy tables per language and per subject category, the chart, and the files written."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from ...files.names import safe_file_name
from ...training.paired_data import LANGUAGE_COLUMN
from ..reporting import markdown_table, new_figure, write_csv
from .scores import LanguageScore


def accuracy_table(scores: Mapping[str, Mapping[str, LanguageScore]]) -> list[dict[str, object]]:
    """One row per language: its item count and each model's score, plus `delta` (last minus first) for two models."""
    names = list(scores)
    first = scores[names[0]]
    rows = []
    for language, score in first.items():
        row: dict[str, object] = {LANGUAGE_COLUMN: language, "metric": score.metric, "items": score.items}
        for name in names:
            row[name] = scores[name][language].score
        if len(names) == 2:
            row["delta"] = scores[names[1]][language].score - scores[names[0]][language].score
        rows.append(row)
    return rows


def category_table(scores: Mapping[str, Mapping[str, LanguageScore]]) -> list[dict[str, object]]:
    """One row per language and subject category, for the sources whose items name a category."""
    names = list(scores)
    rows = []
    for language, score in scores[names[0]].items():
        for category, (items, _) in score.categories.items():
            row: dict[str, object] = {LANGUAGE_COLUMN: language, "category": category, "items": items}
            for name in names:
                row[name] = scores[name][language].categories[category][1]
            rows.append(row)
    return rows


def plot_accuracy(scores: Mapping[str, Mapping[str, LanguageScore]], path: str) -> None:
    """Grouped bar chart: per language, one bar per model."""
    names = list(scores)
    languages = list(scores[names[0]])
    width = 0.8 / len(names)
    figure = new_figure(figsize=(1.2 + 1.1 * len(languages) * max(1, len(names) / 2), 3.6))
    axis = figure.subplots()
    for index, name in enumerate(names):
        positions = [position + (index - (len(names) - 1) / 2) * width for position in range(len(languages))]
        values = [scores[name][language].score for language in languages]
        bars = axis.bar(positions, values, width=width, label=name)
        axis.bar_label(bars, labels=[f"{value:.2f}" for value in values], fontsize="x-small", padding=2)
    axis.set_xticks(range(len(languages)), languages)
    axis.set_ylim(0, 1.08)
    axis.set_ylabel(scores[names[0]][languages[0]].metric)
    axis.set_title("Accuracy per language")
    axis.grid(axis="y", alpha=0.3)
    if len(names) > 1:
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_eval_report(
    scores: Mapping[str, Mapping[str, LanguageScore]], output_dir: str, summaries: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """
    Writes `accuracy.md` and `accuracy.csv` (per language; per category too when the items have one),
    `accuracy_by_category.csv`, `accuracy.png` and, when given, the harness's results per model as
    `lm_eval_results_<model>.json` into `output_dir`. Returns the paths by kind.
    """
    os.makedirs(output_dir, exist_ok=True)
    rows = accuracy_table(scores)
    categories = category_table(scores)
    paths = {
        "markdown": os.path.join(output_dir, "accuracy.md"),
        "csv": os.path.join(output_dir, "accuracy.csv"),
        "chart": os.path.join(output_dir, "accuracy.png"),
    }
    with open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write("Accuracy per language (lm-evaluation-harness):\n\n" + markdown_table(rows) + "\n")
        if categories:
            handle.write("\nPer subject category:\n\n" + markdown_table(categories) + "\n")
    write_csv(paths["csv"], rows)
    if categories:
        paths["categories"] = os.path.join(output_dir, "accuracy_by_category.csv")
        write_csv(paths["categories"], categories)
    plot_accuracy(scores, paths["chart"])
    for name, summary in (summaries or {}).items():
        key = "results_" + safe_file_name(name)
        paths[key] = os.path.join(output_dir, f"lm_eval_{key}.json")
        with open(paths[key], "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, default=str)
    return paths
