"""Paired datasets: an example in any format `SFTTrainer` accepts, and its anchor in the same format under a prefix.

The one place that knows the paired format: its columns, which rows have an anchor, how a dataset splits into examples
and anchors, and how a row becomes a pair of plain texts. The trainer, the analysis, the pair builders and the demo
all read it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from datasets import Dataset, IterableDataset

# Columns that hf_sara adds to the datasets it prepares; they survive `Trainer`'s column removal.
ROW_COLUMN = "sara_row"  # global id of the example's row (one id space across train and eval datasets)
TOKEN_ROWS_COLUMN = "sara_token_rows"  # packed datasets: the row id of every token
LANGUAGE_COLUMN = "language"  # optional: the example's language, for per-language logs and analyses
DEFAULT_ANCHOR_PREFIX = "anchor_"  # `SARAConfig.anchor_prefix`: the anchor's columns are the example's under it
PROMPT_COMPLETION_FIELDS = ("prompt", "completion")
MESSAGES_FIELDS = ("messages",)
TOKENIZED_FIELDS = ("input_ids",)
TEXT_FIELD = "text"  # `SFTConfig.dataset_text_field`'s default


@dataclass(frozen=True)
class PairedFormat:
    """
    The dataset format of a paired dataset.

    Attributes:
        fields (`tuple[str, ...]`):
            The example's columns, e.g. `("prompt", "completion")`, `("messages",)`, `("text",)` or, for datasets
            that are already tokenized, `("input_ids",)` (with `labels`/`completion_mask` carried along).
        anchor_prefix (`str`):
            The prefix of the anchor's columns.
        extra_fields (`tuple[str, ...]`):
            Optional columns that travel with each side when present (e.g. `labels` of tokenized datasets).
    """

    fields: tuple[str, ...]
    anchor_prefix: str
    extra_fields: tuple[str, ...] = ()

    @property
    def example_columns(self) -> list[str]:
        return [*self.fields, *self.extra_fields]

    @property
    def anchor_columns(self) -> list[str]:
        return [self.anchor_prefix + name for name in self.example_columns]


def check_paired_dataset(dataset: object, name: str) -> None:
    """
    Refuses a dataset that cannot be paired row by row: an `IterableDataset` (pairs are looked up by row) or an empty
    `Dataset`.

    Raises:
        `ValueError`: naming the dataset (`name`, e.g. "train") and the fix.
    """
    if isinstance(dataset, IterableDataset):
        raise ValueError(
            f"SARATrainer needs a map-style `datasets.Dataset` for the {name} dataset: it pairs each example with its "
            "anchor by row. Materialise the iterable dataset first (e.g. `Dataset.from_generator`)."
        )
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty: pass at least one row (an example and its anchor).")


def _formats(text_field: str) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    return [
        (TOKENIZED_FIELDS, ("labels", "attention_mask", "completion_mask", "assistant_masks")),
        (PROMPT_COMPLETION_FIELDS, ()),
        (MESSAGES_FIELDS, ()),
        ((text_field,), ()),
    ]


def detect_paired_format(
    column_names: list[str], anchor_prefix: str = DEFAULT_ANCHOR_PREFIX, text_field: str = TEXT_FIELD
) -> PairedFormat:
    """
    Works out the format of a paired dataset from its columns, and checks that the anchor uses the same one.

    Args:
        column_names (`list[str]`):
            The dataset's columns.
        anchor_prefix (`str`, *optional*, defaults to `"anchor_"`):
            The prefix of the anchor's columns (`SARAConfig.anchor_prefix`).
        text_field (`str`, *optional*, defaults to `"text"`):
            The language-modeling text column (`SFTConfig.dataset_text_field`).

    Returns:
        [`PairedFormat`]

    Raises:
        `ValueError`: naming the columns and the fix, when the example's format is unknown, the anchor columns are
        missing or incomplete, or the anchor's format differs from the example's.
    """
    columns = set(column_names)
    anchor_columns = {name for name in columns if name.startswith(anchor_prefix)}
    example_columns = columns - anchor_columns
    accepted = " / ".join("+".join(fields) for fields, _ in _formats(text_field)[1:])
    for fields, extras in _formats(text_field):
        if set(fields) <= example_columns:
            anchor_fields = {anchor_prefix + name for name in fields}
            if not anchor_columns:
                raise ValueError(
                    f"The dataset has no anchor columns: with example columns {sorted(fields)}, SARA expects the "
                    f"anchor in {sorted(anchor_fields)} (prefix `anchor_prefix={anchor_prefix!r}`). Add them, with "
                    "None for rows that have no anchor, or set `anchor_prefix` to the prefix your columns use."
                )
            if not anchor_fields <= anchor_columns:
                missing = sorted(anchor_fields - anchor_columns)
                raise ValueError(
                    f"The examples use the columns {sorted(fields)} but the anchor columns are "
                    f"{sorted(anchor_columns)}: {missing} is missing. The anchor must use the same format as the "
                    f"example, under the prefix {anchor_prefix!r} (e.g. convert both sides to the same format)."
                )
            present_extras = tuple(name for name in extras if name in example_columns)
            return PairedFormat(fields, anchor_prefix, present_extras)
    raise ValueError(
        f"Cannot tell the format of the dataset's examples from its columns {sorted(column_names)}. SARA accepts the "
        f"formats SFTTrainer accepts ({accepted}, or tokenized input_ids), with the anchor in the same columns under "
        f"the prefix {anchor_prefix!r}."
    )


def _is_conversational(example: dict) -> bool:
    """TRL's test of a conversational example (imported here: tokenized pairs need no TRL)."""
    from trl.data_utils import is_conversational

    return is_conversational(example)


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def anchored_rows(dataset: Dataset, paired_format: PairedFormat) -> list[bool]:
    """
    Which rows have an anchor, checking that each row's anchor is complete and in the same format as its example.

    Raises:
        `ValueError`: naming the first bad row.
    """
    has_anchor = []
    anchor_fields = [paired_format.anchor_prefix + name for name in paired_format.fields]
    for index, row in enumerate(dataset.select_columns([*paired_format.fields, *anchor_fields])):
        for name in paired_format.fields:
            value = row[name]
            if not isinstance(value, (str, list)):
                kind = "None" if value is None else type(value).__name__
                raise ValueError(
                    f"Row {index}: the example's {name!r} is {kind}, not a text (or messages, or token ids). Every "
                    f"example needs {list(paired_format.fields)}; drop rows without an example."
                )
        if all(_is_missing(row[name]) for name in anchor_fields):
            has_anchor.append(False)
            continue
        # An empty text is a valid part of an anchor (an empty prompt, say); None is not.
        missing = [name for name in anchor_fields if row[name] is None]
        if missing:
            raise ValueError(
                f"Row {index} has an incomplete anchor: {missing} is empty while the other anchor columns are set. "
                "Give the whole anchor, or leave all its columns None for a row without anchor."
            )
        example = {name: row[name] for name in paired_format.fields}
        anchor = {name: row[paired_format.anchor_prefix + name] for name in paired_format.fields}
        if paired_format.fields != TOKENIZED_FIELDS and _is_conversational(example) != _is_conversational(anchor):
            kinds = ("conversational", "plain text")
            raise ValueError(
                f"Row {index}: the example is {kinds[not _is_conversational(example)]} but its anchor is "
                f"{kinds[not _is_conversational(anchor)]}. Both sides must use the same format."
            )
        has_anchor.append(True)
    return has_anchor


