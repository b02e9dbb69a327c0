"""Unit tests of `token_segments`: which flattened token is pooled into which sequence."""

import pytest
import torch

from hf_sara.routing.pooling import token_segments


def _tokens_per_segment(segments):
    return [segments.token_index[segments.segment_of_token == s].tolist() for s in range(segments.num_segments)]


def test_each_row_is_one_sequence_and_padding_is_not_pooled():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    segments = token_segments((2, 3), mask)
    assert _tokens_per_segment(segments) == [[0, 1, 2], [3]]
    assert segments.counts.tolist() == [3.0, 1.0]
    assert segments.num_tokens == 6 and segments.sequence_of_segment is None


def test_token_mask_restricts_the_pooled_tokens():
    segments = token_segments((1, 4), token_mask=torch.tensor([[0, 1, 1, 0]]))
    assert _tokens_per_segment(segments) == [[1, 2]]


def test_packed_rows_split_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    segments = token_segments((1, 6), position_ids=positions)
    assert _tokens_per_segment(segments) == [[0, 1, 2], [3, 4], [5]]


def test_sequence_ids_give_the_segments_and_their_ids():
    ids = torch.tensor([[7, 7, 3, 3, 3, -1], [5, 5, -1, -1, -1, -1]])
    segments = token_segments((2, 6), sequence_ids=ids)
    assert _tokens_per_segment(segments) == [[0, 1], [2, 3, 4], [6, 7]]
    assert segments.sequence_of_segment.tolist() == [7, 3, 5]


def test_sequence_ids_drop_sequences_masked_out_entirely():
    ids = torch.tensor([[1, 1, 2, 2]])
    segments = token_segments((1, 4), sequence_ids=ids, token_mask=torch.tensor([[1, 1, 0, 0]]))
    assert segments.sequence_of_segment.tolist() == [1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(attention_mask=torch.tensor([[1, 1], [0, 0]])), r"Row\(s\) \[1\] of the batch have no token"),
        (dict(attention_mask=torch.ones(2, 3)), "must have shape"),
        (dict(position_ids=torch.tensor([[0, 1, 2]])), "give one value per token"),
    ],
)
def test_refusals(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_segments((2, 2), **kwargs)


def test_an_empty_batch_is_refused():
    with pytest.raises(ValueError, match="no token to route"):
        token_segments((2, 0))
