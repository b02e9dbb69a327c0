"""Offline anchors: the anchors' routing under the model before training, computed once (split across ranks) and
stored in one memory-mapped safetensors file."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from datasets import Dataset
from safetensors.torch import load_file
from torch import nn
from transformers.utils import logging
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from ..distributed import full_parameters, rank_batches
from ..routing.capture import capture_routing, eval_mode
from ..routing.discovery import PEFT_ADDED_PARAMETER_PARTS
from ..routing.loss import check_distributions
from ..routing.patching import get_routing_state
from .anchor_file import AnchorFileWriter, MappedAnchorFile, read_header
from .paired_data import ROW_COLUMN

logger = logging.get_logger(__name__)

ANCHORS_FORMAT = "hf_sara.training.anchors/1"
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
    SHA-256 of the captured routers' full base weights (adapter weights left out), to recognise the model anchors
    were computed with. Parameters sharded by DeepSpeed ZeRO-3 or FSDP2 are gathered first, so every engine and every
    rank gets the checksum of the same full weights; every rank must call it.
    """
    state = get_routing_state(model)
    if state is None:
        raise ValueError("Patch the model with `hf_sara.patch_model` first.")
    named = []
    for site in state.captured_sites:
        for name, parameter in sorted(model.get_submodule(site.name).named_parameters()):
            if not any(part in name for part in PEFT_ADDED_PARAMETER_PARTS):
                named.append((name, parameter))
    digest = hashlib.sha256()
    with full_parameters([parameter for _, parameter in named]) as values:
        for (name, _), value in zip(named, values, strict=True):
            digest.update(name.encode())
            digest.update(value.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def anchor_tokens_digest(rows: Dataset, pooling: str, offset: int = 0) -> str:
    """
    SHA-256 of what decides a dataset's anchors besides the model: the prepared anchors' token ids, which of the
    dataset's rows they belong to (global row ids minus `offset`: the datasets before it do not matter) and, when the
    pooling depends on them, their labels. It changes with the data, the tokenizer, the chat
    template, `max_length` and truncation; it reads the Arrow buffers, so a million rows take seconds.
    """
    import numpy as np
    import pyarrow.compute as pc

    if getattr(rows, "_indices", None) is not None:  # a selection of another table: hash the rows it selects
        rows = rows.flatten_indices()
    digest = hashlib.sha256()
    columns = ["input_ids", ROW_COLUMN] + (["labels"] if pooling != "all" and "labels" in rows.column_names else [])
    table = rows.data.table if hasattr(rows.data, "table") else rows.data
    for name in columns:
        digest.update(name.encode())
        for chunk in table.column(name).chunks:
            if hasattr(chunk, "flatten"):  # a list column: its lengths, then its values
                digest.update(pc.list_value_length(chunk).to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
                chunk = chunk.flatten()
            values = chunk.to_numpy(zero_copy_only=False).astype(np.int64)
            digest.update((values - offset if name == ROW_COLUMN else values).tobytes())
    return digest.hexdigest()


def _default_collator(model: nn.Module) -> Callable:
    pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id)


@torch.no_grad()
def _pool_rows(model: nn.Module, rows: Dataset, data_collator: Callable, pooling: str, device) -> torch.Tensor:
    """Routing distributions `[len(rows), n_moe_layers, n_experts]` of tokenized rows, from one forward."""
    batch = data_collator([{key: row[key] for key in ("input_ids", "labels") if key in row} for row in rows])
    batch = {key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
    token_mask = pooling_token_mask(batch.pop("labels", None), pooling)
    with capture_routing(
        model, batch["input_ids"].shape, batch.get("attention_mask"), batch.get("position_ids"), token_mask
    ) as capture:
        model(**batch, use_cache=False, logits_to_keep=1)
    return capture.distributions().float()


def _check_computable(model: nn.Module, dataset: Dataset) -> None:
    if get_routing_state(model) is None:
        raise ValueError("Patch the model with `hf_sara.patch_model(model)` before computing anchor distributions.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"The anchors to compute have no `input_ids` column (columns: {dataset.column_names}): pass tokenized "
            "rows (as `SARATrainer` prepares them), not raw text."
        )


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
    Routing distributions of a tokenized dataset under `model` as it is now: the offline anchors of SARA, in one
    process (a trainer splits them across its ranks, see [`OfflineAnchors.compute`]).

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
    _check_computable(model, dataset)
    if len(dataset) == 0:
        raise ValueError("The dataset to compute anchors for is empty: pass at least one tokenized row.")
    data_collator = data_collator or _default_collator(model)
    device = next(model.parameters()).device
    results = []
    with eval_mode(model):
        for start in logging.tqdm(range(0, len(dataset), batch_size), desc=desc):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            results.append(_pool_rows(model, rows, data_collator, pooling, device).cpu())
    return torch.cat(results)


def save_anchor_distributions(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """
    Writes anchor tensors (fp32 distributions, boolean `has_anchor`) and their metadata to a safetensors file,
    atomically (a temporary file renamed into place, so an interrupted write never leaves a half-written file).
    """
    shapes = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}
    with AnchorFileWriter(path, shapes, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, slice(None), tensor)
        writer.commit()


def load_anchor_distributions(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Reads a whole file written by [`save_anchor_distributions`]; returns its tensors and metadata."""
    anchors = MappedAnchorFile(path)
    _check_format(anchors)
    return load_file(os.fspath(path)), anchors.metadata


def _check_format(anchors: MappedAnchorFile) -> None:
    found = anchors.metadata.get("format")
    if found != ANCHORS_FORMAT:
        raise ValueError(
            f"{anchors.path} is not an hf_sara anchors file (format {found!r}, expected {ANCHORS_FORMAT!r})."
        )


@dataclass(frozen=True)
class AnchorTable:
    """One dataset's anchors to compute: its prepared anchor rows and where its rows lie among the global row ids."""

    rows: Dataset  # tokenized anchors with a `sara_row` column of global row ids (only rows that have an anchor)
    offset: int
    size: int


class OfflineAnchors:
    """
    The offline anchors of a trainer's datasets, read from their memory-mapped file: a process holds only the rows of
    the batches it looks up, never the whole table.

    Create it with [`~OfflineAnchors.compute`] (which writes the file) or [`~OfflineAnchors.load`].

    Args:
        anchors ([`~anchor_file.MappedAnchorFile`]):
            The opened file.
        ranges (`dict[str, tuple[int, int]]`):
            Each dataset's first global row id and number of rows.
    """

    def __init__(self, anchors: MappedAnchorFile, ranges: dict[str, tuple[int, int]]):
        self.file = anchors
        self.ranges = dict(ranges)

    @property
    def path(self) -> str:
        return self.file.path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expected: dict[str, str],
        ranges: dict[str, tuple[int, int]],
        fix: str | None = None,
        expected_rows: dict[str, torch.Tensor] | None = None,
    ):
        """
        Opens the anchors in `path` after checking that they belong to this run.

        Args:
            path (`str`):
                The anchors file.
            expected (`dict[str, str]`):
                The metadata the anchors must have (model, router checksum, layers, experts, pooling, datasets).
            ranges (`dict[str, tuple[int, int]]`):
                The datasets to look up: name -> (first global row id, number of rows).
            fix (`str`, *optional*):
                The advice of a mismatch's error, see [`check_anchor_metadata`].
            expected_rows (`dict[str, torch.Tensor]`, *optional*):
                Per dataset, the local indices of the rows that have an anchor: the file's flags must agree.

        Raises:
            `ValueError`: when the file is not a complete anchors file or does not match, naming what differs and
            the fix.
        """
        anchors = MappedAnchorFile(path)
        _check_format(anchors)
        check_anchor_metadata(anchors.path, anchors.metadata, expected, fix)
        for name, (_, size) in ranges.items():
            for key in (f"{name}.distributions", f"{name}.has_anchor"):
                if key not in anchors.layouts or anchors.shape(key)[0] != size:
                    raise ValueError(
                        f"{anchors.path} lacks the tensor {key!r} of {size} rows that its metadata promises: the file "
                        "is damaged. Remove it to recompute the anchors."
                    )
            cls._check_shape_and_flags(anchors, name, expected, (expected_rows or {}).get(name))
        return cls(anchors, ranges)

    @staticmethod
    def _check_shape_and_flags(anchors: MappedAnchorFile, name: str, expected: dict[str, str], rows) -> None:
        shape = anchors.shape(f"{name}.distributions")
        flags = anchors.rows(f"{name}.has_anchor", slice(None))
        layers, experts = expected.get("num_moe_layers", ""), expected.get("num_experts", "")
        wrong_shape = len(shape) != 3 or (flags.any() and shape[2] == 0)
        wrong_shape |= layers.isdigit() and shape[1] != int(layers)
        wrong_shape |= experts.isdigit() and shape[2] not in (0, int(experts))
        if wrong_shape:
            raise ValueError(
                f"{anchors.path} holds {name} anchors of shape {list(shape)}, not [rows, {layers} MoE layers, "
                f"{experts or 'n'} experts] as this run needs: the file is damaged. Remove it to recompute them."
            )
        if rows is not None:
            wanted = torch.zeros(len(flags), dtype=torch.bool)
            wanted[rows] = True
            if not torch.equal(flags, wanted):
                differ = (flags != wanted).nonzero().flatten().tolist()
                raise ValueError(
                    f"{anchors.path} marks other rows of the {name} dataset as anchored than the dataset has (rows "
                    f"{differ[:10]}): the file is damaged. Remove it to recompute the anchors."
                )

    @classmethod
    @torch.no_grad()
    def compute(
        cls,
        model: nn.Module,
        tables: dict[str, AnchorTable],
        path: str | os.PathLike,
        metadata: dict[str, str],
        data_collator: Callable | None = None,
        batch_size: int = 8,
        pooling: str = "all",
        device: torch.device | str | None = None,
        process_index: int = 0,
        num_processes: int = 1,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
        write: bool = True,
        wait_for_everyone: Callable[[], None] | None = None,
    ) -> tuple[OfflineAnchors, int]:
        """
        Computes the anchors' routing with `model` as it is now, the batches dealt round-robin over the ranks, and
        writes them to `path`: the rank that writes takes each round's rows from every rank (`gather`) and puts them
        in place in the file, so no rank ever holds the whole table. Every rank must call it.

        Args:
            model (`torch.nn.Module`):
                The patched model, as the engine prepared it (FSDP2 and ZeRO-3 gather their shards in its forward).
            tables (`dict[str, AnchorTable]`):
                The anchors of each dataset.
            path (`str`):
                The file to write.
            metadata (`dict[str, str]`):
                What identifies the anchors, stored in the file.
            data_collator (`Callable`, *optional*):
                Collator for the anchor rows; defaults to TRL's `DataCollatorForLanguageModeling`.
            batch_size (`int`, *optional*, defaults to `8`):
                Rows per forward.
            pooling (`str`, *optional*, defaults to `"all"`):
                Which tokens are pooled, see [`pooling_token_mask`].
            device (`torch.device`, *optional*):
                Where the batches go; defaults to the device of the model's first parameter.
            process_index (`int`, *optional*, defaults to `0`), num_processes (`int`, *optional*, defaults to `1`):
                This rank and the number of ranks.
            gather (`Callable`, *optional*):
                All-gathers a tensor of the same shape on every rank along dim 0 (`Accelerator.gather`); needed when
                `num_processes > 1`.
            write (`bool`, *optional*, defaults to `True`):
                Whether this rank writes the file (one rank per file system).
            wait_for_everyone (`Callable`, *optional*):
                A barrier, so that no rank opens the file before it is written.

        Returns:
            `tuple[OfflineAnchors, int]`: the anchors, read from the written file, and how many rows this rank
            computed.
        """
        from ..distributed import deal_batches

        if batch_size < 1:
            raise ValueError(f"Anchors are computed in batches of `batch_size` >= 1 rows, not {batch_size}.")
        if num_processes > 1 and gather is None:
            raise ValueError("Computing anchors on several ranks needs a `gather` function (`Accelerator.gather`).")
        for table in tables.values():
            _check_computable(model, table.rows)
        data_collator = data_collator or _default_collator(model)
        device = device if device is not None else next(model.parameters()).device
        num_layers = len(get_routing_state(model).captured_layers)
        batches = [
            (name, start, min(start + batch_size, len(table.rows)))
            for name, table in tables.items()
            for start in range(0, len(table.rows), batch_size)
        ]

        def pool(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
            name, start, end = batches[batch]
            rows = tables[name].rows.select(range(start, end))
            pooled = _pool_rows(model, rows, data_collator, pooling, device)
            return pooled, torch.tensor(rows[ROW_COLUMN], dtype=torch.long, device=pooled.device)

        sizes = [end - start for _, start, end in batches]
        rounds = deal_batches(sizes, pool, process_index, num_processes, gather)  # computed as the loop asks
        total = len(rank_batches(len(batches), num_processes, process_index))
        progress = logging.tqdm(rounds, desc="SARA: offline anchors", total=total, disable=process_index != 0)
        writer = None
        computed = 0
        with eval_mode(model):
            try:
                for round_ in progress:
                    computed += round_.computed
                    if write:
                        pooled, row_ids = round_.values
                        if writer is None:
                            writer = cls._writer(path, tables, metadata, num_layers, pooled.shape[-1])
                        cls._write_rows(writer, tables, pooled.cpu(), row_ids.cpu())
                if write:
                    writer = writer or cls._writer(path, tables, metadata, num_layers, 0)
                    for name, table in tables.items():
                        has_anchor = torch.zeros(table.size, dtype=torch.bool)
                        has_anchor[torch.tensor(table.rows[ROW_COLUMN], dtype=torch.long) - table.offset] = True
                        writer.write(f"{name}.has_anchor", slice(None), has_anchor)
                    writer.commit()
                    logger.info(f"SARA: computed offline anchors for {list(tables)} and saved them to {path}.")
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
        if wait_for_everyone is not None:
            wait_for_everyone()
        ranges = {name: (table.offset, table.size) for name, table in tables.items()}
        return cls.load(path, metadata, ranges), computed

    @torch.no_grad()
    def verify(
        self,
        model: nn.Module,
        tables: dict[str, AnchorTable],
        data_collator: Callable | None = None,
        batch_size: int = 8,
        pooling: str = "all",
        device: torch.device | str | None = None,
    ) -> None:
        """
        Recomputes the first batch of each dataset's anchors with `model` and compares it with the file: anchors of
        another model (other weights anywhere, not only in the routers, another dtype) are refused. The checksum of the
        metadata covers the routers alone, and hashing every weight of a large model at each start would cost minutes;
        one forward does not. Every rank must call it (it runs a forward).

        Raises:
            `ValueError`: naming the file, the largest difference found and the fix.
        """
        data_collator = data_collator or _default_collator(model)
        device = device if device is not None else next(model.parameters()).device
        parameter = next(model.parameters())
        tolerance = 1e-4 if parameter.dtype == torch.float32 else 5e-3
        with eval_mode(model):
            for name, table in tables.items():
                if len(table.rows) == 0:
                    continue
                rows = table.rows.select(range(min(batch_size, len(table.rows))))
                recomputed = _pool_rows(model, rows, data_collator, pooling, device).cpu()
                local = torch.tensor(rows[ROW_COLUMN], dtype=torch.long) - table.offset
                stored = self.file.rows(f"{name}.distributions", local)
                difference = (recomputed - stored).abs().max().item() if stored.numel() else math.inf
                if not difference <= tolerance:
                    raise ValueError(
                        f"The anchors in {self.path} do not belong to this model: recomputing {len(local)} rows of "
                        f"the {name} dataset gives distributions up to {difference:.2g} away from the stored ones "
                        f"(tolerance {tolerance:g}). The model's weights (not only its routers), its dtype or the "
                        "pooling changed since they were computed, e.g. after a first training stage. Remove the file "
                        "to recompute them with this model before training, or point `sara_anchor_path` at anchors "
                        "computed with it."
                    )

    @staticmethod
    def _writer(path, tables: dict[str, AnchorTable], metadata, num_layers: int, num_experts: int) -> AnchorFileWriter:
        shapes = {}
        for name, table in tables.items():
            shapes[f"{name}.distributions"] = ((table.size, num_layers, num_experts), torch.float32)
            shapes[f"{name}.has_anchor"] = ((table.size,), torch.bool)
        return AnchorFileWriter(path, shapes, metadata)

    @staticmethod
    def _write_rows(writer: AnchorFileWriter, tables, values: torch.Tensor, row_ids: torch.Tensor) -> None:
        for name, table in tables.items():
            selected = (row_ids >= table.offset) & (row_ids < table.offset + table.size)
            if selected.any():
                writer.write(f"{name}.distributions", row_ids[selected] - table.offset, values[selected])

    def lookup(self, rows: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The anchors of global rows `rows`, read from the file, on the rows' device.

        Args:
            rows (`torch.Tensor`):
                Global row ids, `[n]`.
            shape (`tuple[int, ...]`):
                The examples' distributions' shape, `[n, n_moe_layers, n_experts]`.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: the anchor distributions (zeros for rows without an anchor) and the
            boolean mask of rows that have one.
        """
        rows_on_host = rows.cpu()
        targets = torch.zeros(shape, dtype=torch.float32)
        has_anchor = torch.zeros(rows.shape[0], dtype=torch.bool)
        for name, (offset, size) in self.ranges.items():
            selected = (rows_on_host >= offset) & (rows_on_host < offset + size)
            if not selected.any() or self.file.shape(f"{name}.distributions")[-1] == 0:
                continue
            local = rows_on_host[selected] - offset
            values = self.file.rows(f"{name}.distributions", local)
            present = self.file.rows(f"{name}.has_anchor", local)
            check_distributions(
                values[present],
                f"The {name} anchors in {self.path}",
                "The file is damaged or was not written by hf_sara: remove it to recompute the anchors.",
                row_names=local[present].tolist(),
            )
            targets[selected] = values
            has_anchor[selected] = present
        return targets.to(rows.device, non_blocking=True), has_anchor.to(rows.device, non_blocking=True)

    def table(self, name: str) -> torch.Tensor:
        """The whole table of dataset `name`, `[n_rows, n_moe_layers, n_experts]` (this one reads it all)."""
        return self.file.rows(f"{name}.distributions", slice(None))


def stored_dataset_names(path: str | os.PathLike) -> list[str]:
    """The datasets whose anchors a file holds, from its header."""
    _, metadata, _ = read_header(os.fspath(path))
    try:
        return sorted(json.loads(metadata.get("datasets", "{}")))
    except json.JSONDecodeError:
        raise ValueError(f"{path} has unreadable metadata: remove it to recompute the anchors.") from None


# Recorded for the reader, not checked: the same model may be named by another path or by its Hub id.
INFORMATIONAL_METADATA = ("model", "revision")

RESUMING_FIX = (
    "A resumed run must use the anchors of its first run: restore the settings (model, data, pooling, tokenizer, "
    "max_length) that run started with, or start a new run from the base model in a new output_dir."
)


def check_anchor_metadata(
    path: str | os.PathLike, metadata: dict[str, str], expected: dict[str, str], fix: str | None = None
) -> None:
    """
    Refuses anchors computed for another model, layer/expert layout, pooling or dataset.

    Args:
        fix (`str`, *optional*):
            The advice to give instead of recomputing the anchors (a resumed run cannot recompute them).

    Raises:
        `ValueError`: naming the first field that differs, both values, and the fix.
    """
    for key, value in expected.items():
        if key in INFORMATIONAL_METADATA:
            continue
        if key == "datasets":
            try:
                stored = json.loads(metadata.get("datasets", "{}"))
                valid = isinstance(stored, dict) and all(isinstance(info, dict) for info in stored.values())
            except json.JSONDecodeError:
                valid = False
            if not valid:
                raise ValueError(f"{path} has unreadable metadata: the file is damaged. Remove it to recompute them.")
            # The train dataset first: when it differs, the eval datasets' differences follow from it.
            for name, info in sorted(json.loads(value).items(), key=lambda item: (item[0] != "train", item[0])):
                if name not in stored:
                    raise ValueError(
                        f"The anchors in {path} hold no dataset {name!r} (they hold {sorted(stored)}). Remove the "
                        "file to recompute them, or pass the datasets they were computed for."
                    )
                if stored[name] != info:
                    what = (
                        f"{stored[name].get('rows')} rows there, {info.get('rows')} here"
                        if stored[name].get("rows") != info.get("rows")
                        else "other anchor tokens (other data, tokenizer, chat template, max_length or truncation)"
                    )
                    raise ValueError(
                        f"The anchors in {path} were computed for another {name} dataset: {what}. "
                        + (
                            fix
                            or "Remove the file to recompute them, or restore the settings they were computed with."
                        )
                    )
            continue
        if key == "router_checksum" and metadata.get(key) != value:
            raise ValueError(
                f"The anchors in {path} were computed with other router weights: another model, or this one before "
                "training (offline anchors come from the untrained model, and a trained model does not tell which "
                "model it started from). "
                + (
                    fix
                    or "If this model is the untrained one, remove the file to recompute them with it; to measure a "
                    "trained model, use `hf-sara analyze` (base vs adapter) or `sara_anchor_mode='online'`."
                )
            )
        if metadata.get(key) != value:
            raise ValueError(
                f"The anchors in {path} do not match this run: {key} is {metadata.get(key)!r} there but {value!r} "
                "here. Anchors are only valid for the model (before training), layers, experts and pooling they were "
                "computed with: "
                + (fix or "remove the file to recompute them, or point `sara_anchor_path` at matching anchors.")
            )
