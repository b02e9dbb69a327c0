"""Checkpoints: which one a run can resume from (saved to the end, within the run's steps), and what it holds."""

from __future__ import annotations

import json
import os
import re

from transformers.utils import logging

logger = logging.get_logger(__name__)


def _checkpoint_is_complete(path: str) -> bool:
    # Trainer writes trainer_state.json last (after the model, optimizer, scheduler and RNG states), not atomically.
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def _check_within_max_steps(path: str, max_steps: int) -> None:
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
        step = json.load(handle).get("global_step", 0)
    if max_steps > 0 and step > max_steps:
        raise ValueError(
            f"{path} is at step {step}, beyond this run's max_steps={max_steps}: it belongs to another (longer) run "
            "in this output_dir. Resume from a checkpoint of this run by path, or train in a new output_dir."
        )


def complete_checkpoint(
    resume_from_checkpoint: str | bool | None, output_dir: str, max_steps: int = -1, required: bool = True
) -> str | None:
    """
    Resolves `Trainer.train`'s `resume_from_checkpoint` to a checkpoint that was saved to the end. transformers writes
    checkpoints in place, so a run killed while saving leaves a `checkpoint-N` without (or with half) its
    `trainer_state.json`, which `resume_from_checkpoint=True` would pick and fail on: the last complete one is taken
    instead, with a warning. An explicit path to an incomplete checkpoint is refused.

    Raises:
        `ValueError`: for an incomplete checkpoint given by path, or when `True` finds no complete one (unless
        `required=False`: then `None`, to start from the beginning).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() == "true":
        resume_from_checkpoint = True  # as the command line spells it
    if resume_from_checkpoint is True:
        pattern = re.compile(r"^checkpoint-(\d+)$")
        found = sorted(
            (int(match.group(1)), name)
            for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
            if (match := pattern.match(name)) and os.path.isdir(os.path.join(output_dir, name))
        )
        incomplete = []
        for _, name in reversed(found):
            path = os.path.join(output_dir, name)
            if _checkpoint_is_complete(path):
                _check_within_max_steps(path, max_steps)
                if incomplete:
                    logger.warning(
                        f"hf_sara: skipping incomplete checkpoint(s) {incomplete} (a run was stopped while saving "
                        f"them); resuming from {name}."
                    )
                return path
            incomplete.append(name)
        if not required:
            return None
        raise ValueError(
            f"No complete checkpoint in {output_dir} to resume from"
            + (f" ({', '.join(incomplete)} were cut short while saving)" if incomplete else "")
            + ": train from the start (`resume_from_checkpoint=None`)."
        )
    path = os.fspath(resume_from_checkpoint)
    if os.path.isdir(path) and _checkpoint_is_complete(path):
        _check_within_max_steps(path, max_steps)
    if os.path.isdir(path) and not _checkpoint_is_complete(path):
        raise ValueError(
            f"The checkpoint {path} is incomplete: its trainer_state.json is missing or cut short (the run was "
            "stopped while saving it). Resume from an earlier checkpoint, or pass `resume_from_checkpoint=True` to "
            "take the last complete one."
        )
    return path


def checkpoint_weight_names(checkpoint: str) -> set[str] | None:
    """The tensor names a checkpoint folder's safetensors weights hold (single file or sharded), or `None`."""
    single = os.path.join(checkpoint, "model.safetensors")
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as handle:
            return set(handle.keys())
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return set(json.load(handle)["weight_map"])
    return None
