"""Building paired datasets from parallel corpora and translated instruction sets."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable

from .files import atomic_write


def _read_text(path: str, newline: str | None = None) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as handle:  # -sig: a leading byte-order mark is dropped
            return handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}). Convert it to UTF-8 first."
        ) from None


def _read_lines(path: str) -> list[str]:
    return _read_text(path).splitlines()


def pairs_from_aligned_files(
    source: str, anchor: str, language: str, anchor_language: str = "en"
) -> list[dict[str, str | None]]:
    """
    Text pairs from two line-aligned files: line `i` of `source` (the low-resource language) translates line `i` of
    `anchor`. Empty anchor lines give rows without anchor.

    Raises:
        `ValueError`: when the files have different numbers of lines, or a source line is empty.
    """
    sources, anchors = _read_lines(source), _read_lines(anchor)
    if len(sources) != len(anchors):
        raise ValueError(
            f"{source} has {len(sources)} lines but {anchor} has {len(anchors)}: aligned files must have one "
            "translation per line."
        )
    if not sources:
        raise ValueError(f"{source} and {anchor} are empty: there is no pair to write.")
    rows = []
    for number, (text, anchor_text) in enumerate(zip(sources, anchors, strict=True), start=1):
        if not text.strip():
            raise ValueError(f"{source}, line {number}: the example is empty. Remove the line from both files.")
        rows.append({"language": language, "text": text, "anchor_text": anchor_text or None})
    return rows


def _records(path: str) -> list[dict]:
    if path.endswith((".tsv", ".csv")):
        text = _read_text(path, newline="")
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.endswith(".tsv") else ","))
    if path.endswith((".jsonl", ".json")):
        text = _read_text(path)
        if path.endswith(".json") and text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
            numbered = list(enumerate(records, start=1))
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
                    f"{path}, item {number}: expected a JSON object with one key per language, got "
                    f"{type(record).__name__}."
                )
        return [record for _, record in numbered]
    raise ValueError(f"Cannot read {path}: expected a .tsv, .csv, .jsonl or .json file.")


def pairs_from_multilingual(
    path: str, anchor_language: str = "en", languages: Iterable[str] | None = None
) -> list[dict[str, object]]:
    """
    Pairs from a file with one column per language (TSV/CSV/JSONL): each row is one item in several languages.

    A language's value is either a text (giving `text`/`anchor_text` pairs) or an object with `prompt` and
    `completion` (a translated instruction set, giving `prompt`/`completion` pairs). Each row yields one pair per
    non-anchor language, with the anchor language's version as its anchor.

    Raises:
        `ValueError`: naming the row, when the anchor language column is missing or a value has the wrong form.
    """
    records = _records(path)
    if not records:
        raise ValueError(f"{path} holds no rows.")
    columns = list(dict.fromkeys(column for record in records for column in record))  # every record's, in order
    if anchor_language not in columns:
        raise ValueError(
            f"{path} has no column for the anchor language {anchor_language!r} (its columns are {columns}). "
            "Pass `--anchor-language` with one of them."
        )
    targets = [c for c in columns if c != anchor_language] if languages is None else list(languages)
    if anchor_language in targets:
        raise ValueError(
            f"--languages includes the anchor language {anchor_language!r}: its items would be anchored to themselves."
        )
    missing = [language for language in targets if language not in columns]
    if missing:
        raise ValueError(f"{path} has no column for {missing} (its columns are {columns}).")
    rows = []
    for number, record in enumerate(records, start=1):
        anchor = record.get(anchor_language)
        for language in targets:
            value = record.get(language)
            if value in (None, ""):
                continue
            if isinstance(value, dict):
                if not {"prompt", "completion"} <= set(value) or not all(
                    isinstance(value[key], str) for key in ("prompt", "completion")
                ):
                    raise ValueError(
                        f"{path}, row {number}, {language}: expected an object with a text prompt and completion."
                    )
                if anchor is not None and not (
                    isinstance(anchor, dict)
                    and {"prompt", "completion"} <= set(anchor)
                    and all(isinstance(anchor[key], str) for key in ("prompt", "completion"))
                ):
                    raise ValueError(
                        f"{path}, row {number}: the {language} item has prompt/completion but the "
                        f"{anchor_language} anchor does not."
                    )
                rows.append(
                    {
                        "language": language,
                        "prompt": value["prompt"],
                        "completion": value["completion"],
                        "anchor_prompt": anchor["prompt"] if anchor else None,
                        "anchor_completion": anchor["completion"] if anchor else None,
                    }
                )
            elif isinstance(value, str):
                if anchor is not None and not isinstance(anchor, str):
                    raise ValueError(f"{path}, row {number}: the {language} text has a non-text anchor.")
                rows.append({"language": language, "text": value, "anchor_text": anchor or None})
            else:
                raise ValueError(f"{path}, row {number}, {language}: expected a text or a prompt/completion object.")
    if not rows:
        raise ValueError(f"{path} holds no item in {targets}: there is no pair to write.")
    formats = {"text" if "text" in row else "prompt/completion" for row in rows}
    if len(formats) > 1:
        first = next(index for index, row in enumerate(rows) if ("text" in row) != ("text" in rows[0]))
        raise ValueError(
            f"{path} mixes texts and prompt/completion objects (pair {first + 1} differs from pair 1): a dataset "
            "holds one format. Split the file by format."
        )
    return rows


def write_jsonl(rows: list[dict], path: str) -> None:
    """Writes rows as JSON lines, atomically: an interrupted write leaves no partial file."""
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as output:
        for row in rows:
            output.write(json.dumps(row, ensure_ascii=False) + "\n")
