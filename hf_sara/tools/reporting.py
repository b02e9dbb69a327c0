"""Reports: markdown and CSV tables, matplotlib figures drawn without touching the user's pyplot backend, and output
folders written in one step."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from typing import Any

from ..files.atomic import commit_temporary, temporary_directory


def markdown_table(rows: list[dict[str, object]], float_format: str = ".4f") -> str:
    """A markdown table of `rows` (dicts with the same keys, in column order); floats with four decimals."""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [format(value, float_format) if isinstance(value, float) else str(value) for value in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: str, rows: list[dict[str, object]]) -> None:
    """Writes table rows (dicts with the same keys) as a CSV file with a header."""
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def new_figure(**kwargs: Any):
    """
    A `matplotlib.figure.Figure`, not registered with pyplot: saving it renders with the file format's own canvas,
    so the user's interactive backend (a notebook's, say) is left as it is, and nothing stays open afterwards.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "The figures need matplotlib: `pip install 'hf_sara[analysis]'` (or `pip install matplotlib`)."
        ) from None
    return Figure(**kwargs)


def write_into(output_dir: str, write: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """
    Runs `write(folder)` on a temporary folder beside `output_dir` and moves the files it returns (by kind) into
    `output_dir` only once it succeeded, each flushed to disk and renamed in one step, so a failure leaves no partial
    report (and a kill only a hidden folder that the next report into `output_dir` removes). Returns the final paths by
    kind.
    """
    with temporary_directory(output_dir) as staging:
        paths = write(staging)
        os.makedirs(output_dir, exist_ok=True)
        moved = {}
        for kind, path in paths.items():
            target = os.path.join(output_dir, os.path.relpath(path, staging))
            commit_temporary(path, target)
            moved[kind] = target
        return moved
