"""`SARAConfig`: TRL's `SFTConfig` plus the SARA settings."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available
from trl import SFTConfig

from ..routing.layers import DEFAULT_LAYERS
from ..routing.pooling import POOLING_MODES
from .paired_data import DEFAULT_ANCHOR_PREFIX

ANCHOR_MODES = ("offline", "online")
LOSS_REDUCTIONS = ("mean", "step_mean", "sum")


def _choice_field(choices: tuple[str, ...], help: str):
    """A string setting whose value is one of `choices`, the first by default (the command line offers them)."""
    return field(default=choices[0], metadata={"help": help, "choices": list(choices)})


@dataclass
class SARAConfig(SFTConfig):
    r"""
    Configuration class for the [`SARATrainer`].

    Holds every [`~trl.SFTConfig`] argument, plus the settings of the SARA routing alignment. The defaults are the
    published ones (Qwen3-30B-A3B and Phi-3.5-MoE-instruct need no change). One `SFTConfig` default differs: `bf16`
    left unset is turned on only where the hardware supports it (TRL turns it on everywhere, which fails on a CPU-only
    machine or a Colab T4).

    Parameters:
        sara_weight (`float`, *optional*, defaults to `1.5`):
            Weight `lambda_SARA` of the Jensen-Shannon alignment loss added to the SFT loss (published: 1.5, swept
            0.5..2.0). With `0.0` the trainer trains exactly like `SFTTrainer` and only logs the divergence.
        sara_layers (`str`, *optional*, defaults to `"published"`):
            The aligned MoE layers: indices (`"7,9"`), inclusive ranges (`"7-34"`), fractions of depth
            (`"0.15-0.71"`), `"published"` or `"all"`. Indices count MoE layers, not decoder layers. The default,
            `"published"`, is the published band at any depth: layers 7..34 of Qwen3-30B-A3B's 48, i.e.
            `round(7/48 * n)..round(34/48 * n)` of `n` (the same as `sara_alignment_loss(layers=None)`).
        sara_loss_reduction (`str`, *optional*, defaults to `"mean"`):
            How the alignment term of the micro-batches and processes of one optimizer step is combined. `"mean"`
            (the paper's formula): averaged, like the SFT loss, so `sara_weight` weighs the per-batch mean JS.
            `"sum"`: summed over the gradient-accumulation steps and, with `average_tokens_across_devices=True`, over
            the processes: `gradient_accumulation_steps x num_processes` times `"mean"`. The authors' released code
            adds its term inside the model's forward, which transformers' `Trainer` neither divides by the
            accumulation steps nor keeps from being multiplied by the number of processes: `"sum"` reproduces the
            published runs' effective weight.
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
            `anchor_messages` or `anchor_text`.
        anchor_sft_weight (`float`, *optional*, defaults to `0.0`):
            Weight of an SFT loss on the anchor example itself, added to the loss. 0 (published) trains on the
            low-resource examples only.
    """

    sara_weight: float = field(
        default=1.5,
        metadata={
            "help": "Weight of the Jensen-Shannon alignment loss added to the SFT loss (published: 1.5, swept "
            "0.5..2.0). With 0.0 the trainer trains exactly like SFTTrainer and only logs the divergence."
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
        "How the alignment term of the micro-batches and processes of one optimizer step is combined. "
        "'mean' (the paper's formula): averaged, like the SFT loss. 'sum': summed over the gradient-accumulation "
        "steps and, with average_tokens_across_devices, over the processes, i.e. GA x processes times 'mean': "
        "what the authors' released code effectively did in the published runs.",
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
            "anchor_messages or anchor_text."
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
        # SFTConfig turns bf16 on by default, which fails on machines that cannot run it (a CPU, a Colab T4). Unless
        # asked for explicitly, use it only where it is available.
        if self.bf16 is None and not self.fp16:
            self.bf16 = self.use_cpu or is_torch_bf16_gpu_available() or is_torch_xla_available()
        super().__post_init__()
        for name in ("sara_weight", "anchor_sft_weight", "sara_warmup_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
        if self.per_device_eval_batch_size < 1:
            raise ValueError(
                f"`per_device_eval_batch_size` must be >= 1, got {self.per_device_eval_batch_size} (it is also the "
                "batch size of the offline anchors' computation)."
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
        if self.packing and self.packing_strategy == "wrapped":
            raise ValueError(
                "`packing_strategy='wrapped'` cuts examples at arbitrary points, so an example's routing can no "
                "longer be paired with its anchor's. Use `packing_strategy='bfd'` or `'bfd_split'`, or "
                "`padding_free=True`."
            )
        if self.sara_anchor_path is not None and self.sara_anchor_mode != "offline":
            raise ValueError("`sara_anchor_path` gives offline anchors; set `sara_anchor_mode='offline'` to use it.")


def convert_training_arguments(args: TrainingArguments, target: type[TrainingArguments]) -> TrainingArguments:
    """
    `args` as a `target` (`SARAConfig` from an `SFTConfig`, or back): the fields both have, field by field, not
    through `to_dict()`, which masks every `*_token` field (hub_token, eos_token, ...).
    """
    names = {field.name for field in dataclasses.fields(target) if field.init}
    return target(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(args) if field.name in names}
    )
