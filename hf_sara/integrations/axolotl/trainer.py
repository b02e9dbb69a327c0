"""`AxolotlSARATrainer`: Axolotl's trainer with [`SARAMixin`]."""

from __future__ import annotations

import dataclasses
from typing import Any

from axolotl.core.trainers.base import AxolotlTrainer
from axolotl.utils.collators import DataCollatorForSeq2Seq
from transformers import DataCollatorWithFlattening, TrainingArguments

from ...training.arguments import SARAArguments
from ...training.collator import SARADataCollator
from ...training.mixin import SARAMixin


class AxolotlSARATrainer(SARAMixin, AxolotlTrainer):
    """
    Axolotl's [`~axolotl.core.trainers.base.AxolotlTrainer`] with the SARA loss, offline anchors, metrics and model
    card of [`SARAMixin`]; what [`SARAPlugin`] gives Axolotl as its trainer class.

    Beyond the mixin, it keeps Axolotl's own training arguments (built with the SARA settings by the plugin's
    training-arguments mixin), wraps Axolotl's evaluation collator as well as its training one, and, under
    `sample_packing`, collates the anchors (and the rows its checks read) with Axolotl's collator of plain rows,
    `DataCollatorForSeq2Seq` with the multipack collator's settings (which pads `position_ids` too): the multipack
    collator takes bins of rows, and concatenates whatever else it is given into one.
    """

    def __init__(self, *args: Any, bench_data_collator: Any = None, eval_data_collator: Any = None, **kwargs: Any):
        # Read by `_sara_row_collator` during the mixin's initialisation.
        self._sara_axolotl_row_collator = _row_collator(kwargs.get("data_collator"), bench_data_collator)
        super().__init__(
            *args, bench_data_collator=bench_data_collator, eval_data_collator=eval_data_collator, **kwargs
        )
        self.train_data_collator = self.data_collator
        if self.eval_data_collator is not None:
            self.eval_data_collator = SARADataCollator(
                self.eval_data_collator,
                self._sara_store,
                padding_free=isinstance(self.eval_data_collator, DataCollatorWithFlattening),
                collate_anchors=self.data_collator.collate_anchors,
                row_collator=self._sara_row_collator(),
            )

    def _sara_arguments(self, model: Any, args: TrainingArguments | None) -> TrainingArguments:
        """Axolotl's own arguments, which hold the SARA settings when the plugin is loaded (never converted: they
        carry Axolotl's fields, `sample_packing` and the rest)."""
        if not isinstance(args, SARAArguments):
            raise ValueError(
                f"{type(self).__name__} needs Axolotl's training arguments with the SARA settings, got "
                f"{type(args).__name__}: list `hf_sara.integrations.axolotl.SARAPlugin` under `plugins:` in the YAML, "
                "so that Axolotl builds its arguments class with them."
            )
        return args

    def _sara_row_collator(self) -> Any:
        """Under `sample_packing`, Axolotl's collator of plain rows; otherwise the trainer's own collator (None)."""
        if getattr(self.args, "sample_packing", False):
            if self._sara_axolotl_row_collator is None:
                raise ValueError(
                    "With `sample_packing`, SARA collates the anchors with a collator of plain rows: Axolotl's "
                    "`DataCollatorForSeq2Seq` with the settings of the multipack collator, or the trainer's "
                    "`bench_data_collator`; this trainer has neither. Build it through Axolotl's trainer builder, or "
                    "pass `bench_data_collator=axolotl.utils.collators.DataCollatorForSeq2Seq(tokenizer)`."
                )
            return self._sara_axolotl_row_collator
        return None


def _row_collator(collator: Any, fallback: Any) -> Any:
    """
    Axolotl's `DataCollatorForSeq2Seq` with the settings of `collator` when it is one of Axolotl's (its multipack
    collators are subclasses that concatenate each bin before padding), else `fallback`.
    """
    if isinstance(collator, DataCollatorForSeq2Seq):
        fields = dataclasses.fields(DataCollatorForSeq2Seq)
        return DataCollatorForSeq2Seq(**{field.name: getattr(collator, field.name) for field in fields})
    return fallback
