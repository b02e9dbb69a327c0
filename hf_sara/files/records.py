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
            Whether the file is one JSON document (`.json`); otherwise it is JSON lines.
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
    Reads a file of records into a list of dicts: JSON lines (`.jsonl`), a JSON document (`.json`: a list of
    objects, an object of equal-length column lists, or one object; JSON lines named `.json` are read as lines), or a
    table with a header (`.csv`, `.tsv`). A column named twice (a header, an object's keys) is refused.

    Raises:
        `ValueError`: naming the file and the line or item, for an unknown extension, invalid JSON, or a record that
        is not an object with named columns.
    """
    found = record_format(path)
    if found is not None and found.builder == "csv":
        text = read_text(path, newline="")
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=found.delimiter)
        header = reader.fieldnames or []
        twice = sorted({name for name in header if header.count(name) > 1})
        if twice:
            raise ValueError(
                f"{path}: the header names the column(s) {twice} more than once (only the last would be read); give "
                "each column its own name."
            )
        return list(reader)
    if found is None or found.builder != "json":
        raise ValueError(f"Cannot read {path}: expected a .jsonl, .json, .csv or .tsv file.")
    text = read_text(path)
    if found.json_list:
        # A `.json` file is JSON: a list of objects, an object of equal-length columns, or one object; JSON lines
        # named `.json` are read as lines.
        try:
            value = json.loads(text, object_pairs_hook=_object_without_repeated_keys)
        except _RepeatedKeyError as error:
            raise ValueError(f"{path}: {error}") from None
        except json.JSONDecodeError as whole:
            try:
                numbered = _json_lines(path, text)
            except _JSONLinesError as lines:
                if lines.lineno > whole.lineno:
                    raise ValueError(str(lines)) from None
                raise ValueError(f"{path}, line {whole.lineno}: not valid JSON ({whole.msg}).") from None
        else:
            numbered = list(enumerate(_json_records(value), start=1))
    else:
        try:
            numbered = _json_lines(path, text)
        except _JSONLinesError as error:
            raise ValueError(str(error)) from None
    for number, record in numbered:
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}, item {number}: expected a JSON object with named columns, got {type(record).__name__}."
            )
    return [record for _, record in numbered]


class _RepeatedKeyError(ValueError):
    pass


class _JSONLinesError(ValueError):
    def __init__(self, message: str, lineno: int):
        super().__init__(message)
        self.lineno = lineno


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise _RepeatedKeyError(
            f"an object names the key(s) {twice} more than once (only the last would be read); give each its own name"
        )
    return dict(pairs)


def _json_lines(path: str, text: str) -> list[tuple[int, Any]]:
    """The records of JSON lines, numbered by line (1-based, as an editor shows them)."""
    numbered = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                numbered.append((number, json.loads(line, object_pairs_hook=_object_without_repeated_keys)))
            except _RepeatedKeyError as error:
                raise _JSONLinesError(f"{path}, line {number}: {error}.", number) from None
            except json.JSONDecodeError as error:
                raise _JSONLinesError(f"{path}, line {number}: not valid JSON ({error.msg}).", number) from None
    return numbered


def _json_records(value: Any) -> list[Any]:
    """The records of a whole JSON document: a list's items, an object of equal-length column lists, or one object."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and value and all(isinstance(column, list) for column in value.values()):
        lengths = {len(column) for column in value.values()}
        if len(lengths) == 1:
            return [dict(zip(value, row, strict=True)) for row in zip(*value.values(), strict=True)]
    return [value]
