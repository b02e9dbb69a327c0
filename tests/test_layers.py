import pytest

from hf_sara import DEFAULT_LAYERS, resolve_layers


@pytest.mark.parametrize(
    "spec, num_layers, expected",
    [
        (None, 48, list(range(7, 35))),  # the published band of Qwen3-30B-A3B
        (DEFAULT_LAYERS, 48, list(range(7, 35))),  # "published": the same band
        ("0.15-0.71", 48, list(range(7, 35))),  # rounded fractions of depth
        ("7-34", 48, list(range(7, 35))),
        ((7 / 48, 34 / 48), 48, list(range(7, 35))),
        ("all", 4, [0, 1, 2, 3]),
        (2, 4, [2]),
        ([3, 1, 1], 4, [1, 3]),
        ("0,2-3", 4, [0, 2, 3]),
        ("0.5", 4, [2]),
        ("0.0-1.0", 4, [0, 1, 2, 3]),
        (None, 32, list(range(5, 24))),  # Phi-3.5-MoE depth
        (None, 4, [1, 2, 3]),
    ],
)
def test_resolve_layers(spec, num_layers, expected):
    assert resolve_layers(spec, num_layers) == expected


def test_numpy_and_torch_integers_are_indices():
    # Were refused as "not integer indices".
    import numpy as np
    import torch

    assert resolve_layers(np.int64(2), 4) == [2]
    assert resolve_layers(torch.tensor(2), 4) == [2]
    assert resolve_layers(torch.tensor([1, 2]), 4) == [1, 2]
    assert resolve_layers(np.array([3, 1]), 4) == [1, 3]
    assert resolve_layers([np.int32(0), torch.tensor(3)], 4) == [0, 3]
    for floats in (torch.tensor([1.0, 2.0]), np.array([0.5])):
        with pytest.raises(ValueError, match="integer MoE-layer indices"):
            resolve_layers(floats, 4)
    with pytest.raises(ValueError, match="boolean|integer MoE-layer indices"):
        resolve_layers([np.bool_(True)], 4)


@pytest.mark.parametrize(
    "spec, message",
    [
        (48, "out of range: the model has 48 MoE layers"),
        ("7-48", "Layer 48 .* out of range"),
        ("0.2-1.5", r"outside \[0, 1\]"),
        ("seven", "Cannot read 'seven'"),
        ("5-2", "ends before it starts"),
        ("1,,2", "empty item"),
        ([1.5], "integer MoE-layer indices"),
        ([True], "integer MoE-layer indices"),
        (True, "boolean"),
    ],
)
def test_resolve_layers_rejects_bad_selections(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_layers(spec, 48)
