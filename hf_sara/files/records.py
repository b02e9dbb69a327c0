"""Record files: which format a file is in (from its extension), JSON lines, JSON lists of objects and CSV/TSV tables
read into dicts, and UTF-8 text."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecordFormat:
    """
    How one kind of record file is read.

    Args:
        builder (`str`):
            The `datasets` builder that loads it: `"json"`, `"csv"` or `"parquet"`.
        delimiter (`str`, *optional*):
            A table's column separator.
        json_list (`bool`, *optional*, defaults to `False`):
            Whether a file starting with `[` is one JSON list of objects (`.json`); otherwise it is JSON lines.
    """

    builder: str
    delimiter: str | None = None
    json_list: bool = False


# The record files hf_sara reads, by extension: `load_dataset_dict` loads them all, `read_records` all but Parquet.
RECORD_FORMATS = {
    "json": RecordFormat("json", json_list=True),
    "jsonl": RecordFormat("json"),
    "parquet": RecordFormat("parquet"),
    "csv": RecordFormat("csv", ","),
    "tsv": RecordFormat("csv", "\t"),
}


def record_format(path: str) -> RecordFormat | None:
    """The format of a record file, from its extension ([`RECORD_FORMATS`]), or `None` for another extension."""
    return RECORD_FORMATS.get(path.rsplit(".", 1)[-1].lower())


def read_text(path: str, newline: str | None = None) -> str:
    """Reads a UTF-8 text file, dropping a leading byte-order mark (spreadsheets write one)."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}). Convert it to UTF-8 first."
        ) from None


def read_records(path: str) -> list[dict[str, Any]]:
    """
    Reads a file of records into a list of dicts: JSON lines (`.jsonl`, or `.json` not starting with `[`), a JSON
    list of objects (`.json`), or a table with a header (`.csv`, `.tsv`).

    Raises:
        `ValueError`: naming the file and the line or item, for an unknown extension, invalid JSON, or a record that
        is not an object with named columns.
    """
    found = record_format(path)
    if found is not None and found.builder == "csv":
        text = read_text(path, newline="")
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=found.delimiter))
    if found is None or found.builder != "json":
        raise ValueError(f"Cannot read {path}: expected a .jsonl, .json, .csv or .tsv file.")
    text = read_text(path)
    if found.json_list and text.lstrip().startswith("["):
        try:
            numbered = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
    for number, record in numbered:
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}, item {number}: expected a JSON object with named columns, got {type(record).__name__}."
            )
    return [record for _, record in numbered]
