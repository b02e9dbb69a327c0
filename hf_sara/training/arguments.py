"""The SARA settings, as a dataclass that any `TrainingArguments` takes on: [`SARAArguments`], and
[`SARATrainingArguments`] for a plain `transformers.Trainer`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..routing.layers import DEFAULT_LAYERS
from ..routing.pooling import POOLING_MODES
from .paired_data import DEFAULT_ANCHOR_PREFIX

ANCHOR_MODES = ("offline", "online")
LOSS_REDUCTIONS = ("step_mean", "mean", "sum")


def _choice_field(choices: tuple[str, ...], help: str):
    """A string setting whose value is one of `choices`, the first by default (the command line offers them)."""
    return field(default=choices[0], metadata={"help": help, "choices": list(choices)})


@dataclass
class SARAArguments:
    r"""
    The settings of the SARA routing alignment, as a mixin of training arguments: [`SARAConfig`] is TRL's `SFTConfig`
    with them, [`SARATrainingArguments`] is transformers' `TrainingArguments` with them, and a framework's own
    arguments class can take them on the same way (`@dataclass class MyArguments(SARAArguments, MyTrainingArguments)`).
    The defaults are the published ones.

    Parameters:
        sara_weight (`float`, *optional*, defaults to `1.5`):
            Weight `lambda_SARA` of the Jensen-Shannon alignment loss added to the SFT loss (published: 1.5, swept
            0.5..2.0). With `0.0` the trainer trains exactly like its base trainer and only logs the divergence.
        sara_layers (`str`, *optional*, defaults to `"published"`):
            The aligned MoE layers: indices (`"7,9"`), inclusive ranges (`"7-34"`), fractions of depth
            (`"0.15-0.71"`), `"published"` or `"all"`. Indices count MoE layers, not decoder layers. The default,
            `"published"`, is the published band at any depth: layers 7..34 of Qwen3-30B-A3B's 48, i.e.
            `round(7/48 * n)..round(34/48 * n)` of `n` (the same as `sara_alignment_loss(layers=None)`).
        sara_loss_reduction (`str`, *optional*, defaults to `"step_mean"`):
            How the alignment term is averaged over an optimizer step. `"step_mean"` (the paper's formula over the
            step's batch): the mean over every anchored example of the step, all gradient-accumulation steps and
            processes counted (as transformers counts tokens with `num_items_in_batch`), so the update does not depend
            on how the step is split into micro-batches, processes or packs. `"mean"`: the mean over each
            micro-batch's anchored examples, then averaged over the micro-batches and processes, like the MoE
            load-balancing loss (micro-batches with fewer anchored examples weigh each of them more). `"sum"`: `"mean"`
            summed over the gradient-accumulation steps and, with `average_tokens_across_devices=True`, over the
            processes (`gradient_accumulation_steps x num_processes` times `"mean"`): the authors' released code adds
            its term inside the model's forward, which transformers' `Trainer` neither divides by the accumulation
            steps nor keeps from being multiplied by the number of processes, so `"sum"` reproduces the published
            runs' effective weight.
        sara_anchor_mode (`str`, *optional*, defaults to `"offline"`):
            `"offline"`: the anchors' routing is computed once, with the model as it is before training, and cached
            (as published). `"online"`: it is recomputed with the current model at each step, without gradient.
        sara_anchor_path (`str` or `None`, *optional*, defaults to `None`):
            Offline mode: a safetensors file of anchor distributions made by `hf-sara anchors` (or by an earlier
            run) to use instead of computing them. When `None`, they are computed at the start of training
            and cached as `sara_anchors.safetensors` in `output_dir`.
        sara_warmup_ratio (`float`, *optional*, defaults to `0.0`):
            Fraction of the training steps over which the alignment weight rises linearly from 0 to `sara_weight` (a
            curriculum). 0 applies the full weight from the first step.
        sara_pooling (`str`, *optional*, defaults to `"all"`):
            Which real tokens are pooled into an example's routing distribution: `"all"` (prompt and response, as
            published), `"prompt"` (tokens left out of the SFT loss) or `"completion"` (tokens in the SFT loss).
        anchor_prefix (`str`, *optional*, defaults to `"anchor_"`):
            Prefix of the dataset columns that hold the anchor: `anchor_prompt`/`anchor_completion`,
            `anchor_messages`, `anchor_text` or, for tokenized datasets, `anchor_input_ids`.
        anchor_sft_weight (`float`, *optional*, defaults to `0.0`):
            Weight of an SFT loss on the anchor example itself, added to the loss. 0 (published) trains on the
            low-resource examples only.
    """

    sara_weight: float = field(
        default=1.5,
        metadata={
            "help": "Weight of the Jensen-Shannon alignment loss added to the SFT loss (published: 1.5, swept "
            "0.5..2.0). With 0.0 the trainer trains exactly like its base trainer and only logs the divergence."
        },
    )
    sara_layers: str = field(
        default=DEFAULT_LAYERS,
        metadata={
            "help": "The aligned MoE layers: indices ('7,9'), inclusive ranges ('7-34'), fractions of depth "
            "('0.15-0.71'), 'published' or 'all'. Indices count MoE layers, not decoder layers. The default, "
            "'published', is the published band at any depth: layers 7..34 of 48, round(7/48*n)..round(34/48*n) of n."
        },
    )
    sara_loss_reduction: str = _choice_field(
        LOSS_REDUCTIONS,
        "How the alignment term is averaged over an optimizer step. 'step_mean' (the paper's formula over the "
        "step's batch): the mean over every anchored example of the step, all accumulation steps and processes "
        "counted, so the update does not depend on how the step is split. 'mean': the mean over each micro-batch's "
        "anchored examples, averaged over micro-batches and processes, like the load-balancing loss. 'sum': 'mean' "
        "summed over the accumulation steps and, with average_tokens_across_devices, over the processes (GA x "
        "processes times 'mean'): what the authors' released code effectively did in the published runs.",
    )
    sara_anchor_mode: str = _choice_field(
        ANCHOR_MODES,
        "'offline': the anchors' routing is computed once, with the model as it is before training, and "
        "cached (as published). 'online': it is recomputed with the current model at each step, without "
        "gradient.",
    )
    sara_anchor_path: str | None = field(
        default=None,
        metadata={
            "help": "Offline mode: a safetensors file of anchor distributions made by `hf-sara anchors` "
            "(or by an earlier run) to use instead of computing them. When None, they are computed at the start of "
            "training and cached as sara_anchors.safetensors in output_dir."
        },
    )
    sara_warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the training steps over which the alignment weight rises linearly from 0 to "
            "sara_weight (a curriculum). 0 applies the full weight from the first step."
        },
    )
    sara_pooling: str = _choice_field(
        POOLING_MODES,
        "Which real tokens are pooled into an example's routing distribution: 'all' (prompt and "
        "response, as published), 'prompt' (tokens left out of the SFT loss) or 'completion' (tokens in the SFT "
        "loss).",
    )
    anchor_prefix: str = field(
        default=DEFAULT_ANCHOR_PREFIX,
        metadata={
            "help": "Prefix of the dataset columns that hold the anchor: anchor_prompt/anchor_completion, "
            "anchor_messages, anchor_text or, for tokenized datasets, anchor_input_ids."
        },
    )
    anchor_sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an SFT loss on the anchor example itself, added to the loss. 0 (published) trains on "
            "the low-resource examples only."
        },
    )

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self.check_sara_arguments()

    def check_sara_arguments(self) -> None:
        """
        Refuses SARA settings out of their range.

        Raises:
            `ValueError`: naming the setting, its value and what it takes.
        """
        for name in ("sara_weight", "anchor_sft_weight", "sara_warmup_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        eval_batch_size = getattr(self, "per_device_eval_batch_size", 1)
        if eval_batch_size < 1:
            raise ValueError(
                f"`per_device_eval_batch_size` must be >= 1, got {eval_batch_size} (it is also the batch size of the "
                "offline anchors' computation)."
            )
        if self.sara_weight < 0:
            raise ValueError(f"`sara_weight` must be >= 0, got {self.sara_weight}.")
        for name, choices in (
            ("sara_anchor_mode", ANCHOR_MODES),
            ("sara_pooling", POOLING_MODES),
            ("sara_loss_reduction", LOSS_REDUCTIONS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {choices}, got {getattr(self, name)!r}.")
        if not 0.0 <= self.sara_warmup_ratio <= 1.0:
            raise ValueError(f"`sara_warmup_ratio` must lie in [0, 1], got {self.sara_warmup_ratio}.")
        if self.anchor_sft_weight < 0:
            raise ValueError(f"`anchor_sft_weight` must be >= 0, got {self.anchor_sft_weight}.")
        if not self.anchor_prefix:
            raise ValueError("`anchor_prefix` must be a non-empty string, such as 'anchor_'.")
        if self.sara_anchor_path is not None and self.sara_anchor_mode != "offline":
            raise ValueError("`sara_anchor_path` gives offline anchors; set `sara_anchor_mode='offline'` to use it.")


@dataclass
class SARATrainingArguments(SARAArguments, TrainingArguments):
    r"""
    transformers' [`~transformers.TrainingArguments`] with the SARA settings of [`SARAArguments`], for a trainer
    built from [`SARAMixin`] and a plain `transformers.Trainer` (or a subclass of it).

    ```python
    from transformers import Trainer
    from hf_sara import SARAMixin, SARATrainingArguments

    class SARATokenizedTrainer(SARAMixin, Trainer):
        pass

    args = SARATrainingArguments(output_dir="out", sara_weight=1.5)
    ```
    """


def convert_training_arguments(args: TrainingArguments, target: type[TrainingArguments]) -> TrainingArguments:
    """
    `args` as a `target` (`SARAConfig` from an `SFTConfig`, `SARATrainingArguments` from `TrainingArguments`, or
    back): the fields both have, field by field, not through `to_dict()`, which masks every `*_token` field
    (hub_token, eos_token, ...).
    """
    names = {field.name for field in dataclasses.fields(target) if field.init}
    return target(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(args) if field.name in names}
    )
