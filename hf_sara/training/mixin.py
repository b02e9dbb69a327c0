"""`SARAMixin`: the SARA routing-alignment loss, offline anchors, metrics and checkpoints for any
`transformers.Trainer`."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections import defaultdict
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import DataCollatorWithFlattening, TrainingArguments
from transformers.integrations.deepspeed import deepspeed_init
from transformers.utils import logging

from ..files.checkpoints import complete_checkpoint
from ..files.lock import directory_lock
from ..routing.capture import activation_checkpointing, capture_routing
from ..routing.layers import resolve_layers
from ..routing.patching import get_routing_state, patch_model
from ..routing.pooling import pooling_token_mask, token_segments
from .anchors import AnchorIdentity, AnchorTable, OfflineAnchors, default_anchor_path, open_offline_anchors
from .anchors.identity import router_checksum
from .arguments import SARAArguments, SARATrainingArguments, convert_training_arguments
from .collator import ANCHOR_KEY_PREFIX, ROW_IDS_KEY, AnchorStore, SARADataCollator
from .compat import load_checkpoint_with_conversion, loss_is_scaled_for_accumulation
from .model_card import render_sara_settings
from .paired_data import (
    LANGUAGE_COLUMN,
    ROW_COLUMN,
    TOKEN_ROWS_COLUMN,
    TOKENIZED_FIELDS,
    PairedFormat,
    anchored_rows,
    check_paired_dataset,
    detect_paired_format,
    split_pairs,
)

logger = logging.get_logger(__name__)


class SARAMixin:
    """
    Semantically Anchored Routing Alignment (SARA) for any [`~transformers.Trainer`]: mixed in before the trainer
    class, it adds to the trainer's own loss a Jensen-Shannon loss that pulls each example's expert routing towards
    the routing of its high-resource parallel "anchor".

    ```python
    from transformers import DataCollatorForSeq2Seq, Trainer
    from hf_sara import SARAMixin, SARATrainingArguments, patch_model

    class SARATokenizedTrainer(SARAMixin, Trainer):
        pass

    trainer = SARATokenizedTrainer(
        model=patch_model(model),
        args=SARATrainingArguments(output_dir="out"),
        train_dataset=pairs,  # input_ids, labels (optional) and anchor_input_ids, anchor_labels (optional)
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
    )
    trainer.train()
    ```

    The loss of a micro-batch is the trainer's own (`Trainer.compute_loss`, with whatever the subclass does there),
    plus `sara_weight * L_SARA` and, with `anchor_sft_weight > 0`, an SFT loss on the anchors. The mixin also:

    - pairs the datasets: every example carries a global row id (`sara_row`) that survives column removal and
      shuffling, and its anchor is kept apart (tokenized pairs here; [`SARATrainer`] prepares any format
      `SFTTrainer` accepts through `SFTTrainer`'s own preparation);
    - wraps the trainer's data collator in a [`SARADataCollator`] (the row id of every token, and the anchors' batch
      in online mode);
    - computes the offline anchors once, when `train()` has handed the model to its engine (split across ranks), or
      reads them from their cache;
    - logs `sara/js`, `sara/js_layer_<i>`, `sara/js_<language>`, `sara/weight` through `Trainer.log`
      (`<prefix>_sara/...` in evaluation, e.g. `eval_sw_sara/js` for a named eval dataset);
    - appends the SARA settings to the model card, and resumes from checkpoints with the anchors of the first run.

    Args:
        model ([`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The MoE model. It is patched with [`patch_model`] if it is not already.
        args ([`SARAArguments`], *optional*):
            The trainer's arguments with the SARA settings ([`SARATrainingArguments`] for a plain `Trainer`); other
            `TrainingArguments` are converted, with the SARA defaults.
        data_collator (`Callable`, *optional*):
            The trainer's collator; wrapped so that each batch carries its rows' ids (and anchors).
        train_dataset ([`~datasets.Dataset`]):
            A paired dataset. Tokenized: `input_ids` (with optional `labels`, `attention_mask`) and the anchor's
            `anchor_input_ids` (`anchor_labels`, `anchor_attention_mask`), None or empty for rows without an anchor;
            an optional `language` column enables per-language metrics.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Paired datasets for evaluation.
        **kwargs:
            Every other argument of the trainer class.
    """

    # The arguments class a trainer of this kind takes (others are converted into it).
    _sara_arguments_class: type = SARATrainingArguments

    def __init__(
        self,
        model: Any = None,
        args: TrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        **kwargs: Any,
    ):
        args = self._sara_arguments(model, args)
        for name, dataset in {
            "train": train_dataset,
            **(eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}),
        }.items():
            if dataset is not None:
                check_paired_dataset(dataset, name)
        self._sara_store = AnchorStore()
        self._sara_offline: OfflineAnchors | None = None
        self._sara_anchor_tables: dict[str, AnchorTable] = {}  # by the store's dataset name, with their digests
        self._sara_prepared_examples: dict[str, Dataset] = {}  # by the store's dataset name
        self._sara_alignment_scale: float | None = None  # the factor of the last training step, for the model card
        self._sara_step_rows: torch.Tensor | None = None  # "step_mean": the anchored sequences of the step
        self._sara_metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._sara_metric_prefix = "eval"  # of the evaluation running: `eval`, or `eval_<name>` for named datasets
        # How many offline anchor rows this rank computed (0 when they were read from a file).
        self.anchor_rows_computed = 0
        self._sara_router_checksum: str | None = None  # of the model before training, identifies offline anchors

        train_dataset = self._sara_prepare_given_dataset(train_dataset, "train", args)
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                name: self._sara_prepare_given_dataset(dataset, name, args) for name, dataset in eval_dataset.items()
            }
        else:
            eval_dataset = self._sara_prepare_given_dataset(eval_dataset, "eval", args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **kwargs,
        )

        self._check_user_patch()
        patch_model(self.model)
        state = get_routing_state(self.model)
        self._sara_num_layers = len(state.captured_layers)
        self._sara_layer_indices = resolve_layers(self.args.sara_layers, self._sara_num_layers)
        self._sara_base_collator = self.data_collator
        self.data_collator = SARADataCollator(
            self.data_collator,
            self._sara_store,
            padding_free=self._sara_padding_free(),
            collate_anchors=self.args.sara_anchor_mode == "online" or self.args.anchor_sft_weight > 0,
            row_collator=self._sara_row_collator(),
        )
        if self.args.sara_pooling != "all":
            self._check_pooled_tokens()
        logger.info(
            f"SARA: aligning MoE layers {self._sara_layer_indices} of {self._sara_num_layers} with weight "
            f"{self.args.sara_weight} ({self.args.sara_anchor_mode} anchors, pooling {self.args.sara_pooling!r})."
        )

    def _sara_arguments(self, model: Any, args: TrainingArguments | None) -> TrainingArguments:
        """The trainer's arguments as the class it takes (`_sara_arguments_class`), with SARA's defaults if needed."""
        target = self._sara_arguments_class
        if isinstance(args, target) and isinstance(args, SARAArguments):
            return args
        if not (isinstance(target, type) and issubclass(target, TrainingArguments)):
            raise ValueError(
                f"{type(self).__name__} needs training arguments that hold the SARA settings (an arguments class "
                f"with `SARAArguments` among its bases), got {type(args).__name__}."
            )
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            return target(f"{(name or 'model').split('/')[-1]}-SARA")
        return convert_training_arguments(args, target)

    def _sara_row_collator(self) -> Any:
        """
        A collator of plain rows into a padded batch (one row per sequence), for a trainer whose own collator takes
        something else, such as Axolotl's multipack collator (bins of rows): the anchors are then collated by it (the
        offline pass, the online anchors' batch) and so are the rows the pooled-token check reads. `None` (the
        default): the trainer's own collator.
        """
        return None

    def _sara_padding_free(self) -> bool:
        """Whether the trainer's collator concatenates a batch's sequences into one row."""
        collator = getattr(self, "_sara_base_collator", None) or self.data_collator  # the trainer's own, once wrapped
        return bool(getattr(self, "padding_free", False)) or isinstance(collator, DataCollatorWithFlattening)

    def _check_pooled_tokens(self, chunk_size: int = 256) -> None:
        """
        With `sara_pooling` "prompt" or "completion", refuses rows whose example or anchor has no such token: their
        routing would be an empty mean, and the row would silently drop out of the alignment.
        """
        row_collator = self._sara_row_collator()
        collator = SARADataCollator(
            row_collator or self._sara_base_collator,
            self._sara_store,
            padding_free=row_collator is None and self._sara_padding_free(),
            collate_anchors=False,
        )
        for name, offset in self._sara_store.offsets.items():
            sides = {"example": self._sara_prepared_examples[name], "anchor": self._sara_store.tables[name]}
            for side, dataset in sides.items():
                if len(dataset) == 0:
                    continue
                missing = set()
                for start in range(0, len(dataset), chunk_size):
                    rows = list(dataset.select(range(start, min(start + chunk_size, len(dataset)))))
                    batch = collator.collate_with_row_ids(rows)
                    row_ids = batch[ROW_IDS_KEY]
                    labels = batch.get("labels")
                    if labels is None:
                        raise ValueError(
                            f"With `sara_pooling={self.args.sara_pooling!r}`, the prompt and completion tokens are "
                            "told apart by the batch's `labels` (-100 on the prompt), but the collator gives none. "
                            "Add `labels` to the dataset (and `anchor_labels`), or use `sara_pooling='all'`."
                        )
                    pooled = pooling_token_mask(labels, self.args.sara_pooling) & (row_ids >= 0)
                    missing |= set(row_ids[row_ids >= 0].tolist()) - set(row_ids[pooled].tolist())
                if missing:
                    rows = sorted(row - offset for row in missing)
                    kind = "prompt (out of the SFT loss)" if self.args.sara_pooling == "prompt" else "completion"
                    raise ValueError(
                        f"With `sara_pooling={self.args.sara_pooling!r}`, the {side} of row(s) {rows[:10]}"
                        f"{' ...' if len(rows) > 10 else ''} of the {name} dataset has no {kind} token to pool, so "
                        "those rows would silently drop out of the alignment. Use `sara_pooling='all'`, or give every "
                        "example and anchor a prompt and a completion (prompt/completion or conversational format)."
                    )

    def _check_user_patch(self) -> None:
        """Refuses a model that the user patched with a subset of the MoE layers, rather than replacing the patch."""
        state = get_routing_state(self.model)
        if state is not None and len(state.captured_layers) != len(state.sites):
            raise ValueError(
                f"The model was patched with `patch_model(model, layers=...)` capturing MoE layers "
                f"{state.captured_layers} of {len(state.sites)}, but SARA captures every MoE layer (its offline "
                "anchors hold them all) and aligns the ones `sara_layers` selects. Patch it with all layers "
                f"(`patch_model(model)`, the default), and set `sara_layers` (e.g. "
                f"'{','.join(str(layer) for layer in state.captured_layers)}') to choose the aligned layers."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Datasets
    # ----------------------------------------------------------------------------------------------------------------

    def _sara_already_prepared(self, dataset: Dataset, dataset_name: str) -> bool:
        """
        Whether `dataset` is one this trainer prepared (it then carries hf_sara's row ids); refuses one that carries
        them without having been prepared here.
        """
        reserved = [column for column in (ROW_COLUMN, TOKEN_ROWS_COLUMN) if column in dataset.column_names]
        if not reserved:
            return False
        if any(dataset is prepared for prepared in self._sara_prepared_examples.values()):
            return True
        raise ValueError(
            f"The {dataset_name} dataset has the column(s) {reserved}, which hf_sara reserves for the datasets it "
            "prepares: pass the raw paired dataset (not one another SARA trainer prepared), or rename the column."
        )

    def _sara_split(
        self, dataset: Dataset, paired_format: PairedFormat, dataset_name: str, args: SARAArguments
    ) -> tuple[str, int, Dataset, Dataset, list | None]:
        """
        Reserves the row ids of a paired dataset and splits it into its examples and its anchors (both carrying
        `sara_row`). Returns the name it is stored under, its first row id, the examples, the anchors and the rows'
        languages (None without a `language` column).
        """
        has_anchor = anchored_rows(dataset, paired_format)
        if not any(has_anchor):
            message = (
                f"No row of the {dataset_name} dataset has an anchor (all of {paired_format.anchor_columns} are "
                "empty), so the alignment loss would be zero throughout."
            )
            if dataset_name == "train" and args.sara_weight > 0:
                raise ValueError(message + " Fill the anchor columns, or train without SARA.")
            logger.warning(message)
        name, offset = self._sara_store.reserve(dataset_name, len(dataset))
        examples, anchors = split_pairs(dataset, paired_format, has_anchor, offset)
        languages = dataset[LANGUAGE_COLUMN] if LANGUAGE_COLUMN in dataset.column_names else None
        return name, offset, examples, anchors, languages

    def _sara_register(self, name: str, examples: Dataset, anchors: Dataset, languages: list | None) -> None:
        """Records a prepared dataset: its anchors and languages in the store, its examples for the checks."""
        self._sara_store.add(name, anchors, languages)
        self._sara_prepared_examples[name] = examples

    def _sara_prepare_given_dataset(
        self, dataset: Dataset | None, dataset_name: str, args: SARAArguments
    ) -> Dataset | None:
        """
        A dataset given to the trainer (at init, or to `evaluate`), prepared for SARA: the tokenized pairs split into
        examples (with their row id) and anchors. [`SARATrainer`] leaves this to `SFTTrainer`'s preparation.
        """
        if not isinstance(dataset, Dataset) or self._sara_already_prepared(dataset, dataset_name):
            return dataset
        check_paired_dataset(dataset, dataset_name)
        paired_format = detect_paired_format(dataset.column_names, args.anchor_prefix)
        if paired_format.fields != TOKENIZED_FIELDS:
            raise ValueError(
                f"{type(self).__name__} takes tokenized pairs: `input_ids` (with optional `labels`, `attention_mask`) "
                f"and the anchor's `{args.anchor_prefix}input_ids`; the {dataset_name} dataset has "
                f"{sorted(dataset.column_names)}. Tokenize both sides of each pair the same way (the same template), "
                "or use `SARATrainer`, which prepares text, prompt/completion and conversational pairs through TRL's "
                "SFTTrainer."
            )
        empty = [index for index, ids in enumerate(dataset["input_ids"]) if len(ids) == 0]
        if empty:
            raise ValueError(
                f"Row(s) {empty[:10]}{' ...' if len(empty) > 10 else ''} of the {dataset_name} dataset have no token "
                "(`input_ids` is empty): remove them, or give them their tokens."
            )
        name, _, examples, anchors, languages = self._sara_split(dataset, paired_format, dataset_name, args)
        if LANGUAGE_COLUMN in examples.column_names:  # kept in the store; a collator would choke on the strings
            examples = examples.remove_columns(LANGUAGE_COLUMN)
        self._sara_register(name, examples, anchors, languages)
        return examples

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (ROW_COLUMN, TOKEN_ROWS_COLUMN):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    # ----------------------------------------------------------------------------------------------------------------
    # Offline anchors
    # ----------------------------------------------------------------------------------------------------------------

    def _anchor_tables(self) -> dict[str, AnchorTable]:
        """The prepared anchors of every dataset, as the anchors package takes them (built once per dataset)."""
        store = self._sara_store
        for name in store.offsets:
            if name not in self._sara_anchor_tables:
                self._sara_anchor_tables[name] = AnchorTable(
                    store.tables[name], store.offsets[name], store.sizes[name]
                )
        return dict(self._sara_anchor_tables)

    def _model_for_anchors(self) -> nn.Module:
        """
        The model to compute offline anchors with: the one the engine prepared (under FSDP2 and DeepSpeed ZeRO-3 only
        its forward gathers the sharded weights, and only then is it on the accelerator). Outside `train()` and
        `evaluate()`, an engine's model is prepared for inference here, as `evaluate()` does.
        """
        engine = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if engine and len(self.accelerator._models) == 0:
            if self.is_deepspeed_enabled and self.deepspeed is None:
                deepspeed_init(self, num_training_steps=0, inference=True)
            model = self.accelerator.prepare(self.model)
            if self.is_fsdp_enabled:
                self.model = model
            if model is not self.model:
                self.model_wrapped = model
            if self.is_deepspeed_enabled:
                self.deepspeed = self.model_wrapped
        # Through DeepSpeed's engine, not its module: the engine's forward keeps ZeRO-3's parameter bookkeeping in step
        # (a forward of the bare module before training left a released weight in the first backward).
        return self.model_wrapped if self.is_deepspeed_enabled else self.model

    def _open_offline_anchors(self, resuming: bool = False, may_create_path: bool = False) -> None:
        """
        Opens the offline anchors of every prepared dataset, unless they are open already (see
        [`~hf_sara.training.anchors.open_offline_anchors`] for when they are read, computed or refused). Every rank
        must call it. `may_create_path` lets a missing `sara_anchor_path` be computed (what `hf-sara anchors` does).
        """
        known = self._sara_offline.ranges if self._sara_offline is not None else {}
        if all(name in known for name in self._sara_store.offsets):
            return
        tables = self._anchor_tables()
        pooling = self.args.sara_pooling
        identity = AnchorIdentity.of(
            self.model,
            {name: table.identity(pooling) for name, table in tables.items()},
            pooling,
            self._sara_router_checksum,
            computed_layers=max(self._sara_layer_indices) + 1,  # their forward ends after the last aligned layer
        )
        self._sara_offline, computed = open_offline_anchors(
            self._model_for_anchors(),
            tables,
            self.args.sara_anchor_path or default_anchor_path(self.args.output_dir),
            identity,
            trained=resuming or self.state.global_step > 0,
            path_given=self.args.sara_anchor_path is not None,
            may_create=may_create_path,
            data_collator=self._sara_row_collator() or self._sara_base_collator,
            batch_size=self.args.per_device_eval_batch_size,
            device=self.args.device,
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            gather=self.accelerator.gather,
            write=self.args.should_save,
            wait_for_everyone=self.accelerator.wait_for_everyone,
        )
        self.anchor_rows_computed += computed

    @property
    def offline_anchors(self) -> OfflineAnchors:
        """
        The offline anchors of every prepared dataset, once opened: by `train()`, `evaluate()` or
        [`~SARAMixin.prepare_offline_anchors`].
        """
        if self._sara_offline is None:
            raise ValueError(
                "The offline anchors are not open yet: they are computed (or read from their file) when `train()` or "
                "`evaluate()` starts. Call `trainer.prepare_offline_anchors()` to open them before."
            )
        return self._sara_offline

    def prepare_offline_anchors(self) -> OfflineAnchors:
        """
        Computes the offline anchors of every prepared dataset with the model as it is now (split across the ranks
        under `accelerate launch`) and writes them to `sara_anchor_path`, or `output_dir/sara_anchors.safetensors`;
        an existing file is checked and reused. What `hf-sara anchors` runs; every rank must call it.
        """
        writes_output_dir = self.args.sara_anchor_path is None and self.is_world_process_zero()
        with directory_lock(self.args.output_dir) if writes_output_dir else contextlib.nullcontext():
            self._open_offline_anchors(may_create_path=True)
        return self._sara_offline

    def train_anchor_table(self) -> torch.Tensor:
        """
        Opens the offline anchors (computing them with the model as it is now, or reading them from the cache) and
        returns the train dataset's, `[n_rows, n_moe_layers, n_experts]` (zeros for rows without an anchor). It reads
        the whole table into memory; training looks up only each batch's rows.
        """
        self._open_offline_anchors()
        return self._sara_offline.table(next(iter(self._sara_store.offsets)))

    # ----------------------------------------------------------------------------------------------------------------
    # Training and evaluation
    # ----------------------------------------------------------------------------------------------------------------

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # The offline anchors are computed here, through the model as the engine prepared it (FSDP2 and ZeRO-3
        # gather their shards in its forward). A resumed run reads the first run's anchors (the weights are the
        # checkpoint's by now).
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        if self.args.sara_anchor_mode == "offline":
            self._open_offline_anchors(resuming=resume_from_checkpoint is not None)
        return model, train_dataloader

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.model
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled or hasattr(model, "peft_config")):
            load_checkpoint_with_conversion(model, resume_from_checkpoint)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        resume_from_checkpoint = complete_checkpoint(resume_from_checkpoint, self.args.output_dir, self.args.max_steps)
        # One training per output_dir (held by the main process): two would mix their checkpoints and anchors.
        lock = directory_lock(self.args.output_dir) if self.is_world_process_zero() else contextlib.nullcontext()
        if self.args.sara_anchor_mode == "offline" and self._sara_router_checksum is None:
            # Before a checkpoint is loaded: the anchors belong to the model before training, also when resuming.
            self._sara_router_checksum = router_checksum(self.model)
        with lock:
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(
        self,
        eval_dataset: Dataset | dict[str, Dataset] | str | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                name: self._sara_prepare_given_dataset(dataset, name, self.args)
                for name, dataset in eval_dataset.items()
            }
        else:
            eval_dataset = self._sara_prepare_given_dataset(eval_dataset, metric_key_prefix, self.args)
        # `Trainer.evaluate` calls `evaluate` again per named dataset, with `eval_<name>` as the prefix: the SARA
        # metrics of each dataset are logged under its own prefix.
        previous, self._sara_metric_prefix = self._sara_metric_prefix, metric_key_prefix
        try:
            return super().evaluate(
                eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
            )
        finally:
            self._sara_metric_prefix = previous

    def evaluation_loop(self, *args, **kwargs):
        # `evaluate` and `predict` both come here, on every rank: the offline anchors of a dataset seen for the first
        # time are opened before its batches (a forward on every rank, which must not happen inside `compute_loss`).
        if self.args.sara_anchor_mode == "offline":
            self._open_offline_anchors()
        return super().evaluation_loop(*args, **kwargs)

    def current_sara_weight(self) -> float:
        """The alignment weight at the current step, after the optional linear warm-up (`sara_warmup_ratio`)."""
        weight = self.args.sara_weight
        if self.args.sara_warmup_ratio > 0 and self.state.max_steps > 0:
            warmup_steps = max(1, math.ceil(self.args.sara_warmup_ratio * self.state.max_steps))
            # `global_step` counts the optimizer steps done: the step being computed is the next one.
            weight *= min(1.0, (self.state.global_step + 1) / warmup_steps)
        return weight

    def _multiplies_by_processes(self, num_items_in_batch: Any) -> bool:
        """Whether `Trainer.compute_loss` multiplies a loss normalised by `num_items_in_batch` by the processes."""
        return bool(
            self.args.average_tokens_across_devices
            and (self.model_accepts_loss_kwargs or self.compute_loss_func is not None)
            and num_items_in_batch is not None
        )

    def _alignment_scale(self, mode: str, num_items_in_batch: Any) -> float:
        """
        The factor of the alignment term, on top of its row weights ([`~SARAMixin._row_weights`]): 1 for
        `sara_loss_reduction="mean"` and in evaluation. For `"sum"`, the factor that turns the mean over the
        micro-batches and processes of one optimizer step into their sum, as the authors' released code weighted its
        term: the accumulation steps, times the processes when `Trainer.compute_loss` scales losses that models
        normalise themselves (`average_tokens_across_devices` with a token count: `num_processes // tp_size`). For
        `"step_mean"`, whose row weights divide by the anchored rows of the whole step, the factor that undoes the
        averaging over micro-batches and processes: the accumulation steps, times the processes when the rows were
        counted across them.
        """
        reduction = self.args.sara_loss_reduction
        if reduction == "mean" or mode != "train":
            return 1.0
        processes = 1
        if reduction == "step_mean" and self._sara_step_rows is not None:
            counted_everywhere = self.args.average_tokens_across_devices and self.accelerator.num_processes > 1
            processes = self.accelerator.num_processes // self.get_tp_size() if counted_everywhere else 1
        elif reduction == "sum" and self._multiplies_by_processes(num_items_in_batch):
            processes = self.accelerator.num_processes // self.get_tp_size()
        accumulation = self.current_gradient_accumulation_steps
        if reduction == "step_mean" and self._sara_step_rows is None:
            accumulation = 1  # outside the training loop's step: the micro-batch's own mean
        return float(accumulation * processes)

    def _row_weights(self, mode: str, has_anchor: torch.Tensor) -> torch.Tensor:
        """
        Each sequence's weight in the alignment term, which sums them times the per-layer JS: the mean over the
        aligned layers and the anchored rows of the micro-batch (`"mean"`, `"sum"`, evaluation) or of the whole
        optimizer step, every accumulation step and process counted (`"step_mean"`).
        """
        anchored = has_anchor.float()
        if mode == "train" and self.args.sara_loss_reduction == "step_mean" and self._sara_step_rows is not None:
            rows = self._sara_step_rows.to(anchored.device)
        else:
            rows = anchored.sum()
        return anchored / (rows.clamp(min=1) * len(self._sara_layer_indices))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.sara_loss_reduction == "step_mean":
            # The anchored sequences of the whole optimizer step, as `Trainer` counts its tokens for
            # `num_items_in_batch`: the row weights of "step_mean" divide by them.
            self._sara_step_rows = self._anchored_sequences(batch_samples, device)
        return batch_samples, num_items_in_batch

    def _anchored_sequences(self, batch_samples: list[dict[str, Any]], device) -> torch.Tensor:
        """How many sequences of `batch_samples` have an anchor (summed over the processes when tokens are)."""
        store = self._sara_store
        cached = getattr(self, "_sara_anchored_cache", None)
        if cached is None or cached.shape[0] != store.num_rows + 1:
            cached = torch.tensor([store.has_anchor(row) for row in range(store.num_rows)] + [False])
            self._sara_anchored_cache = cached
        count = 0
        for batch in batch_samples:
            row_ids = batch[ROW_IDS_KEY]
            token_mask = pooling_token_mask(batch.get("labels"), self.args.sara_pooling)
            segments = token_segments(
                row_ids.shape, batch.get("attention_mask"), token_mask=token_mask, sequence_ids=row_ids
            )
            count += int(cached[segments.sequence_of_segment].sum())
        count = torch.tensor(float(count), device=device)
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            count = self.accelerator.gather(count[None]).sum()
        return count

    def _gradient_mode(self, model: nn.Module, weight: float) -> str:
        """How the alignment term reaches the model: see `capture_routing`'s `gradient`."""
        if not (self.model.training and torch.is_grad_enabled()) or weight == 0:
            return "none"
        # Gradient checkpointing (any mode, TRL's forced reentrant one included): the gradient is added where the
        # backward recomputes each router, keeping nothing per token between forward and backward.
        return "deferred" if activation_checkpointing(model) else "graph"

    def _anchor_sft_loss(self, model: nn.Module, anchor_inputs: dict[str, Any]) -> torch.Tensor:
        """
        The SFT loss on a batch of anchors (`anchor_sft_weight`): the model's own language-modelling loss, the mean
        over the anchors' label tokens, without the load-balancing loss.
        """
        if anchor_inputs.get("labels") is None:
            raise ValueError(
                "`anchor_sft_weight > 0` trains on the anchors, but their batch has no `labels`: add "
                f"`{self.args.anchor_prefix}labels` to the dataset, or use a collator that makes labels."
            )
        return model(**anchor_inputs, use_cache=False, output_router_logits=False).loss

    def _forward_anchors(self, model: nn.Module, anchor_inputs: dict[str, Any], with_sft: bool, gradient: str):
        """Routing of the batch's anchors (detached), their row ids, and their SFT loss when `with_sft`."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module  # the anchors' gradients (if any) reach the parameters in the same backward
        sequence_ids = anchor_inputs.pop(ROW_IDS_KEY)
        labels = anchor_inputs.get("labels")
        token_mask = pooling_token_mask(labels, self.args.sara_pooling)
        shape = anchor_inputs["input_ids"].shape
        attention_mask = anchor_inputs.get("attention_mask")
        sft_loss = None
        if with_sft:
            # Their routing is a target only; under checkpointing their capture is deferred as well (without a term),
            # so that every forward of the step passes its routers through the same node.
            gradient = "deferred" if gradient == "deferred" else "none"
            with capture_routing(
                model, shape, attention_mask, token_mask=token_mask, sequence_ids=sequence_ids, gradient=gradient
            ) as cap:
                sft_loss = self._anchor_sft_loss(model, anchor_inputs)
        else:
            inputs = {key: value for key, value in anchor_inputs.items() if key != "labels"}
            with torch.no_grad():
                with capture_routing(
                    model,
                    shape,
                    attention_mask,
                    token_mask=token_mask,
                    sequence_ids=sequence_ids,
                    stop_after=max(self._sara_layer_indices),  # the forward ends after the last aligned layer
                ) as cap:
                    model(**inputs, use_cache=False, logits_to_keep=1, output_router_logits=False)
        return cap.distributions().detach(), cap.segments.sequence_of_segment, sft_loss

    def _anchor_targets(
        self, model, rows: torch.Tensor, anchor_inputs: dict[str, Any], shape: tuple[int, ...], gradient: str
    ):
        """Anchor distributions and mask for the batch's sequences (`rows`), and the anchors' SFT loss if asked."""
        with_sft = self.args.anchor_sft_weight > 0 and self.model.training
        anchor_distributions = anchor_rows = sft_loss = None
        if anchor_inputs:
            anchor_distributions, anchor_rows, sft_loss = self._forward_anchors(
                model, anchor_inputs, with_sft, gradient
            )
        if self.args.sara_anchor_mode == "offline":
            # Only the batch's rows are read from the memory-mapped file (the table can hold millions of rows).
            targets, has_anchor = self.offline_anchors.lookup(rows, shape)
            return targets, has_anchor, sft_loss
        targets = torch.zeros(shape, device=rows.device)
        if anchor_rows is None:
            return targets, torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device), sft_loss
        position = torch.searchsorted(anchor_rows, rows).clamp(max=anchor_rows.shape[0] - 1)
        has_anchor = anchor_rows[position] == rows
        # The anchors' routing up to the last aligned layer (with an SFT loss on them, of every layer).
        targets[has_anchor, : anchor_distributions.shape[1]] = anchor_distributions[position[has_anchor]]
        return targets, has_anchor, sft_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        sequence_ids = inputs.pop(ROW_IDS_KEY)
        anchor_inputs = {}
        for key in [key for key in inputs if key.startswith(ANCHOR_KEY_PREFIX)]:
            anchor_inputs[key[len(ANCHOR_KEY_PREFIX) :]] = inputs.pop(key)
        token_mask = pooling_token_mask(inputs.get("labels"), self.args.sara_pooling)
        weight = self.current_sara_weight() if mode == "train" else self.args.sara_weight
        gradient = self._gradient_mode(model, weight)

        # One forward: the trainer's own loss (with the MoE load-balancing loss where it adds it) and the examples'
        # routing.
        shape = inputs["input_ids"].shape
        with capture_routing(
            model,
            shape,
            inputs.get("attention_mask"),
            token_mask=token_mask,
            sequence_ids=sequence_ids,
            gradient=gradient,
        ) as capture:
            loss = super().compute_loss(model, inputs, return_outputs=False, num_items_in_batch=num_items_in_batch)
        rows = capture.segments.sequence_of_segment
        shape = capture.distributions().shape

        anchors, has_anchor, anchor_sft_loss = self._anchor_targets(model, rows, anchor_inputs, shape, gradient)
        # The anchors are distributions by construction (the capture's, or checked where the offline file is read).
        alignment_loss, divergences = capture.alignment_term(
            anchors, has_anchor, self._row_weights(mode, has_anchor), self._sara_layer_indices, ordering=loss
        )
        scale = self._alignment_scale(mode, num_items_in_batch)
        if mode == "train":
            self._sara_alignment_scale = scale
        extra = weight * scale * alignment_loss
        if anchor_sft_loss is not None:
            extra = extra + self.args.anchor_sft_weight * anchor_sft_loss
        # Like SFTTrainer's aux loss: a per-micro-batch quantity, averaged over the accumulation steps here when
        # `Trainer` leaves gradient accumulation to the loss (it divides the loss itself otherwise).
        if mode == "train" and loss_is_scaled_for_accumulation(self, num_items_in_batch):
            extra = extra / self.current_gradient_accumulation_steps
        loss = loss + extra
        self._log_sara(mode, divergences, has_anchor.float(), rows, weight, anchor_sft_loss)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
            return loss, outputs
        return loss

    # ----------------------------------------------------------------------------------------------------------------
    # Logging
    # ----------------------------------------------------------------------------------------------------------------

    def _language_of_row(self, device: torch.device) -> torch.Tensor:
        """Language id of every global row (-1: none), cached per device until a new dataset is prepared."""
        store = self._sara_store
        cached = getattr(self, "_sara_languages_cache", None)
        if cached is None or cached[0] != store.num_rows or cached[1].device != device:
            cached = (store.num_rows, torch.tensor(store.language_of_row + [-1], device=device))
            self._sara_languages_cache = cached
        return cached[1]

    @torch.no_grad()
    def _log_sara(self, mode, divergences, mask, rows, weight, anchor_sft_loss) -> None:
        """Records the loss's own divergences (`[sequences, aligned layers]`), gathered over ranks: overall, per layer
        and per language; [`~SARAMixin.log`] averages them into the trainer's logs."""
        layers = self._sara_layer_indices
        languages = self._language_of_row(rows.device)[rows]
        num_languages = len(self._sara_store.languages)
        one_hot = torch.zeros(rows.shape[0], num_languages + 1, device=rows.device)
        one_hot[torch.arange(rows.shape[0]), torch.where(languages >= 0, languages, num_languages)] = 1.0
        sums = torch.cat(
            [
                (divergences * mask[:, None]).sum(0),  # per layer
                ((divergences.mean(1) * mask)[:, None] * one_hot).sum(0),  # per language
                mask.sum()[None],
                (mask[:, None] * one_hot).sum(0),
            ]
        )
        sums = self.accelerator.gather(sums[None]).sum(0)
        num_layers = len(layers)
        per_layer, per_language = sums[:num_layers], sums[num_layers : num_layers + num_languages]
        self._check_finite(per_layer.tolist())
        count, language_counts = sums[num_layers + num_languages + 1], sums[num_layers + num_languages + 2 :]
        metrics = self._sara_metrics[mode]
        if count > 0:
            metrics["sara/js"].append((per_layer.sum() / (count * num_layers)).item())
            for layer, value in zip(layers, per_layer.tolist(), strict=True):
                metrics[f"sara/js_layer_{layer}"].append(value / count.item())
            for index, language in enumerate(self._sara_store.languages):
                if language_counts[index] > 0:
                    metrics[f"sara/js_{language}"].append((per_language[index] / language_counts[index]).item())
        if mode == "train":
            metrics["sara/weight"].append(weight)
        if anchor_sft_loss is not None:
            metrics["sara/anchor_sft_loss"].append(
                self.accelerator.gather(anchor_sft_loss.detach()[None]).mean().item()
            )

    def _check_finite(self, per_layer: list[float]) -> None:
        """
        Refuses a step whose routing is not finite (NaN or infinite router scores: the alignment loss and its gradient
        would be NaN). Under fp16 the loss scaler skips such steps, so it is a warning there. Read from the sums the
        logs gather anyway: no extra device synchronisation.
        """
        bad = [
            layer for layer, value in zip(self._sara_layer_indices, per_layer, strict=True) if not math.isfinite(value)
        ]
        if not bad:
            return
        message = (
            f"The routing of MoE layer(s) {bad} is not finite (NaN or infinite router scores) at step "
            f"{self.state.global_step}, so the SARA loss and its gradient are NaN: the model's weights or activations "
            "hold NaN or infinity (a learning rate too high, fp16 overflow, a damaged checkpoint). Lower the learning "
            "rate, train in bf16 or fp32, or check the weights you started from."
        )
        if self.args.fp16:
            logger.warning(message + " The fp16 loss scaler skips this step.")
            return
        raise RuntimeError(message)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Adds the SARA metrics recorded since the last log, averaged, to `logs` (`<prefix>_sara/...` in
        evaluation, with the prefix of the dataset evaluated), then logs as the trainer does."""
        mode = "train" if self.model.training else "eval"
        recorded = self._sara_metrics[mode]
        if recorded:
            prefix = "" if mode == "train" else f"{self._sara_metric_prefix}_"
            # In place, as TRL does: `evaluate()` returns the dictionary it logs.
            logs.update({prefix + key: sum(values) / len(values) for key, values in recorded.items()})
            recorded.clear()
        return super().log(logs, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    # Saving
    # ----------------------------------------------------------------------------------------------------------------

    def _sara_settings_rows(self) -> list[tuple[str, object]]:
        """The model card's "SARA settings" rows."""
        languages = ", ".join(map(str, self._sara_store.languages)) or "not given (no `language` column)"
        reduction = self.args.sara_loss_reduction
        if reduction == "sum":
            # The factor the last training step applied (accumulation steps x processes), not a recomputation of it.
            scale = self._sara_alignment_scale
            reduction += ": summed over the accumulation steps and processes of each optimizer step " + (
                f"(x{scale:g}: effective weight {self.args.sara_weight * scale:g})" if scale else "(not trained yet)"
            )
        return [
            ("sara_weight", self.args.sara_weight),
            (
                "sara_layers",
                f"`{self.args.sara_layers}`: MoE layers {self._sara_layer_indices} of {self._sara_num_layers}",
            ),
            ("sara_loss_reduction", reduction),
            ("sara_anchor_mode", self.args.sara_anchor_mode),
            ("sara_pooling", self.args.sara_pooling),
            ("sara_warmup_ratio", self.args.sara_warmup_ratio),
            ("anchor_sft_weight", self.args.anchor_sft_weight),
            ("languages", languages),
        ]

    def create_model_card(self, *args, **kwargs):
        """Writes the trainer's model card, then appends the "SARA settings" section to it."""
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        with open(path, "a", encoding="utf-8") as card:
            card.write(render_sara_settings(self._sara_settings_rows()))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if _internal_call or not self.is_world_process_zero():
            return
        self.create_model_card()
        if output_dir is not None and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
            shutil.copyfile(os.path.join(self.args.output_dir, "README.md"), os.path.join(output_dir, "README.md"))