def split_pairs(
    dataset: Dataset, paired_format: PairedFormat, has_anchor: list[bool], row_offset: int
) -> tuple[Dataset, Dataset]:
    """
    Splits a paired dataset into its examples and its anchors, both carrying the global row id `sara_row`.

    Returns:
        `tuple[Dataset, Dataset]`: the examples (every row, anchor columns removed, other columns kept) and the anchors
        (the rows that have one, in the example's column names).
    """
    rows = list(range(row_offset, row_offset + len(dataset)))
    anchor_columns = [name for name in paired_format.anchor_columns if name in dataset.column_names]
    examples = dataset.remove_columns(anchor_columns).add_column(ROW_COLUMN, rows)
    anchored = [index for index, flag in enumerate(has_anchor) if flag]
    anchors = (
        dataset.select(anchored)
        .select_columns(anchor_columns)
        .rename_columns({name: name[len(paired_format.anchor_prefix) :] for name in anchor_columns})
        .add_column(ROW_COLUMN, [rows[index] for index in anchored])
    )
    return examples, anchors


def plain_texts(dataset: Dataset, paired_format: PairedFormat, anchors: bool = False) -> list[str]:
    """
    The examples' (or, with `anchors=True`, the anchors') plain texts: `prompt + completion`, or the text column.

    Raises:
        `ValueError`: for conversational or tokenized pairs, which have no plain text without a tokenizer's template.
    """
    prefix = paired_format.anchor_prefix if anchors else ""
    if paired_format.fields == PROMPT_COMPLETION_FIELDS and not _is_conversational(dataset[0]):
        prompts, completions = (dataset[prefix + name] for name in PROMPT_COMPLETION_FIELDS)
        return [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
    if len(paired_format.fields) == 1 and paired_format.fields not in (MESSAGES_FIELDS, TOKENIZED_FIELDS):
        return list(dataset[prefix + paired_format.fields[0]])
    raise ValueError(
        f"This needs plain-text pairs: `prompt`/`completion` and `{paired_format.anchor_prefix}prompt`/"
        f"`{paired_format.anchor_prefix}completion`, or `text` and `{paired_format.anchor_prefix}text`; the dataset "
        f"has {dataset.column_names}."
    )


def languages_of(dataset: Dataset, missing: str | None = None) -> list[str | None]:
    """Each row's language (the `language` column as text), `missing` for rows (or datasets) without one."""
    if LANGUAGE_COLUMN not in dataset.column_names:
        return [missing] * len(dataset)
    return [missing if language is None else str(language) for language in dataset[LANGUAGE_COLUMN]]


def examples_only(dataset: Dataset, paired_format: PairedFormat) -> Dataset:
    """The dataset without its anchors' columns: the examples, as plain SFT trains on them."""
    return dataset.remove_columns([name for name in paired_format.anchor_columns if name in dataset.column_names])


def anchored_subset(dataset: Dataset, paired_format: PairedFormat) -> Dataset:
    """
    The rows that have an anchor (checked as [`anchored_rows`] checks them).

    Raises:
        `ValueError`: when no row has one.
    """
    has_anchor = anchored_rows(dataset, paired_format)
    if not any(has_anchor):
        raise ValueError("No row of the dataset has an anchor to compare with.")
    return dataset.select([index for index, flag in enumerate(has_anchor) if flag])
