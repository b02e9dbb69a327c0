"""Local multiple-choice evaluation files: the Global-MMLU and M3KE schemas, validated row by row."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ...files.package_data import package_data_path
from ...files.records import read_records

ANSWER_LETTERS = ("A", "B", "C", "D")
EVAL_DATA_DIR = package_data_path("data", "eval")


@dataclass(frozen=True)
class EvalSchema:
    """
    The columns of one multiple-choice file format.

    Args:
        name (`str`): the format's name, also the name of its harness task template in `hf_sara/eval_tasks/`.
        options (`tuple[str, ...]`): the four option columns, in the order of the letters A to D.
        category_columns (`tuple[str, ...]`): optional columns used to group accuracy, most specific last.
    """

    name: str
    options: tuple[str, ...]
    category_columns: tuple[str, ...] = ()

    @property
    def required(self) -> tuple[str, ...]:
        return ("question", *self.options, "answer")


GLOBAL_MMLU = EvalSchema(
    "global_mmlu", ("option_a", "option_b", "option_c", "option_d"), ("subject_category", "subject")
)
M3KE = EvalSchema("m3ke", ANSWER_LETTERS, ("subject",))
SCHEMAS = {schema.name: schema for schema in (GLOBAL_MMLU, M3KE)}


class EvalFileError(ValueError):
    """A local evaluation file that cannot be evaluated; the message names the file, the row and the fix."""


def read_rows(path: str) -> list[dict[str, Any]]:
    """Reads a `.jsonl`, `.json` (a list of objects) or `.csv`/`.tsv` file into a list of dicts."""
    if not os.path.isfile(path):
        raise EvalFileError(f"evaluation file {path} not found")
    try:
        rows = read_records(path)
    except ValueError as error:
        raise EvalFileError(str(error)) from None
    if not rows:
        raise EvalFileError(f"{path} has no questions")
    return rows


def detect_schema(rows: list[dict[str, Any]], path: str) -> EvalSchema:
    """The schema whose option columns the file uses: `option_a..option_d` (Global-MMLU) or `A..D` (M3KE)."""
    columns = set().union(*(row.keys() for row in rows))
    for schema in SCHEMAS.values():
        if columns & set(schema.options):
            return schema
    raise EvalFileError(
        f"{path}: no option columns found (it has {sorted(columns)}); expected the Global-MMLU schema "
        "(question, option_a, option_b, option_c, option_d, answer[, subject]) or the M3KE schema "
        "(question, A, B, C, D, answer)"
    )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def validate_rows(rows: list[dict[str, Any]], schema: EvalSchema, path: str) -> list[dict[str, Any]]:
    """
    Checks every row and returns them with the answer normalized (surrounding spaces removed). Refuses, naming the
    row (1-based, as in the file), a missing or empty question or option, and an answer other than A, B, C or D.
    """
    checked = []
    for number, row in enumerate(rows, start=1):
        for column in schema.required:
            if column not in row:
                raise EvalFileError(
                    f"{path}, row {number}: missing column {column!r} (the {schema.name} schema needs "
                    f"{', '.join(schema.required)})"
                )
            if _is_missing(row[column]):
                raise EvalFileError(f"{path}, row {number}: column {column!r} is empty")
        answer = str(row["answer"]).strip()
        if answer not in ANSWER_LETTERS:
            raise EvalFileError(
                f"{path}, row {number}: answer {row['answer']!r} is not one of A, B, C, D "
                "(write the letter of the correct option, e.g. 0 -> A)"
            )
        checked.append({**row, "answer": answer})
    return checked


def load_eval_file(path: str) -> tuple[EvalSchema, list[dict[str, Any]]]:
    """Reads, detects the schema of, and validates a local evaluation file."""
    rows = read_rows(path)
    schema = detect_schema(rows, path)
    return schema, validate_rows(rows, schema, path)


def sample_eval_files() -> dict[str, str]:
    """The tiny sample files shipped with the package, by language: Global-MMLU `en` and `sw`, M3KE `zh`."""
    return {
        "en": os.path.join(EVAL_DATA_DIR, "global_mmlu_en.jsonl"),
        "sw": os.path.join(EVAL_DATA_DIR, "global_mmlu_sw.jsonl"),
        "zh": os.path.join(EVAL_DATA_DIR, "m3ke_zh.jsonl"),
    }
