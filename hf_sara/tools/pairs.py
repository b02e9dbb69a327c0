"""Building paired datasets from parallel corpora and translated instruction sets."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable

from datasets import Dataset

from ..files.atomic import atomic_write
from ..files.records import read_records, read_text
from ..training.paired_data import (
    DEFAULT_ANCHOR_PREFIX,
    LANGUAGE_COLUMN,
    PROMPT_COMPLETION_FIELDS,
    TEXT_FIELD,
    anchored_rows,
    detect_paired_format,
)


def _read_lines(path: str) -> list[str]:
    return read_text(path).splitlines()


def _text_pair(language: str, text: str, anchor: str | None) -> dict[str, str | None]:
    return {LANGUAGE_COLUMN: language, TEXT_FIELD: text, DEFAULT_ANCHOR_PREFIX + TEXT_FIELD: anchor}


def _is_prompt_completion(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(value.get(name), str) for name in PROMPT_COMPLETION_FIELDS)


def pairs_from_aligned_files(
    source: str, anchor: str, language: str, anchor_language: str | None = None
) -> list[dict[str, str | None]]:
    """
    Text pairs from two line-aligned files: line `i` of `source` (the low-resource language) translates line `i` of
    `anchor`. Empty anchor lines give rows without anchor.

    Raises:
        `ValueError`: when the files have different numbers of lines, a source line is empty, or the pairs would
            anchor a language to itself (`language` is `anchor_language`, or `source` is `anchor`).
    """
    if anchor_language is not None and language == anchor_language:
        raise ValueError(
            f"--language {language} is the anchor language: its items would be anchored to themselves. Give SOURCE's "
            "own language code (or another --anchor-language)."
        )
    if os.path.exists(source) and os.path.exists(anchor) and os.path.samefile(source, anchor):
        raise ValueError(
            f"SOURCE and ANCHOR are the same file ({source}): each line would be anchored to itself. Give the "
            "translation file and its anchor-language original."
        )
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
        rows.append(_text_pair(language, text, anchor_text or None))
    return rows


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
    records = read_records(path)
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
                if not _is_prompt_completion(value):
                    raise ValueError(
                        f"{path}, row {number}, {language}: expected an object with a text prompt and completion."
                    )
                if anchor is not None and not _is_prompt_completion(anchor):
                    raise ValueError(
                        f"{path}, row {number}: the {language} item has prompt/completion but the "
                        f"{anchor_language} anchor does not."
                    )
                rows.append(
                    {
                        LANGUAGE_COLUMN: language,
                        **{name: value[name] for name in PROMPT_COMPLETION_FIELDS},
                        **{
                            DEFAULT_ANCHOR_PREFIX + name: anchor[name] if anchor else None
                            for name in PROMPT_COMPLETION_FIELDS
                        },
                    }
                )
            elif isinstance(value, str):
                if anchor is not None and not isinstance(anchor, str):
                    raise ValueError(f"{path}, row {number}: the {language} text has a non-text anchor.")
                rows.append(_text_pair(language, value, anchor or None))
            else:
                raise ValueError(f"{path}, row {number}, {language}: expected a text or a prompt/completion object.")
    if not rows:
        raise ValueError(f"{path} holds no item in {targets}: there is no pair to write.")
    formats = {"text" if TEXT_FIELD in row else "prompt/completion" for row in rows}
    if len(formats) > 1:
        first = next(index for index, row in enumerate(rows) if (TEXT_FIELD in row) != (TEXT_FIELD in rows[0]))
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


def split_by_item(dataset: Dataset, held_out: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """
    Splits pairs so that all translations of one anchor fall on the same side (no leak across languages); rows
    without an anchor stay on the training side.
    """
    # Keyed by the anchor's first column (its prompt, its text or its messages, as JSON when it is not a text): the
    # same for every translation of one item.
    column = dataset[detect_paired_format(dataset.column_names).anchor_columns[0]]
    keys = [None if value is None else value if isinstance(value, str) else json.dumps(value) for value in column]
    anchors = sorted({key for key in keys if key is not None})
    random.Random(seed).shuffle(anchors)
    test_anchors = set(anchors[: max(1, int(len(anchors) * held_out))])
    is_test = [key in test_anchors for key in keys]
    train = dataset.select([i for i, flag in enumerate(is_test) if not flag])
    test = dataset.select([i for i, flag in enumerate(is_test) if flag])
    return train, test


def count_anchored(rows: list[dict]) -> int:
    """How many of the pair rows have an anchor, read as the trainer reads the paired format."""
    if not rows:
        return 0
    dataset = Dataset.from_list(rows)
    return sum(anchored_rows(dataset, detect_paired_format(dataset.column_names)))
