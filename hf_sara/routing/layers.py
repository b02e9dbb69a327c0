"""Which MoE layers SARA aligns: parsing of the layer selections users write."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence

# The published setup aligns decoder layers 7..34 (inclusive) of Qwen3-30B-A3B's 48 MoE layers. Expressed as fractions
# of depth, so that it means the same middle band for a model of any depth.
PUBLISHED_BAND = (7 / 48, 34 / 48)
# The one default: the published band at any depth (`None` means the same). Layers round(7/48 * n) to round(34/48 * n).
DEFAULT_LAYERS = "published"

LayerSelection = str | int | float | Sequence[int] | tuple[float, float] | None


def _as_index(value: object) -> int | None:
    """An integer index (`int`, NumPy integers, a one-element integer tensor: anything with `__index__` but a boolean),
    else `None`."""
    if isinstance(value, (bool, str)) or type(value).__name__ == "bool_":
        return None
    try:
        return operator.index(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _fraction_to_index(fraction: float, num_layers: int) -> int:
    # Round half up, so that 7/48 and "0.15" both land on layer 7 of 48, and 34/48 and "0.71" on layer 34.
    return min(num_layers - 1, int(math.floor(fraction * num_layers + 0.5)))


def _check_index(index: int, num_layers: int, spec: object) -> int:
    if not 0 <= index < num_layers:
        raise ValueError(
            f"Layer {index} in the layer selection {spec!r} is out of range: the model has {num_layers} MoE layers, "
            f"so indices go from 0 to {num_layers - 1}. Use indices in that range, an inclusive range such as "
            f"'0-{num_layers - 1}', fractions of depth such as '0.15-0.71', 'published' or 'all'."
        )
    return index


def _parse_fraction(text: str, spec: object) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"The fraction {text} in the layer selection {spec!r} is outside [0, 1]. Fractions of depth must lie "
            "between 0 (first MoE layer) and 1 (last MoE layer)."
        )
    return value


def _parse_part(part: str, num_layers: int, spec: object) -> Iterable[int]:
    part = part.strip()
    if not part:
        raise ValueError(f"The layer selection {spec!r} has an empty item; write e.g. '7-34' or '0,2,5'.")
    start_text, dash, end_text = part.partition("-")
    is_fraction = "." in part
    try:
        if not dash:
            if is_fraction:
                return [_fraction_to_index(_parse_fraction(part, spec), num_layers)]
            return [_check_index(int(part), num_layers, spec)]
        if is_fraction:
            start = _fraction_to_index(_parse_fraction(start_text, spec), num_layers)
            end = _fraction_to_index(_parse_fraction(end_text, spec), num_layers)
        else:
            start = _check_index(int(start_text), num_layers, spec)
            end = _check_index(int(end_text), num_layers, spec)
    except ValueError as error:
        if "layer selection" in str(error):
            raise
        raise ValueError(
            f"Cannot read {part!r} in the layer selection {spec!r}. Write layer indices ('7'), inclusive ranges "
            "('7-34'), fractions of depth ('0.15-0.71'), comma-separated combinations of these, 'published' or 'all'."
        ) from None
    if start > end:
        raise ValueError(f"The range {part!r} in the layer selection {spec!r} ends before it starts.")
    return range(start, end + 1)


def resolve_layers(layers: LayerSelection, num_layers: int) -> list[int]:
    """
    Turns a layer selection into sorted, unique MoE-layer indices.

    Indices count **MoE layers** (the routers in the order the forward runs them, i.e. the index along dimension 1 of
    [`routing_distributions`]), not decoder layers. They are the same for models whose every decoder layer is sparse,
    such as Qwen3-30B-A3B; for models with dense layers in between (`first_k_dense_replace`, `decoder_sparse_step`,
    `mlp_only_layers`) see [`RouterSite.decoder_layer`] for the decoder layer of each MoE layer.

    Args:
        layers (`str`, `int`, `Sequence[int]`, `tuple[float, float]` or `None`):
            - `"published"` ([`DEFAULT_LAYERS`]) or `None`: the published band, layers 7..34 of 48, i.e. layers
              `round(7/48 * num_layers)` to `round(34/48 * num_layers)` at any depth.
            - `"all"`: every MoE layer.
            - an `int` or a sequence of `int`: those indices (NumPy integers and integer tensors count as `int`).
            - a string of comma-separated items, each an index (`"7"`), an inclusive range of indices (`"7-34"`), a
              fraction of depth (`"0.5"`) or an inclusive range of fractions (`"0.15-0.71"`). A fraction `f` selects
              layer `round(f * num_layers)`, capped at the last layer.
            - a pair of floats: an inclusive range of fractions.
        num_layers (`int`):
            The number of MoE layers of the model.

    Returns:
        `list[int]`: the selected MoE-layer indices, sorted and unique.

    Raises:
        `ValueError`: when an index is out of range, a fraction lies outside [0, 1], the text cannot be read, or the
        selection is empty.
    """
    if num_layers <= 0:
        raise ValueError(f"Cannot select layers of a model with {num_layers} MoE layers.")
    spec = layers
    if layers is None or (isinstance(layers, str) and layers.strip().lower() == DEFAULT_LAYERS):
        start, end = PUBLISHED_BAND
        selected: Iterable[int] = range(_fraction_to_index(start, num_layers), _fraction_to_index(end, num_layers) + 1)
    elif isinstance(layers, bool):
        raise ValueError(f"A layer selection cannot be a boolean, got {layers!r}.")
    elif (index := _as_index(layers)) is not None:  # an int, a NumPy integer, a 0-d integer tensor
        selected = [_check_index(index, num_layers, spec)]
    elif isinstance(layers, float):
        selected = [_fraction_to_index(_parse_fraction(str(layers), spec), num_layers)]
    elif isinstance(layers, str):
        if layers.strip().lower() == "all":
            selected = range(num_layers)
        else:
            selected = [index for part in layers.split(",") for index in _parse_part(part, num_layers, spec)]
    elif isinstance(layers, tuple) and len(layers) == 2 and all(isinstance(x, float) for x in layers):
        selected = _parse_part(f"{layers[0]!r}-{layers[1]!r}", num_layers, spec)
    else:
        try:
            items = list(layers)
        except TypeError:
            raise ValueError(f"Cannot read the layer selection {layers!r}.") from None
        indices = [_as_index(x) for x in items]
        if any(index is None for index in indices):
            raise ValueError(f"A list of layers must hold integer MoE-layer indices, got {layers!r}.")
        selected = [_check_index(index, num_layers, spec) for index in indices]
    result = sorted(set(selected))
    if not result:
        raise ValueError(f"The layer selection {spec!r} selects no layer of a model with {num_layers} MoE layers.")
    return result
