"""Where a run's offline anchors come from: its cache file, checked against the run, or a new computation; and when
neither is allowed."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn
from transformers.utils import logging

from ...distributed import forget_zero3_trace
from .file import read_header
from .identity import AnchorIdentity
from .offline import AnchorTable, OfflineAnchors

logger = logging.get_logger(__name__)

ANCHORS_FILE_NAME = "sara_anchors.safetensors"


def default_anchor_path(output_dir: str | os.PathLike) -> str:
    """The file a run caches its offline anchors in when `sara_anchor_path` is unset."""
    return os.path.join(os.fspath(output_dir), ANCHORS_FILE_NAME)


def _stored_datasets(path: str) -> list[str]:
    """The datasets whose anchors the file at `path` holds, from its header."""
    _, metadata, _ = read_header(path)
    return sorted(AnchorIdentity.from_metadata(metadata, path).datasets)


def open_offline_anchors(
    model: nn.Module,
    tables: dict[str, AnchorTable],
    path: str | os.PathLike,
    identity: AnchorIdentity,
    *,
    trained: bool = False,
    path_given: bool = False,
    may_create: bool = False,
    data_collator: Callable | None = None,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    write: bool = True,
    wait_for_everyone: Callable[[], None] | None = None,
) -> tuple[OfflineAnchors, int]:
    """
    Opens the offline anchors of every dataset in `tables`: the cache policy of a run.

    - `path` holds anchors of every dataset: they are opened after checking that they belong to this run (`identity`)
      and, before training, that one recomputed batch per dataset matches them (weights outside the routers and the
      dtype are not in the checksum).
    - Otherwise they are computed with `model` as it is now, the rows split across the ranks, and written to `path`
      once, unless that is not allowed: a trained or resumed model (`trained`: offline anchors belong to the model
      before training), or an explicit `sara_anchor_path` (`path_given`) that is missing or lacks a dataset, unless
      `may_create` (what `hf-sara anchors` does).

    Every rank must call it: it runs forwards (sharded engines gather parameters in them) and collectives.

    Args:
        model (`torch.nn.Module`):
            The patched model, as the engine prepared it.
        tables (`dict[str, AnchorTable]`):
            Every dataset's prepared anchors.
        path (`str`):
            The anchors file.
        identity ([`AnchorIdentity`]):
            What the anchors of `tables` must be: see [`AnchorIdentity.of`].
        trained (`bool`, *optional*, defaults to `False`):
            Whether the model trained already (or resumes from a checkpoint).
        path_given (`bool`, *optional*, defaults to `False`):
            Whether `path` was asked for explicitly (`sara_anchor_path`) rather than being the run's cache.
        may_create (`bool`, *optional*, defaults to `False`):
            Whether an explicit `path` may be created.
        data_collator, batch_size, device, process_index, num_processes, gather, write, wait_for_everyone:
            How to compute them, see [`OfflineAnchors.compute`].

    Returns:
        `tuple[OfflineAnchors, int]`: the anchors, and how many rows this rank computed (0 when they were read).

    Raises:
        `ValueError`: naming the file, what is wrong and the fix, when the anchors can be neither read nor computed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"`sara_anchor_path={path!r}` is a folder, not an anchors file: point it at a file, e.g. "
            f"{default_anchor_path(path)!r} (`hf-sara anchors` writes one), or leave it unset to cache the anchors in "
            "output_dir."
        )
    compute_options = {"data_collator": data_collator, "batch_size": batch_size, "device": device}
    lacking = []
    if os.path.exists(path):
        lacking = [name for name in tables if name not in _stored_datasets(path)]
        if not lacking:
            anchors = OfflineAnchors.load(path, identity, tables, resuming=trained)
            if not trained:  # a trained model's routing differs from its anchors by design
                anchors.verify(model, tables, **compute_options)
                forget_zero3_trace(model)
            logger.info(f"SARA: loaded offline anchors for {list(tables)} from {path}.")
            return anchors, 0
    if trained:
        problem = (
            f"{path} holds no anchors for the {', '.join(lacking)} dataset(s)" if lacking else f"{path} does not exist"
        )
        raise ValueError(
            f"Offline anchors are missing and cannot be computed now: {problem}, and they must come from the model "
            "before training, not from this trained or resumed one. Pass every eval dataset to the trainer before "
            "`train()` (their anchors are computed with the train anchors), put back the anchors file of the first "
            "run (or pass it as `sara_anchor_path`), compute them on the base model with `hf-sara anchors`, or use "
            "`sara_anchor_mode='online'`."
        )
    if path_given and (lacking or not may_create):
        problem = f"holds no anchors for the {', '.join(lacking)} dataset(s)" if lacking else "does not exist"
        raise ValueError(
            f"`sara_anchor_path={path!r}` {problem}. Compute the anchors of every dataset with `hf-sara anchors` "
            "(eval splits too), or leave `sara_anchor_path` unset to compute them here."
        )
    if lacking:
        logger.warning(f"SARA: {path} holds no anchors for {lacking}; recomputing the anchors of every dataset.")
    anchors, computed = OfflineAnchors.compute(
        model,
        tables,
        path,
        identity,
        **compute_options,
        process_index=process_index,
        num_processes=num_processes,
        gather=gather,
        write=write,
        wait_for_everyone=wait_for_everyone,
    )
    forget_zero3_trace(model)
    logger.info(f"SARA: this rank computed {computed} anchor rows of {sum(len(t.rows) for t in tables.values())}.")
    return anchors, computed
