"""`SARATrainer`: TRL's `SFTTrainer` with paired datasets in any format it accepts, and the SARA loss of
[`SARAMixin`]."""

from __future__ import annotations

import contextlib
from typing import Any

from datasets import Dataset, Features, Sequence, Value
from torch import nn
from transformers import AutoConfig, TrainingArguments
from transformers.utils import logging
from trl import SFTTrainer
from trl.data_utils import pack_dataset

from ..compat import causal_lm_loss, rows_kept_by_preparation
from .compat import output_router_logits_of, restore_output_router_logits, sft_trainer_compatibility
from .config import SARAConfig
from .mixin import SARAMixin
from .paired_data import ROW_COLUMN, TOKEN_ROWS_COLUMN, check_paired_dataset, detect_paired_format

logger = logging.get_logger(__name__)


class SARATrainer(SARAMixin, SFTTrainer):
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

    _sara_arguments_class = SARAConfig

    def __init__(
        self,
        model: str | nn.Module,
        args: SARAConfig | TrainingArguments | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        **kwargs: Any,
    ):
        args = self._sara_arguments(model, args)
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
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)

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

    def _sara_prepare_given_dataset(self, dataset, dataset_name, args):
        return dataset  # prepared by `SFTTrainer` (at init and in `evaluate`), through `_prepare_dataset` below

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        check_paired_dataset(dataset, dataset_name)  # also datasets passed later, to `evaluate`
        if self._sara_already_prepared(dataset, dataset_name):
            return dataset
        paired_format = detect_paired_format(dataset.column_names, args.anchor_prefix, args.dataset_text_field)
        name, offset, examples, anchors, languages = self._sara_split(dataset, paired_format, dataset_name, args)

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
        self._sara_register(name, prepared, prepared_anchors, languages)
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

    # ----------------------------------------------------------------------------------------------------------------
    # TRL specifics
    # ----------------------------------------------------------------------------------------------------------------

    def _anchor_sft_loss(self, model: nn.Module, anchor_inputs: dict[str, Any]):
        # As SFTTrainer computes the examples' loss (TRL's fused LM head where it has one): the mean over the anchors'
        # label tokens.
        return causal_lm_loss(model, anchor_inputs)

    def train(self, *args, **kwargs):
        with (
            sft_trainer_compatibility(self.model),
            restore_output_router_logits(self.model, self._sara_output_router_logits),
        ):
            return super().train(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with sft_trainer_compatibility(self.model):
            return super().evaluate(*args, **kwargs)
