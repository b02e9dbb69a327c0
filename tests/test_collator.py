"""Unit tests of `SARADataCollator`: the row id of every token, and the anchors' batch, around TRL's collator."""

import pytest
import torch
from datasets import Dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from hf_sara.training.collator import ANCHOR_KEY_PREFIX, ROW_IDS_KEY, AnchorStore, SARADataCollator
from hf_sara.training.paired_data import ROW_COLUMN, TOKEN_ROWS_COLUMN

PAD = 0


def _store() -> AnchorStore:
    store = AnchorStore()
    name, offset = store.reserve("train", 3)
    anchors = Dataset.from_dict({"input_ids": [[9, 9, 9], [8]], ROW_COLUMN: [offset, offset + 2]})
    store.add(name, anchors, languages=["sw", None, "hi"])
    return store


def _examples():
    return [{"input_ids": [1, 2, 3], ROW_COLUMN: 0}, {"input_ids": [4], ROW_COLUMN: 1}]


def test_row_ids_are_laid_out_like_the_padded_input_ids():
    collator = SARADataCollator(DataCollatorForLanguageModeling(pad_token_id=PAD), _store(), False, False)
    batch = collator(_examples())
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert batch[ROW_IDS_KEY].tolist() == [[0, 0, 0], [1, -1, -1]]
    assert not any(key.startswith(ANCHOR_KEY_PREFIX) for key in batch)


def test_padding_free_batches_get_one_row_of_ids():
    base = DataCollatorForLanguageModeling(pad_token_id=PAD, padding_free=True)
    batch = SARADataCollator(base, _store(), True, False)(_examples())
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4]]
    assert batch[ROW_IDS_KEY].tolist() == [[0, 0, 0, 1]]


def test_packed_rows_carry_the_row_of_every_token():
    collator = SARADataCollator(DataCollatorForLanguageModeling(pad_token_id=PAD), _store(), False, False)
    batch = collator([{"input_ids": [1, 2, 3, 4], TOKEN_ROWS_COLUMN: [0, 0, 2, 2]}])
    assert batch[ROW_IDS_KEY].tolist() == [[0, 0, 2, 2]]


def test_anchors_of_the_batch_rows_are_collated_with_their_own_row_ids():
    collator = SARADataCollator(DataCollatorForLanguageModeling(pad_token_id=PAD), _store(), False, True)
    batch = collator([{"input_ids": [1, 2], ROW_COLUMN: 2}, {"input_ids": [3], ROW_COLUMN: 1}, *_examples()[:1]])
    # Rows 0 and 2 have anchors (row 1 has none), collated in row order.
    assert batch[ANCHOR_KEY_PREFIX + "input_ids"].tolist() == [[9, 9, 9], [8, PAD, PAD]]
    assert batch[ANCHOR_KEY_PREFIX + ROW_IDS_KEY].tolist() == [[0, 0, 0], [2, -1, -1]]


def test_store_keeps_languages_and_row_ranges():
    store = _store()
    assert store.languages == ["sw", "hi"] and store.language_of_row == [0, -1, 1]
    assert store.has_anchor(0) and not store.has_anchor(1)
    name, offset = store.reserve("train", 2)
    assert (name, offset) == ("train_1", 3) and store.num_rows == 5


def test_unprepared_examples_are_refused():
    collator = SARADataCollator(DataCollatorForLanguageModeling(pad_token_id=PAD), _store(), False, False)
    with pytest.raises(ValueError, match="not prepared by SARATrainer"):
        collator([{"input_ids": [1, 2]}])


def test_row_ids_are_long_tensors():
    collator = SARADataCollator(DataCollatorForLanguageModeling(pad_token_id=PAD), _store(), False, False)
    assert collator(_examples())[ROW_IDS_KEY].dtype == torch.long


def _bin_collator(features):
    """Concatenates each bin into one row, then pads, as Axolotl's multipack collator does."""
    rows = [{"input_ids": [token for row in bin_ for token in row["input_ids"]]} for bin_ in features]
    return DataCollatorForLanguageModeling(pad_token_id=PAD)(rows)


def test_bins_of_rows_get_the_row_of_every_token_and_their_anchors_a_padded_batch():
    row_collator = DataCollatorForLanguageModeling(pad_token_id=PAD)
    collator = SARADataCollator(_bin_collator, _store(), False, True, row_collator=row_collator)
    bins = [[{"input_ids": [1, 2], ROW_COLUMN: 2}, {"input_ids": [3], ROW_COLUMN: 1}], _examples()[:1]]
    batch = collator(bins)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [1, 2, 3]]
    assert batch[ROW_IDS_KEY].tolist() == [[2, 2, 1], [0, 0, 0]]
    # The anchors (rows 0 and 2) are rows, not bins: the row collator pads them, one sequence per row.
    assert batch[ANCHOR_KEY_PREFIX + "input_ids"].tolist() == [[9, 9, 9], [8, PAD, PAD]]
    assert batch[ANCHOR_KEY_PREFIX + ROW_IDS_KEY].tolist() == [[0, 0, 0], [2, -1, -1]]


def test_bins_without_row_ids_are_refused():
    collator = SARADataCollator(_bin_collator, _store(), False, False)
    with pytest.raises(ValueError, match="not prepared by SARATrainer"):
        collator([[{"input_ids": [1, 2]}]])
