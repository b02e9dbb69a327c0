"""Unit tests of the paired dataset format: detection, anchored rows, the split into examples and anchors, texts."""

import pytest
from datasets import Dataset

from hf_sara.training.paired_data import (
    ROW_COLUMN,
    anchored_rows,
    detect_paired_format,
    languages_of,
    plain_texts,
    split_pairs,
)


@pytest.mark.parametrize(
    "columns, fields, extras",
    [
        (["prompt", "completion", "anchor_prompt", "anchor_completion"], ("prompt", "completion"), ()),
        (["messages", "anchor_messages", "language"], ("messages",), ()),
        (["text", "anchor_text"], ("text",), ()),
        (["input_ids", "labels", "anchor_input_ids", "anchor_labels"], ("input_ids",), ("labels",)),
    ],
)
def test_every_sft_format_is_detected(columns, fields, extras):
    paired_format = detect_paired_format(columns)
    assert paired_format.fields == fields and paired_format.extra_fields == extras
    assert paired_format.anchor_columns == ["anchor_" + name for name in (*fields, *extras)]


def test_a_custom_prefix_and_text_field():
    paired_format = detect_paired_format(["body", "en_body"], anchor_prefix="en_", text_field="body")
    assert paired_format.fields == ("body",) and paired_format.anchor_columns == ["en_body"]


@pytest.mark.parametrize(
    "columns, message",
    [
        (["prompt", "completion"], "has no anchor columns"),
        (["prompt", "completion", "anchor_prompt"], r"\['anchor_completion'\] is missing"),
        (["question", "anchor_question"], "Cannot tell the format"),
    ],
)
def test_bad_columns_are_refused_with_the_fix(columns, message):
    with pytest.raises(ValueError, match=message):
        detect_paired_format(columns)


def _pairs():
    return Dataset.from_dict(
        {
            "prompt": ["a", "b", "c"],
            "completion": ["1", "2", "3"],
            "anchor_prompt": ["A", None, ""],
            "anchor_completion": ["one", None, "three"],
            "language": ["sw", None, "hi"],
        }
    )


def test_anchored_rows_reads_missing_anchors_and_empty_parts():
    dataset = _pairs()
    # Row 1 has no anchor (all None); row 2's empty prompt is a valid part of an anchor.
    assert anchored_rows(dataset, detect_paired_format(dataset.column_names)) == [True, False, True]


def test_anchored_rows_refuses_incomplete_anchors_and_missing_examples():
    incomplete = _pairs().map(
        lambda row, i: {"anchor_completion": None if i == 0 else row["anchor_completion"]}, with_indices=True
    )
    with pytest.raises(ValueError, match="Row 0 has an incomplete anchor"):
        anchored_rows(incomplete, detect_paired_format(incomplete.column_names))
    no_example = _pairs().map(lambda row, i: {"prompt": None if i == 2 else row["prompt"]}, with_indices=True)
    with pytest.raises(ValueError, match="Row 2: the example's 'prompt' is None"):
        anchored_rows(no_example, detect_paired_format(no_example.column_names))


def test_split_pairs_keeps_global_row_ids_on_both_sides():
    dataset = _pairs()
    paired_format = detect_paired_format(dataset.column_names)
    examples, anchors = split_pairs(dataset, paired_format, anchored_rows(dataset, paired_format), row_offset=10)
    assert examples[ROW_COLUMN] == [10, 11, 12]
    assert "anchor_prompt" not in examples.column_names and "language" in examples.column_names
    assert anchors.column_names == ["prompt", "completion", ROW_COLUMN]
    assert anchors[ROW_COLUMN] == [10, 12] and anchors["completion"] == ["one", "three"]


def test_plain_texts_and_languages():
    dataset = _pairs().select([0, 2])
    paired_format = detect_paired_format(dataset.column_names)
    assert plain_texts(dataset, paired_format) == ["a1", "c3"]
    assert plain_texts(dataset, paired_format, anchors=True) == ["Aone", "three"]
    assert languages_of(_pairs(), missing="unknown") == ["sw", "unknown", "hi"]
    assert languages_of(dataset.remove_columns("language")) == [None, None]


def test_plain_texts_refuses_conversations():
    dataset = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "x"}]], "anchor_messages": [[{"role": "user", "content": "y"}]]}
    )
    with pytest.raises(ValueError, match="plain-text pairs"):
        plain_texts(dataset, detect_paired_format(dataset.column_names))
