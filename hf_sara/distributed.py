"""What hf_sara needs from distributed engines: full parameters however they are sharded, and batches dealt to ranks
and gathered back."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import nn


def _is_zero3_partitioned(parameter: torch.Tensor) -> bool:
    return hasattr(parameter, "ds_id")  # DeepSpeed ZeRO-3 marks the parameters it partitions


def has_sharded_parameters(model: nn.Module) -> bool:
    """
    Whether an engine shards `model`'s parameters (DeepSpeed ZeRO-3, FSDP2 `DTensor`s, FSDP1 flat parameters): their
    full values exist only while the engine gathers them, around the module's own forward and backward.
    """
    parameter = next(model.parameters(), None)
    return parameter is not None and (
        _is_zero3_partitioned(parameter) or type(parameter).__name__ in ("DTensor", "FlatParameter")
    )


@contextlib.contextmanager
def full_parameters(parameters: list[nn.Parameter]) -> Iterator[list[torch.Tensor]]:
    """
    Yields the full values of `parameters`, whichever engine shards them: DeepSpeed ZeRO-3 partitions are gathered
    (they are empty placeholders outside the engine's forward), FSDP2 `DTensor`s are all-gathered; other parameters
    are yielded as they are.

    Every rank must enter it with the same parameters, in the same order (it runs collectives).
    """
    partitioned = [parameter for parameter in parameters if _is_zero3_partitioned(parameter)]
    gathering = contextlib.nullcontext()
    if partitioned:
        import deepspeed

        gathering = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    with gathering, torch.no_grad():
        values = []
        for parameter in parameters:
            value = parameter.detach()
            if hasattr(value, "full_tensor"):  # a DTensor: FSDP2 shards, or tensor parallelism
                value = value.full_tensor()
            values.append(value)
        yield values


def rank_batches(num_batches: int, num_processes: int, process_index: int) -> list[int | None]:
    """
    The batches (by index) a rank computes when `num_batches` are dealt round-robin over `num_processes` ranks, padded
    with `None` so that every rank runs the same number of rounds: sharded engines (FSDP, ZeRO-3) gather parameters in
    every forward, so a rank that stopped early would leave the others waiting.
    """
    rounds = -(-num_batches // num_processes) if num_batches else 0
    batches = [round_ * num_processes + process_index for round_ in range(rounds)]
    return [batch if batch < num_batches else None for batch in batches]


class GatheredRound(NamedTuple):
    """
    One round of [`deal_batches`]: the rows every rank computed in it, gathered.

    Attributes:
        batches (`list[int]`):
            The round's batches, in order: `values` holds their rows, batch after batch.
        values (`tuple[torch.Tensor, ...]`):
            What `compute` returned for each of those batches, concatenated along dim 0, padding dropped.
        computed (`int`):
            How many of those rows this rank computed (0 when it ran a batch only to keep in step).
    """

    batches: list[int]
    values: tuple[torch.Tensor, ...]
    computed: int


def deal_batches(
    batch_rows: Sequence[int],
    compute: Callable[[int], tuple[torch.Tensor, ...]],
    process_index: int = 0,
    num_processes: int = 1,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[GatheredRound]:
    """
    Deals batches round-robin over the ranks (see [`rank_batches`]), and yields every round's results gathered from
    all ranks: every rank gets every row, in the batches' order, one round at a time (so that a caller can write each
    round away instead of holding the whole table). On one process it yields each batch's own results.

    A rank with no batch left in the last round computes batch 0 again and drops it: sharded engines (FSDP, ZeRO-3)
    gather parameters in every forward, so every rank must run the same number of them. Each round's results are
    padded to the largest batch before the gather (it needs the same shape on every rank) and the padding removed
    after it. Every rank must iterate over it to the end (it runs collectives).

    Args:
        batch_rows (`Sequence[int]`):
            The number of rows of each batch; the same on every rank.
        compute (`Callable[[int], tuple[torch.Tensor, ...]]`):
            Computes a batch by its index: tensors whose dim 0 has one entry per row of the batch, whose other dims
            are the same on every rank, on the device `gather` works on.
        process_index (`int`, *optional*, defaults to `0`), num_processes (`int`, *optional*, defaults to `1`):
            This rank and the number of ranks.
        gather (`Callable`, *optional*):
            All-gathers a tensor of the same shape on every rank along dim 0, in rank order (`Accelerator.gather`);
            needed when `num_processes > 1`.

    Yields:
        [`GatheredRound`]: one per round.
    """
    if num_processes > 1 and gather is None:
        raise ValueError("Dealing batches to several ranks needs a `gather` function (`Accelerator.gather`).")
    size = max(batch_rows, default=0)
    for round_, batch in enumerate(rank_batches(len(batch_rows), num_processes, process_index)):
        computed = batch if batch is not None else 0  # a rank with no batch left runs batch 0 again, then drops it
        values = tuple(compute(computed))
        if any(value.shape[0] != batch_rows[computed] for value in values):
            raise RuntimeError(
                f"Batch {computed} has {batch_rows[computed]} rows, but `compute` returned tensors of "
                f"{[value.shape[0] for value in values]} rows."
            )
        first = round_ * num_processes
        batches = list(range(first, min(first + num_processes, len(batch_rows))))  # the round's, in rank order
        if num_processes > 1:
            padded = []
            for value in values:
                padding = value.new_zeros(size - value.shape[0], *value.shape[1:])
                padded.append(gather(torch.cat([value, padding])))
            # Rank r's rows are at [r * size, r * size + its batch's rows): the rest is padding, or a batch run twice.
            keep = torch.zeros(num_processes, size, dtype=torch.bool)
            for rank, dealt in enumerate(batches):
                keep[rank, : batch_rows[dealt]] = True
            values = tuple(value[keep.flatten().to(value.device)] for value in padded)
        yield GatheredRound(batches, values, batch_rows[batch] if batch is not None else 0)


def forget_zero3_trace(engine: nn.Module) -> None:
    """
    Makes a DeepSpeed ZeRO-3 engine record its parameter-fetch trace afresh at the next forward, as a new engine does.

    ZeRO-3 records the order in which the first forward runs the submodules and prefetches parameters by it. A forward
    run outside training (the offline anchors: eval mode, the LM head called as a module) would become that trace;
    measured with DeepSpeed 0.19.8 and TRL 1.16, the first training backward then found TRL's fused LM head weight
    released (`The size of tensor a (0) must match the size of tensor b ...`) after an odd number of such forwards.
    No-op for anything that is not a ZeRO-3 engine.
    """
    optimizer = getattr(engine, "optimizer", None)
    offload = getattr(optimizer, "parameter_offload", None) or optimizer
    coordinator = offload.get_param_coordinator() if hasattr(offload, "get_param_coordinator") else None
    if coordinator is not None and hasattr(coordinator, "_invalidate_trace") and not coordinator.is_invalid_trace():
        coordinator._invalidate_trace()  # the next forward's reset_step() switches to recording
