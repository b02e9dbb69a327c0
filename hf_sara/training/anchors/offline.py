"""`OfflineAnchors`: the anchors' routing under the model before training, computed once (split across ranks), stored
in one memory-mapped safetensors file and looked up by row."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from torch import nn
from transformers.utils import logging

from ...distributed import deal_batches, rank_batches
from ...routing.capture import capture_routing, eval_mode
from ...routing.loss import check_distributions
from ...routing.patching import get_routing_state
from ...routing.pooling import pooling_token_mask
from ..paired_data import ROW_COLUMN
from .file import AnchorFileWriter, MappedAnchorFile
from .identity import AnchorIdentity, DatasetIdentity, anchor_tokens_digest

logger = logging.get_logger(__name__)

REMOVE_TO_RECOMPUTE = "Remove it to recompute the anchors."


def distributions_key(name: str) -> str:
    """The tensor of a dataset's anchor distributions in an anchors file, `[rows, n_moe_layers, n_experts]`."""
    return f"{name}.distributions"


def flags_key(name: str) -> str:
    """The tensor of a dataset's anchor flags in an anchors file, `[rows]`: which rows have an anchor."""
    return f"{name}.has_anchor"


def _default_collator(model: nn.Module) -> Callable:
    pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None) or 0
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling  # only here: the mixin needs no TRL

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id)


