"""What hf_sara needs from distributed engines: full parameters however they are sharded, and rows split by rank."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
