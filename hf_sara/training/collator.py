"""Paired batches: the trainer's own collator for the examples, plus the sequence ids and, when needed, the anchors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset

from .paired_data import ROW_COLUMN, TOKEN_ROWS_COLUMN

ROW_IDS_KEY = "sara_row_ids"  # [batch, seq_len]: the global row id of every token, -1 for padding
ANCHOR_KEY_PREFIX = "sara_anchor__"  # anchor batch tensors, e.g. "sara_anchor__input_ids"


class AnchorStore:
    """
    The prepared (tokenized) anchors of every dataset a trainer prepared, and per-row metadata, by global row id.

    Row ids are global across datasets: each prepared dataset gets the next range of ids.
    """

    def __init__(self):
        self.num_rows = 0
        self.tables: dict[str, Dataset] = {}
        self.offsets: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self._position: dict[int, tuple[str, int]] = {}
        self.languages: list[str] = []
        self.language_of_row: list[int] = []

    def reserve(self, name: str, size: int) -> tuple[str, int]:
        """Reserves `size` row ids for dataset `name`; returns the name it is stored under and its first row id."""
        if name in self.offsets:
            name = f"{name}_{len(self.offsets)}"
        offset = self.num_rows
        self.offsets[name], self.sizes[name] = offset, size
        self.num_rows += size
        self.language_of_row.extend([-1] * size)
        return name, offset

    def add(self, name: str, anchors: Dataset, languages: list[str | None] | None = None) -> None:
        """Registers the prepared anchors of dataset `name` (their `sara_row` column holds global row ids)."""
        self.tables[name] = anchors
        for position, row in enumerate(anchors[ROW_COLUMN]):
            self._position[row] = (name, position)
        if languages is not None:
            offset = self.offsets[name]
            for index, language in enumerate(languages):
                if language is None:
                    continue
                if language not in self.languages:
                    self.languages.append(language)
                self.language_of_row[offset + index] = self.languages.index(language)

    def has_anchor(self, row: int) -> bool:
        return row in self._position

    def anchor(self, row: int) -> dict[str, Any]:
        name, position = self._position[row]
        return self.tables[name][position]


def _row_ids(rows: list[list[int]], width: int, padding_free: bool) -> torch.Tensor:
    """Per-token row ids laid out like the collator lays out `input_ids` (right padding, -1 for padding)."""
    if padding_free:
        flat = [row for sequence in rows for row in sequence]
        ids = torch.full((1, width), -1, dtype=torch.long)
        ids[0, : len(flat)] = torch.tensor(flat, dtype=torch.long)
        return ids
    ids = torch.full((len(rows), width), -1, dtype=torch.long)
    for index, sequence in enumerate(rows):
        ids[index, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    return ids


class SARADataCollator:
    """
    Wraps the trainer's own collator (`DataCollatorForLanguageModeling`, padding-free or not) into a paired one.

    For each batch it adds:

    - `sara_row_ids` (`[batch, seq_len]`): the global row id of every token, -1 for padding, laid out like
      `input_ids` (for padding-free and packed batches, runs of equal ids are the sequences);
    - with `collate_anchors=True`, the batch of the examples' anchors, collated by the same collator (or by
      `row_collator`), under keys `sara_anchor__<name>` (including their own `sara_anchor__sara_row_ids`).

    The examples are either rows, or bins of rows (lists of rows, as Axolotl's multipack sampler hands them to its
    collator, which concatenates each bin into one row of the batch): a bin's row ids are those of its rows in turn.

    Args:
        collator (`Callable`):
            The collator to wrap.
        store ([`AnchorStore`]):
            The prepared anchors.
        padding_free (`bool`):
            Whether `collator` concatenates a batch into one row.
        collate_anchors (`bool`):
            Whether to add the anchors' batch (online anchors, or an SFT loss on the anchors).
        row_collator (`Callable`, *optional*):
            A collator of plain rows into a padded batch, one row per sequence, for the anchors' batch when
            `collator` takes something else (bins). Defaults to `collator`.
    """

    def __init__(
        self,
        collator: Callable,
        store: AnchorStore,
        padding_free: bool,
        collate_anchors: bool,
        row_collator: Callable | None = None,
    ):
        self.collator = collator
        self.store = store
        self.padding_free = padding_free
        self.collate_anchors = collate_anchors
        self.row_collator = row_collator

    @staticmethod
    def _rows_of(example: dict[str, Any]) -> list[int]:
        if TOKEN_ROWS_COLUMN in example:
            return list(example[TOKEN_ROWS_COLUMN])
        return [example[ROW_COLUMN]] * len(example["input_ids"])

    def _token_rows(self, examples: list) -> list[list[int]]:
        if examples and isinstance(examples[0], list):  # bins: each is one row of the batch
            return [[row for example in bin_ for row in self._rows_of(example)] for bin_ in examples]
        return [self._rows_of(example) for example in examples]

    def collate_with_row_ids(
        self, examples: list, collator: Callable | None = None, padding_free: bool | None = None
    ) -> dict[str, Any]:
        """
        The batch of `examples` (prepared rows, or bins of them), plus their `sara_row_ids`: collated by the wrapped
        collator, or by `collator`, which concatenates a batch into one row when `padding_free`.
        """
        token_rows = self._token_rows(examples)
        ours = (ROW_COLUMN, TOKEN_ROWS_COLUMN)

        def strip(example):
            return {key: value for key, value in example.items() if key not in ours}

        stripped = [[strip(row) for row in item] if isinstance(item, list) else strip(item) for item in examples]
        collator = collator or self.collator
        padding_free = self.padding_free if padding_free is None else padding_free
        batch = collator(stripped)
        batch[ROW_IDS_KEY] = _row_ids(token_rows, batch["input_ids"].shape[1], padding_free)
        return batch

    def __call__(self, examples: list) -> dict[str, Any]:
        first = examples[0][0] if isinstance(examples[0], list) else examples[0]
        if ROW_COLUMN not in first and TOKEN_ROWS_COLUMN not in first:
            raise ValueError(
                f"SARADataCollator got examples without a `{ROW_COLUMN}` column: the dataset was not prepared by "
                "SARATrainer (do not pass `dataset_kwargs={'skip_prepare_dataset': True}` with SARA)."
            )
        batch = self.collate_with_row_ids(examples)
        if self.collate_anchors:
            rows = sorted(set(batch[ROW_IDS_KEY][batch[ROW_IDS_KEY] >= 0].tolist()))
            anchors = [self.store.anchor(row) for row in rows if self.store.has_anchor(row)]
            if anchors:
                if self.row_collator is not None:
                    anchor_batch = self.collate_with_row_ids(anchors, self.row_collator, padding_free=False)
                else:
                    anchor_batch = self.collate_with_row_ids(anchors)
                batch.update({ANCHOR_KEY_PREFIX + key: value for key, value in anchor_batch.items()})
        return batch
