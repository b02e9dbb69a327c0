"""`SARATrainer`: TRL's `SFTTrainer` with paired batches and the SARA routing-alignment loss."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from typing import Any

import torch
from datasets import Dataset, Features, Sequence, Value
from torch import nn
from transformers import AutoConfig, TrainingArguments
from transformers.integrations.deepspeed import deepspeed_init
from transformers.utils import logging
from trl import SFTTrainer
from trl.data_utils import pack_dataset

from ..compat import causal_lm_loss, rows_kept_by_preparation
from ..files.checkpoints import complete_checkpoint
from ..files.lock import directory_lock
from ..routing.capture import activation_checkpointing, capture_routing
from ..routing.layers import resolve_layers
from ..routing.patching import get_routing_state, patch_model
from ..routing.pooling import pooling_token_mask, token_segments
from .anchors import AnchorIdentity, AnchorTable, OfflineAnchors, default_anchor_path, open_offline_anchors
from .anchors.identity import router_checksum
from .collator import ANCHOR_KEY_PREFIX, ROW_IDS_KEY, AnchorStore, SARADataCollator
from .compat import (
    load_checkpoint_with_conversion,
    output_router_logits_of,
    restore_output_router_logits,
    sft_trainer_compatibility,
)
from .config import SARAConfig, convert_training_arguments
from .model_card import render_sara_settings
from .paired_data import (
    LANGUAGE_COLUMN,
    ROW_COLUMN,
    TOKEN_ROWS_COLUMN,
    anchored_rows,
    check_paired_dataset,
    detect_paired_format,
    split_pairs,
)

logger = logging.get_logger(__name__)


class SARATrainer(SFTTrainer):
    """
    Trainer for Semantically Anchored Routing Alignment (SARA): supervised fine-tuning of a Mixture-of-Experts model
    on low-resource-language examples, plus a Jensen-Shannon loss that pulls each example's expert routing towards
    the routing of its high-resource parallel "anchor".

    ```python
    from hf_sara import SARAConfig, SARATrainer, patch_model

    model = patch_model(model)
    trainer = SARATrainer(model=model, args=SARAConfig(output_dir="out"), train_dataset=pairs)
    trainer.train()
    ```

    It is an [`~trl.SFTTrainer`]: everything `SFTTrainer` does (model loading, PEFT, chat templates, tokenisation,
    truncation, completion-only and assistant-only loss, padding-free batches and packing, the MoE load-balancing
    loss, metrics) is done by `SFTTrainer` itself, on both sides of each pair. On top of it, the loss is

        loss = L_SFT (+ router_aux_loss_coef * L_LB) + sara_weight * L_SARA (+ anchor_sft_weight * L_SFT(anchor))

    Args:
        model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
            The MoE model (or its name/path). It is patched with [`patch_model`] if it is not already.
        args ([`SARAConfig`], *optional*):
            The configuration; defaults to `SARAConfig("<model name>-SARA")`.
        train_dataset ([`~datasets.Dataset`]):
            A paired dataset: the example in any format `SFTTrainer` accepts (`prompt`/`completion`, `messages`,
            `text`, or tokenized `input_ids`) and its anchor in the same format under `args.anchor_prefix`
            (`anchor_prompt`/`anchor_completion`, ...), None for rows without an anchor; an optional `language`
            column enables per-language metrics.
        eval_dataset ([`~datasets.Dataset`] or `dict[str, Dataset]`, *optional*):
            Paired datasets for evaluation; `eval_sara/js` is logged for them.
        **kwargs:
            Every other [`~trl.SFTTrainer`] argument (`processing_class`, `peft_config`, `callbacks`, ...), except
            `formatting_func` (format both sides of the pairs beforehand).
    """

    _tag_names = ["trl", "sft", "sara", "hf_sara"]
    _name = "SARA"
    _paper = {"title": "Semantically Anchored Routing Alignment (SARA) for Mixture-of-Experts models"}

    def __init__(
        self,
        model: str | nn.Module,
        args: SARAConfig | TrainingArguments | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        **kwargs: Any,
    ):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = SARAConfig(f"{name.split('/')[-1]}-SARA")
        elif not isinstance(args, SARAConfig):
            args = convert_training_arguments(args, SARAConfig)
        if kwargs.get("formatting_func") is not None:
            raise ValueError(
                "SARATrainer does not take a `formatting_func`: it would format the examples but not their anchors. "
                "Format both sides of each pair in the dataset beforehand."
            )
        # Before SFTTrainer loads a model by name: a dataset that cannot be paired is refused first.
        for name, dataset in {
            "train": train_dataset,
            **(eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}),
        }.items():
            if dataset is not None:
                check_paired_dataset(dataset, name)
        if isinstance(model, str):
            # SFTTrainer loads it, then sets `output_router_logits`: read what it was saved with.
            init = args.model_init_kwargs or {}
            config = AutoConfig.from_pretrained(
                model, revision=init.get("revision"), trust_remote_code=getattr(args, "trust_remote_code", False)
            )
        else:
            config = model.config
        self._sara_output_router_logits = output_router_logits_of(config)
        self._sara_store = AnchorStore()
        self._sara_offline: OfflineAnchors | None = None
        self._sara_anchor_tables: dict[str, AnchorTable] = {}  # by the store's dataset name, with their digests
        self._sara_prepared_examples: dict[str, Dataset] = {}  # by the store's dataset name
        self._sara_alignment_scale: float | None = None  # the factor of the last training step, for the model card
        self._sara_step_rows: torch.Tensor | None = None  # "step_mean": the anchored sequences of the step
        # How many offline anchor rows this rank computed (0 when they were read from a file).
        self.anchor_rows_computed = 0
        self._sara_router_checksum: str | None = None  # of the model before training, identifies offline anchors

        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)

        self._check_user_patch()
        patch_model(self.model)
        state = get_routing_state(self.model)
        self._sara_num_layers = len(state.captured_layers)
        self._sara_layer_indices = resolve_layers(args.sara_layers, self._sara_num_layers)
        self._sara_base_collator = self.data_collator
        self.data_collator = SARADataCollator(
            self.data_collator,
            self._sara_store,
            padding_free=self.padding_free,
            collate_anchors=args.sara_anchor_mode == "online" or args.anchor_sft_weight > 0,
        )
        if args.sara_pooling != "all":
            self._check_pooled_tokens()
        logger.info(
            f"SARA: aligning MoE layers {self._sara_layer_indices} of {self._sara_num_layers} with weight "
            f"{args.sara_weight} ({args.sara_anchor_mode} anchors, pooling {args.sara_pooling!r})."
        )

    def _check_pooled_tokens(self, chunk_size: int = 256) -> None:
        """
        With `sara_pooling` "prompt" or "completion", refuses rows whose example or anchor has no such token: their
        routing would be an empty mean, and the row would silently drop out of the alignment.
        """
        collator = SARADataCollator(self._sara_base_collator, self._sara_store, self.padding_free, False)
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
                    pooled = pooling_token_mask(batch["labels"], self.args.sara_pooling) & (row_ids >= 0)
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
                f"{state.captured_layers} of {len(state.sites)}, but SARATrainer captures every MoE layer (its "
                "offline anchors hold them all) and aligns the ones `sara_layers` selects. Patch it with all layers "
                f"(`patch_model(model)`, the default), and set `sara_layers` (e.g. "
                f"'{','.join(str(layer) for layer in state.captured_layers)}') to choose the aligned layers."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Datasets
    # ----------------------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _without_shuffle(self, args: SARAConfig):
        shuffle = args.shuffle_dataset
        args.shuffle_dataset = False
        try:
            yield
        finally:
            args.shuffle_dataset = shuffle

    @contextlib.contextmanager
    def _without_truncation(self, args: SARAConfig, active: bool):
        max_length = args.max_length
        if active:
            args.max_length = None
        try:
            yield
        finally:
            args.max_length = max_length

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        check_paired_dataset(dataset, dataset_name)  # also datasets passed later, to `evaluate`
        reserved = [column for column in (ROW_COLUMN, TOKEN_ROWS_COLUMN) if column in dataset.column_names]
        if reserved:
            if any(dataset is prepared for prepared in self._sara_prepared_examples.values()):
                return dataset  # already prepared by this trainer
            raise ValueError(
                f"The {dataset_name} dataset has the column(s) {reserved}, which hf_sara reserves for the datasets it "
                "prepares: pass the raw paired dataset (not one another SARATrainer prepared), or rename the column."
            )
        paired_format = detect_paired_format(dataset.column_names, args.anchor_prefix, args.dataset_text_field)
        has_anchor = anchored_rows(dataset, paired_format)
        if not any(has_anchor):
            message = (
                f"No row of the {dataset_name} dataset has an anchor (all of {paired_format.anchor_columns} are "
                "empty), so the alignment loss would be zero throughout."
            )
            if dataset_name == "train" and args.sara_weight > 0:
                raise ValueError(message + " Fill the anchor columns, or train with SFTTrainer.")
            logger.warning(message)
        name, offset = self._sara_store.reserve(dataset_name, len(dataset))
        examples, anchors = split_pairs(dataset, paired_format, has_anchor, offset)

        if len(anchors) == 0:  # nothing to tokenize (TRL's preparation cannot take an empty dataset)
            prepared_anchors = Dataset.from_dict(
                {"input_ids": [], ROW_COLUMN: []},
                features=Features({"input_ids": Sequence(Value("int64")), ROW_COLUMN: Value("int64")}),
            )
        else:
            with self._without_shuffle(args):
                prepared_anchors = super()._prepare_dataset(
                    anchors, processing_class, args, False, None, f"{dataset_name} anchors"
                )
            self._check_nothing_dropped(anchors, prepared_anchors, offset, dataset_name, "the anchor of ", args)
        if packing:
            # Tokenized here without packing (to carry each token's row id into the packs), so without truncation
            # too when `bfd_split` is to split long examples into several packs rather than cut them.
            with self._without_shuffle(args), self._without_truncation(args, args.packing_strategy == "bfd_split"):
                prepared = super()._prepare_dataset(examples, processing_class, args, False, None, dataset_name)
            self._check_nothing_dropped(examples, prepared, offset, dataset_name, "", args)
            prepared = self._pack(prepared, args, dataset_name)
        else:
            prepared = super()._prepare_dataset(examples, processing_class, args, False, None, dataset_name)
            self._check_nothing_dropped(examples, prepared, offset, dataset_name, "", args)
        languages = dataset[LANGUAGE_COLUMN] if LANGUAGE_COLUMN in dataset.column_names else None
        self._sara_store.add(name, prepared_anchors, languages)
        self._sara_prepared_examples[name] = prepared
        return prepared

    @staticmethod
    def _check_nothing_dropped(before: Dataset, after: Dataset, offset: int, dataset_name: str, what: str, args):
        dropped = sorted(set(before[ROW_COLUMN]) - rows_kept_by_preparation(after, ROW_COLUMN, args.max_length))
        if dropped:
            rows = [row - offset for row in dropped]
            raise ValueError(
                f"In the {dataset_name} dataset, {what}row(s) {rows[:10]}{' ...' if len(rows) > 10 else ''} keep no "
                f"token in the loss after truncation to `max_length={args.max_length}` (a prompt that fills it, say), "
                "so SFTTrainer would drop them and break the pairing. Raise `max_length`, shorten or remove those "
                "rows."
            )

    def _pack(self, dataset: Dataset, args: SARAConfig, dataset_name: str) -> Dataset:
        """Packs like `SFTTrainer` does, carrying the row id of every token so each example keeps its anchor."""
        if args.max_length is None:
            raise ValueError("When packing is enabled, `max_length` can't be `None`.")
        map_kwargs: dict[str, Any] = {"num_proc": args.dataset_num_proc, "desc": f"Packing {dataset_name} dataset"}
        dataset = dataset.map(
            lambda example: {TOKEN_ROWS_COLUMN: [example[ROW_COLUMN]] * len(example["input_ids"])},
            num_proc=args.dataset_num_proc,
        )
        dataset = dataset.select_columns(["input_ids", "labels", TOKEN_ROWS_COLUMN])
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

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
            data_collator=self._sara_base_collator,
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
        [`~SARATrainer.prepare_offline_anchors`].
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
    # Training
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
        with (
            lock,
            sft_trainer_compatibility(self.model),
            restore_output_router_logits(self.model, self._sara_output_router_logits),
        ):
            return super().train(resume_from_checkpoint, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with sft_trainer_compatibility(self.model):
            return super().evaluate(*args, **kwargs)

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

    def _alignment_scale(self, mode: str, num_items_in_batch: Any) -> float:
        """
        The factor of the alignment term, on top of its row weights ([`~SARATrainer._row_weights`]): 1 for
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
        elif reduction == "sum" and self.args.average_tokens_across_devices and num_items_in_batch is not None:
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
                sft_loss = causal_lm_loss(model, anchor_inputs)
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

        # One forward: SFTTrainer's loss (aux load-balancing loss and metrics included) and the examples' routing.
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
        # Like SFTTrainer's aux loss: a per-micro-batch quantity, averaged over the accumulation steps when `Trainer`
        # leaves gradient accumulation to the loss (it does when `num_items_in_batch` is given).
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None and mode == "train" else 1
        loss = loss + extra / steps
        self._log_sara(mode, divergences, has_anchor.float(), rows, weight, anchor_sft_loss)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**{key: value for key, value in inputs.items() if key != "labels"})
            return loss, outputs
        return loss

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
        """Logs the loss's own divergences (`[sequences, aligned layers]`), gathered over ranks: overall, per layer
        and per language."""
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
        count, language_counts = sums[num_layers + num_languages + 1], sums[num_layers + num_languages + 2 :]
        metrics = self._metrics[mode]
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

    # ----------------------------------------------------------------------------------------------------------------
    # Saving
    # ----------------------------------------------------------------------------------------------------------------

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        path = os.path.join(self.args.output_dir, "README.md")
        languages = ", ".join(map(str, self._sara_store.languages)) or "not given (no `language` column)"
        reduction = self.args.sara_loss_reduction
        if reduction == "sum":
            # The factor the last training step applied (accumulation steps x processes), not a recomputation of it.
            scale = self._sara_alignment_scale
            reduction += ": summed over the accumulation steps and processes of each optimizer step " + (
                f"(x{scale:g}: effective weight {self.args.sara_weight * scale:g})" if scale else "(not trained yet)"
            )
        section = render_sara_settings(
            [
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
        )
        with open(path, "a", encoding="utf-8") as card:
            card.write(section)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if _internal_call or not self.is_world_process_zero():
            return
        self.create_model_card()
        if output_dir is not None and os.path.abspath(output_dir) != os.path.abspath(self.args.output_dir):
            shutil.copyfile(os.path.join(self.args.output_dir, "README.md"), os.path.join(output_dir, "README.md"))