@torch.no_grad()
def _pool_rows(
    model: nn.Module, rows: Dataset, data_collator: Callable, pooling: str, device, layers: int
) -> torch.Tensor:
    """
    Routing distributions `[len(rows), layers, n_experts]` of tokenized rows (the first `layers` MoE layers), from one
    forward that ends after the last of them where it can (see `capture_routing`'s `stop_after`).
    """
    batch = data_collator([{key: row[key] for key in ("input_ids", "labels") if key in row} for row in rows])
    batch = {key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
    token_mask = pooling_token_mask(batch.pop("labels", None), pooling)
    with capture_routing(
        model,
        batch["input_ids"].shape,
        batch.get("attention_mask"),
        batch.get("position_ids"),
        token_mask,
        stop_after=layers - 1,
    ) as capture:
        # Nothing but the routing: no logits beyond one token, no load-balancing loss (which `SFTTrainer` turns on in
        # the config for training) over every layer's logits.
        model(**batch, use_cache=False, logits_to_keep=1, output_router_logits=False)
    return capture.distributions().float()


def _check_computable(model: nn.Module, dataset: Dataset) -> None:
    if get_routing_state(model) is None:
        raise ValueError("Patch the model with `hf_sara.patch_model(model)` before computing anchor distributions.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(
            f"The anchors to compute have no `input_ids` column (columns: {dataset.column_names}): pass tokenized "
            "rows (as `SARATrainer` prepares them), not raw text."
        )


@dataclass
class AnchorTable:
    """
    One dataset's anchors to compute: its prepared anchor rows and where its rows lie among the global row ids.

    Attributes:
        rows ([`~datasets.Dataset`]):
            Tokenized anchors with a `sara_row` column of global row ids (only the rows that have an anchor).
        offset (`int`):
            The dataset's first global row id.
        size (`int`):
            The dataset's number of rows (with or without an anchor).
    """

    rows: Dataset
    offset: int
    size: int
    _digests: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def identity(self, pooling: str) -> DatasetIdentity:
        """The dataset's part of the anchors' identity: its rows and the digest of its anchor tokens (cached)."""
        if pooling not in self._digests:
            self._digests[pooling] = anchor_tokens_digest(self.rows, pooling, self.offset)
        return DatasetIdentity(self.size, self._digests[pooling])

    def anchored_rows(self) -> torch.Tensor:
        """The local indices (global row id minus `offset`) of the rows that have an anchor."""
        return torch.tensor(self.rows[ROW_COLUMN], dtype=torch.long) - self.offset


def _check_finite_routing(pooled: torch.Tensor, row_ids: torch.Tensor, tables: dict[str, AnchorTable]) -> None:
    """Refuses anchors whose routing is not finite: the model's routers score NaN or infinity on them."""
    finite = torch.isfinite(pooled).flatten(1).all(1)
    if bool(finite.all()):
        return
    bad = row_ids[~finite].tolist()
    where = []
    for name, table in tables.items():
        rows = [row - table.offset for row in bad if table.offset <= row < table.offset + table.size]
        if rows:
            where.append(f"row(s) {rows[:10]} of the {name} dataset")
    raise ValueError(
        f"The model's routing of the anchors of {', '.join(where)} is not finite (NaN or infinite router scores), so "
        "no offline anchor can be computed from it: the model's weights hold NaN or infinity (a damaged checkpoint, "
        "an earlier training that diverged). Check the weights you start from."
    )


class OfflineAnchors:
    """
    The offline anchors of a trainer's datasets, read from their memory-mapped file: a process holds only the rows of
    the batches it looks up, never the whole table.

    Create it with [`~OfflineAnchors.compute`] (which writes the file) or [`~OfflineAnchors.load`]; a trainer goes
    through [`~hf_sara.training.anchors.cache.open_offline_anchors`], which decides between the two.

    Args:
        anchors ([`~hf_sara.training.anchors.file.MappedAnchorFile`]):
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

    @property
    def identity(self) -> AnchorIdentity:
        """The identity the file records."""
        return AnchorIdentity.from_metadata(self.file.metadata, self.path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expected: AnchorIdentity,
        tables: dict[str, AnchorTable],
        resuming: bool = False,
    ) -> OfflineAnchors:
        """
        Opens the anchors in `path` after checking that they belong to this run.

        Args:
            path (`str`):
                The anchors file.
            expected ([`AnchorIdentity`]):
                The identity the anchors must have (router checksum, layers, experts, pooling, datasets).
            tables (`dict[str, AnchorTable]`):
                The datasets to look up; the file's flags must mark exactly their anchored rows.
            resuming (`bool`, *optional*, defaults to `False`):
                Whether a resumed run opens them (see [`AnchorIdentity.check_matches`]).

        Raises:
            `ValueError`: when the file is not a complete anchors file or does not match, naming what differs and
            the fix.
        """
        anchors = MappedAnchorFile(path)
        stored = AnchorIdentity.from_metadata(anchors.metadata, anchors.path)
        expected.check_matches(stored, anchors.path, resuming)
        for name, table in tables.items():
            for key in (distributions_key(name), flags_key(name)):
                if key not in anchors.layouts or anchors.shape(key)[0] != table.size:
                    raise ValueError(
                        f"{anchors.path} lacks the tensor {key!r} of {table.size} rows that its metadata promises: "
                        f"the file is damaged. {REMOVE_TO_RECOMPUTE}"
                    )
            cls._check_shape_and_flags(anchors, name, stored, table.anchored_rows())
        return cls(anchors, {name: (table.offset, table.size) for name, table in tables.items()})

    @staticmethod
    def _check_shape_and_flags(
        anchors: MappedAnchorFile, name: str, stored: AnchorIdentity, rows: torch.Tensor
    ) -> None:
        shape = anchors.shape(distributions_key(name))
        flags = anchors.rows(flags_key(name), slice(None))
        layers, experts = stored.layers_held, stored.num_experts
        wrong_shape = len(shape) != 3 or (flags.any() and shape[2] == 0)
        wrong_shape |= len(shape) == 3 and (shape[1] != layers or shape[2] not in (0, experts))
        if wrong_shape:
            raise ValueError(
                f"{anchors.path} holds {name} anchors of shape {list(shape)}, not [rows, {layers} MoE layers, "
                f"{experts} experts] as this run needs: the file is damaged. {REMOVE_TO_RECOMPUTE}"
            )
        wanted = torch.zeros(len(flags), dtype=torch.bool)
        wanted[rows] = True
        if not torch.equal(flags, wanted):
            differ = (flags != wanted).nonzero().flatten().tolist()
            raise ValueError(
                f"{anchors.path} marks other rows of the {name} dataset as anchored than the dataset has (rows "
                f"{differ[:10]}): the file is damaged. {REMOVE_TO_RECOMPUTE}"
            )

    @classmethod
    @torch.no_grad()
    def compute(
        cls,
        model: nn.Module,
        tables: dict[str, AnchorTable],
        path: str | os.PathLike,
        identity: AnchorIdentity,
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
            identity ([`AnchorIdentity`]):
                What identifies the anchors (its `pooling` says which tokens are pooled), stored in the file.
            data_collator (`Callable`, *optional*):
                Collator for the anchor rows; defaults to TRL's `DataCollatorForLanguageModeling`.
            batch_size (`int`, *optional*, defaults to `8`):
                Rows per forward.
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
        if batch_size < 1:
            raise ValueError(f"Anchors are computed in batches of `batch_size` >= 1 rows, not {batch_size}.")
        if num_processes > 1 and gather is None:
            raise ValueError("Computing anchors on several ranks needs a `gather` function (`Accelerator.gather`).")
        for table in tables.values():
            _check_computable(model, table.rows)
        metadata, pooling = identity.to_metadata(), identity.pooling
        data_collator = data_collator or _default_collator(model)
        device = device if device is not None else next(model.parameters()).device
        num_layers = identity.layers_held
        batches = [
            (name, start, min(start + batch_size, len(table.rows)))
            for name, table in tables.items()
            for start in range(0, len(table.rows), batch_size)
        ]

        def pool(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
            name, start, end = batches[batch]
            rows = tables[name].rows.select(range(start, end))
            pooled = _pool_rows(model, rows, data_collator, pooling, device, num_layers)
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
                    pooled, row_ids = round_.values  # gathered on every rank: every rank refuses alike
                    _check_finite_routing(pooled, row_ids, tables)
                    if write:
                        if writer is None:
                            writer = cls._writer(path, tables, metadata, num_layers, pooled.shape[-1])
                        cls._write_rows(writer, tables, pooled.cpu(), row_ids.cpu())
                if write:
                    writer = writer or cls._writer(path, tables, metadata, num_layers, 0)
                    for name, table in tables.items():
                        has_anchor = torch.zeros(table.size, dtype=torch.bool)
                        has_anchor[table.anchored_rows()] = True
                        writer.write(flags_key(name), slice(None), has_anchor)
                    writer.commit()
                    logger.info(f"SARA: computed offline anchors for {list(tables)} and saved them to {path}.")
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
        if wait_for_everyone is not None:
            wait_for_everyone()
        return cls.load(path, identity, tables), computed

    @torch.no_grad()
    def verify(
        self,
        model: nn.Module,
        tables: dict[str, AnchorTable],
        data_collator: Callable | None = None,
        batch_size: int = 8,
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
        held = self.identity
        parameter = next(model.parameters())
        tolerance = 1e-4 if parameter.dtype == torch.float32 else 5e-3
        with eval_mode(model):
            for name, table in tables.items():
                if len(table.rows) == 0:
                    continue
                rows = table.rows.select(range(min(batch_size, len(table.rows))))
                recomputed = _pool_rows(model, rows, data_collator, held.pooling, device, held.layers_held).cpu()
                local = torch.tensor(rows[ROW_COLUMN], dtype=torch.long) - table.offset
                stored = self.file.rows(distributions_key(name), local)
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
            shapes[distributions_key(name)] = ((table.size, num_layers, num_experts), torch.float32)
            shapes[flags_key(name)] = ((table.size,), torch.bool)
        return AnchorFileWriter(path, shapes, metadata)

    @staticmethod
    def _write_rows(writer: AnchorFileWriter, tables, values: torch.Tensor, row_ids: torch.Tensor) -> None:
        for name, table in tables.items():
            selected = (row_ids >= table.offset) & (row_ids < table.offset + table.size)
            if selected.any():
                writer.write(distributions_key(name), row_ids[selected] - table.offset, values[selected])

    def lookup(self, rows: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """
        The anchors of global rows `rows`, read from the file, on the rows' device.

        Args:
            rows (`torch.Tensor`):
                Global row ids, `[n]`.
            shape (`tuple[int, ...]`):
                The examples' distributions' shape, `[n, n_moe_layers, n_experts]`.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: the anchor distributions (zeros for rows without an anchor, and for
            the layers after those the file holds) and the boolean mask of rows that have one.
        """
        rows_on_host = rows.cpu()
        targets = torch.zeros(shape, dtype=torch.float32)
        has_anchor = torch.zeros(rows.shape[0], dtype=torch.bool)
        for name, (offset, size) in self.ranges.items():
            selected = (rows_on_host >= offset) & (rows_on_host < offset + size)
            if not selected.any() or self.file.shape(distributions_key(name))[-1] == 0:
                continue
            local = rows_on_host[selected] - offset
            values = self.file.rows(distributions_key(name), local)
            present = self.file.rows(flags_key(name), local)
            check_distributions(
                values[present],
                f"The {name} anchors in {self.path}",
                "The file is damaged or was not written by hf_sara: remove it to recompute the anchors.",
                row_names=local[present].tolist(),
            )
            targets[selected, : values.shape[1]] = values
            has_anchor[selected] = present
        return targets.to(rows.device, non_blocking=True), has_anchor.to(rows.device, non_blocking=True)

    def table(self, name: str) -> torch.Tensor:
        """
        The whole table of dataset `name`, `[n_rows, layers held, n_experts]` (the first MoE layers, up to the last
        aligned one); this one reads it all.
        """
        return self.file.rows(distributions_key(name), slice(None))
