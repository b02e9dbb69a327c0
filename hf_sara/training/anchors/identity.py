"""What identifies a file of offline anchors: the model's routers, their layout, the pooling, each dataset's tokens."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from datasets import Dataset
from torch import nn

from ...compat import checksum_of_rank_zero
from ...distributed import full_parameters
from ...routing.discovery import PEFT_ADDED_PARAMETER_PARTS
from ...routing.families import num_experts
from ...routing.patching import get_routing_state
from ..paired_data import ROW_COLUMN

ANCHORS_FORMAT = "hf_sara.training.anchors/1"


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
    return checksum_of_rank_zero(digest.hexdigest())


def anchor_tokens_digest(rows: Dataset, pooling: str, offset: int = 0) -> str:
    """
    SHA-256 of what decides a dataset's anchors besides the model: the prepared anchors' token ids, which of the
    dataset's rows they belong to (global row ids minus `offset`: the datasets before it do not matter) and, when the
    pooling depends on them, their labels. It changes with the data, the tokenizer, the chat template, `max_length`
    and truncation; it reads the Arrow buffers, so a million rows take seconds.
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


@dataclass(frozen=True)
class DatasetIdentity:
    """One dataset's part of an anchors file's identity: its number of rows and the digest of its anchor tokens."""

    rows: int
    tokens: str


def _damaged(path: str | os.PathLike, problem: str) -> ValueError:
    return ValueError(f"{path} has unreadable metadata ({problem}): the file is damaged. Remove it to recompute them.")


