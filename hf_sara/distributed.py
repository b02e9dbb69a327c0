"""What hf_sara needs from distributed engines: full parameters however they are sharded, and rows split by rank."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _is_zero3_partitioned(parameter: torch.Tensor) -> bool:
    return hasattr(parameter, "ds_id")  # DeepSpeed ZeRO-3 marks the parameters it partitions


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
