"""The files shipped inside the `hf_sara` package: sample data, evaluation files, harness task templates."""

from __future__ import annotations

import os


def package_data_path(*parts: str) -> str:
    """The path of a file shipped inside the `hf_sara` package (e.g. `package_data_path("data", "x.jsonl")`)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), *parts)