@dataclass(frozen=True)
class AnchorIdentity:
    """
    Everything offline anchors depend on, stored as the `__metadata__` strings of their file and compared when the file
    is reused: the router weights of the model before training (their checksum), the number of MoE layers and experts,
    the pooling, and for each dataset its rows and anchor tokens. `computed_layers` says how many MoE layers (from the
    first) the anchors hold: their forward ends after the last aligned layer, so a file serves any run that aligns no
    later layer. `model` and `revision` are recorded for the reader
    but not compared: the same model may be named by another path or by its Hub id.

    Build it with [`~AnchorIdentity.of`]; read a file's with [`~AnchorIdentity.from_metadata`] (the one parser of the
    metadata); compare with [`~AnchorIdentity.check_matches`].
    """

    router_checksum: str
    num_moe_layers: int
    num_experts: int
    pooling: str
    datasets: dict[str, DatasetIdentity] = field(default_factory=dict)
    model: str = ""
    revision: str = ""
    computed_layers: int | None = None  # None: every MoE layer

    @property
    def layers_held(self) -> int:
        """How many MoE layers, from the first, the anchors hold."""
        return self.num_moe_layers if self.computed_layers is None else self.computed_layers

    @classmethod
    def of(
        cls,
        model: nn.Module,
        datasets: dict[str, DatasetIdentity],
        pooling: str,
        checksum: str | None = None,
        computed_layers: int | None = None,
    ) -> AnchorIdentity:
        """
        The identity of anchors of `datasets` computed with the patched `model` as it is now (`checksum`: its
        [`router_checksum`], when it was taken earlier, before training changed the weights), holding the first
        `computed_layers` MoE layers (every one by default).
        """
        state = get_routing_state(model)
        if state is None:
            raise ValueError(
                "Patch the model with `hf_sara.patch_model(model)` before computing anchor distributions."
            )
        config = model.config if hasattr(model, "config") else model.module.config
        return cls(
            router_checksum=checksum or router_checksum(model),
            num_moe_layers=len(state.captured_layers),
            num_experts=num_experts(config) or 0,
            pooling=pooling,
            datasets=dict(datasets),
            model=str(getattr(config, "_name_or_path", "") or ""),
            revision=str(getattr(config, "_commit_hash", "") or ""),
            computed_layers=computed_layers,
        )

    def restricted_to(self, names: list[str]) -> AnchorIdentity:
        """The same identity for the datasets `names` only."""
        return AnchorIdentity(
            self.router_checksum,
            self.num_moe_layers,
            self.num_experts,
            self.pooling,
            {name: self.datasets[name] for name in names},
            self.model,
            self.revision,
            self.computed_layers,
        )

    def to_metadata(self) -> dict[str, str]:
        """The `__metadata__` strings of a safetensors file."""
        datasets = {name: {"rows": info.rows, "tokens": info.tokens} for name, info in self.datasets.items()}
        return {
            "format": ANCHORS_FORMAT,
            "model": self.model,
            "revision": self.revision,
            "router_checksum": self.router_checksum,
            "num_moe_layers": str(self.num_moe_layers),
            "num_experts": str(self.num_experts),
            "pooling": self.pooling,
            "datasets": json.dumps(datasets, sort_keys=True),
            "computed_layers": str(self.layers_held),
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], path: str | os.PathLike) -> AnchorIdentity:
        """
        Parses a file's `__metadata__`.

        Raises:
            `ValueError`: naming the file, when it is not an hf_sara anchors file or its metadata is unreadable.
        """
        found = metadata.get("format")
        if found != ANCHORS_FORMAT:
            raise ValueError(f"{path} is not an hf_sara anchors file (format {found!r}, expected {ANCHORS_FORMAT!r}).")
        try:
            stored = json.loads(metadata.get("datasets", "{}"))
        except json.JSONDecodeError:
            raise _damaged(path, "its datasets are not JSON") from None
        if not isinstance(stored, dict) or not all(
            isinstance(info, dict) and isinstance(info.get("rows"), int) and isinstance(info.get("tokens"), str)
            for info in stored.values()
        ):
            raise _damaged(path, "its datasets are not {name: {rows, tokens}}")
        counts = {}
        for key in ("num_moe_layers", "num_experts", "computed_layers"):
            value = metadata.get(key, metadata.get("num_moe_layers", "") if key == "computed_layers" else "")
            if not value.isdigit():
                raise _damaged(path, f"{key} is {value!r}")
            counts[key] = int(value)
        return cls(
            router_checksum=metadata.get("router_checksum", ""),
            pooling=metadata.get("pooling", ""),
            datasets={name: DatasetIdentity(info["rows"], info["tokens"]) for name, info in stored.items()},
            model=metadata.get("model", ""),
            revision=metadata.get("revision", ""),
            **counts,
        )

    def check_matches(self, stored: AnchorIdentity, path: str | os.PathLike, resuming: bool = False) -> None:
        """
        Refuses the anchors of `path` (whose identity is `stored`) unless they were computed for this model (before
        training), layout, pooling and every dataset of this identity.

        Args:
            resuming (`bool`, *optional*, defaults to `False`):
                Whether a resumed run asks: it cannot recompute the anchors, so the advice is to restore the first
                run's settings rather than to remove the file.

        Raises:
            `ValueError`: naming the first field that differs, both values, and the fix.
        """
        fix = RESUMING_FIX if resuming else None
        if stored.router_checksum != self.router_checksum:
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
        if stored.layers_held < self.layers_held:
            raise ValueError(
                f"The anchors in {path} hold MoE layers 0..{stored.layers_held - 1}, and this run aligns layers up to "
                f"{self.layers_held - 1} (another `sara_layers`). "
                + (fix or "Remove the file to recompute them, or align no later layer than they hold.")
            )
        for key in ("num_moe_layers", "num_experts", "pooling"):
            there, here = getattr(stored, key), getattr(self, key)
            if there != here:
                raise ValueError(
                    f"The anchors in {path} do not match this run: {key} is {there!r} there but {here!r} here. "
                    "Anchors are only valid for the model (before training), layers, experts and pooling they were "
                    "computed with: "
                    + (fix or "remove the file to recompute them, or point `sara_anchor_path` at matching anchors.")
                )

        # The train dataset first: when it differs, the eval datasets' differences follow from it.
        for name in sorted(self.datasets, key=lambda name: (name != "train", name)):
            info = self.datasets[name]
            if name not in stored.datasets:
                raise ValueError(
                    f"The anchors in {path} hold no dataset {name!r} (they hold {sorted(stored.datasets)}). Remove "
                    "the file to recompute them, or pass the datasets they were computed for."
                )
            if stored.datasets[name] != info:
                there = stored.datasets[name]
                what = (
                    f"{there.rows} rows there, {info.rows} here"
                    if there.rows != info.rows
                    else "other anchor tokens (other data, tokenizer, chat template, max_length or truncation)"
                )
                raise ValueError(
                    f"The anchors in {path} were computed for another {name} dataset: {what}. "
                    + (fix or "Remove the file to recompute them, or restore the settings they were computed with.")
                )


RESUMING_FIX = (
    "A resumed run must use the anchors of its first run: restore the settings (model, data, pooling, tokenizer, "
    "max_length) that run started with, or start a new run from the base model in a new output_dir."
)
