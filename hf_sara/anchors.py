"""Offline anchors: the anchors' routing under the model before training, computed once and stored in safetensors."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import logging
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .capture import capture_routing
from .collator import SEQUENCE_IDS_KEY
from .patching import get_routing_state

logger = logging.get_logger(__name__)

ANCHORS_FORMAT = "hf_sara.anchors/1"
ANCHORS_FILE_NAME = "sara_anchors.safetensors"


def pooling_token_mask(labels: torch.Tensor | None, pooling: str) -> torch.Tensor | None:
    """
    Which tokens a pooling mode pools, from a batch's `labels` (-100 where the SFT loss ignores a token).

    Args:
        labels (`torch.Tensor` or `None`):
            The batch's labels.
        pooling (`str`):
            `"all"` (every real token), `"completion"` (tokens in the SFT loss) or `"prompt"` (real tokens out of it).

    Returns:
        `torch.Tensor` or `None`: a boolean mask of the batch's shape, or `None` for `"all"`.
    """
    if pooling == "all":
        return None
    if labels is None:
        raise ValueError(f"`sara_pooling={pooling!r}` needs the batch's labels to tell prompt from completion.")
    return labels != -100 if pooling == "completion" else labels == -100


def router_checksum(model: nn.Module) -> str:
    """
    SHA-256 of the captured routers' base weights (adapter weights left out), to recognise the model anchors were
    computed with.
    """
    state = get_routing_state(model)
    if state is None:
        raise ValueError("Patch the model with `hf_sara.patch_model` first.")
    digest = hashlib.sha256()
    for site in state.captured_sites:
        for name, parameter in sorted(model.get_submodule(site.name).named_parameters()):
            if "lora_" in name or "modules_to_save." in name:
                continue
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def compute_anchor_distributions(
    model: nn.Module,
    dataset: Dataset,
    data_collator: Callable | None = None,
    batch_size: int = 8,
    pooling: str = "all",
    desc: str = "Computing anchor routing",
) -> torch.Tensor:
    """
    Routing distributions of a tokenized dataset under `model` as it is now: the offline anchors of SARA.

    Runs the model in eval mode without gradient, and without building the logits (`logits_to_keep=1`).

    Args:
        model (`torch.nn.Module`):
            A model patched with [`patch_model`].
        dataset ([`~datasets.Dataset`]):
            Tokenized rows, with `input_ids` and, for `pooling` other than `"all"`, `labels`.
        data_collator (`Callable`, *optional*):
            Collator for the rows; defaults to TRL's `DataCollatorForLanguageModeling` (right padding).
        batch_size (`int`, *optional*, defaults to `8`):
            Rows per forward.
        pooling (`str`, *optional*, defaults to `"all"`):
            Which tokens are pooled, see [`pooling_token_mask`].
        desc (`str`, *optional*):
            Progress bar label.

    Returns:
        `torch.Tensor` of shape `[len(dataset), n_moe_layers, n_experts]`, fp32, on the CPU.
    """
    if get_routing_state(model) is None:
        raise ValueError("Patch the model with `hf_sara.patch_model(model)` before computing anchor distributions.")
    if data_collator is None:
        pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
        data_collator = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
    columns = [name for name in ("input_ids", "labels") if name in dataset.column_names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows_to_pool = dataset.select_columns(columns)
    results = []
    try:
        for start in logging.tqdm(range(0, len(dataset), batch_size), desc=desc):
            rows = rows_to_pool.select(range(start, min(start + batch_size, len(dataset))))
            batch = data_collator(list(rows))
            batch.pop(SEQUENCE_IDS_KEY, None)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            labels = batch.pop("labels", None)
            token_mask = pooling_token_mask(labels, pooling)
            input_ids = batch["input_ids"]
            with capture_routing(
                model, input_ids.shape, batch.get("attention_mask"), batch.get("position_ids"), token_mask
            ) as capture:
                model(**batch, use_cache=False, logits_to_keep=1)
            results.append(capture.distributions().cpu())
    finally:
        model.train(was_training)
    return torch.cat(results) if results else torch.empty(0)


def save_anchor_distributions(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """
    Writes anchor tensors and their metadata to a safetensors file, atomically (a temporary file renamed into place,
    so an interrupted write never leaves a half-written file).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(handle)
    try:
        save_file({key: value.contiguous() for key, value in tensors.items()}, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load_anchor_distributions(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a file written by [`save_anchor_distributions`]; returns its tensors and metadata."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != ANCHORS_FORMAT:
        raise ValueError(
            f"{path} is not an hf_sara anchors file (format {metadata.get('format')!r}, expected {ANCHORS_FORMAT!r})."
        )
    return load_file(os.fspath(path)), metadata


def check_anchor_metadata(path: str | os.PathLike, metadata: dict[str, str], expected: dict[str, str]) -> None:
    """
    Refuses anchors computed for another model, layer/expert layout, pooling or dataset.

    Raises:
        `ValueError`: naming the first field that differs, both values, and the fix.
    """
    for key, value in expected.items():
        if key == "datasets":
            stored = json.loads(metadata.get("datasets", "{}"))
            for name, info in json.loads(value).items():
                if name not in stored:
                    raise ValueError(
                        f"The anchors in {path} hold no dataset {name!r} (they hold {sorted(stored)}). Remove the "
                        "file to recompute them, or pass the datasets they were computed for."
                    )
                if stored[name] != info:
                    raise ValueError(
                        f"The anchors in {path} were computed for another {name!r} dataset ({stored[name]}), not this "
                        f"one ({info}). Remove the file to recompute them for this dataset."
                    )
            continue
        if metadata.get(key) != value:
            raise ValueError(
                f"The anchors in {path} do not match this run: {key} is {metadata.get(key)!r} there but {value!r} "
                "here. Anchors are only valid for the model (before training), layers, experts and pooling they were "
                "computed with: remove the file to recompute them, or point `sara_anchor_path` at matching anchors."
            )
