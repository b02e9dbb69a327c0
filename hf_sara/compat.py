"""What hf_sara does differently with the older releases it supports (down to transformers 5.14.1, TRL 1.8.0 and
PEFT 0.19.1, the pins of Axolotl 0.19): every version check of the package is here, and each work-around names the
release that lets it go. Drop one once the oldest supported release is at least that one.

- router declarations that transformers added in 5.18 and 5.19 ([`router_declaration`], and their router logits
  recorded for the MoE load-balancing loss: [`late_router_logits_recorded`], until transformers 5.19.0);
- activation checkpointing under its new name ([`enable_activation_checkpointing`], until transformers 5.23.0);
- checksums of weights that FSDP's CPU-RAM-efficient loading left as zeros off rank 0 ([`checksum_of_rank_zero`],
  until transformers 5.23.0);
- LoRA adapters loaded on MoE models with checkpoint conversion ([`peft_adapter_loading`], until PEFT 0.20.0);
- the per-token log-probabilities of TRL's fused LM head ([`causal_lm_loss`], until TRL 1.15.0);
- training arguments under their new names ([`sft_config_arguments`], until transformers 5.23.0 and TRL 1.14.0);
- examples that truncation leaves without a token in the loss ([`rows_kept_by_preparation`], until TRL 1.9.0).

The TRL work-arounds that need hf_sara's routing facts stay in `hf_sara.training.compat`. This module imports nothing
from hf_sara, so that every layer (routing included) can use it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Iterator
from typing import Any

import torch
from packaging.version import Version
from torch import nn


@functools.cache
def installed_version(package: str) -> Version:
    """The installed release of `package` (`"transformers"`, `"trl"`, `"peft"`, ...), without its local label."""
    from importlib.metadata import version

    return Version(Version(version(package)).base_version)


def is_older_than(package: str, release: str) -> bool:
    """Whether the installed `package` predates `release`: the test for a work-around that `release` lets go."""
    return installed_version(package) < Version(release)


# ---------------------------------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------------------------------

# Router declarations (`_can_record_outputs["router_logits"]`) of transformers' later releases, by the `model_type` of
# the model that owns the routers: (router class, index of the logits in its output, first release that declares it).
# Older releases declare none, or (Llama 4) the MoE block, whose output holds the same logits; their router classes
# already return the logits at that index.
LATE_ROUTER_DECLARATIONS: dict[str, tuple[str, int, str]] = {
    "granitemoe": ("GraniteMoeTopKRouter", 2, "5.18.0"),
    "granitemoeshared": ("GraniteMoeSharedTopKRouter", 2, "5.18.0"),
    "deepseek_v2": ("DeepseekV2TopkRouter", 0, "5.19.0"),
    "deepseek_v3": ("DeepseekV3TopkRouter", 0, "5.19.0"),
    "dots1": ("Dots1TopkRouter", 0, "5.19.0"),
    "glm4_moe": ("Glm4MoeTopkRouter", 0, "5.19.0"),
    "hunyuan_v1_moe": ("HunYuanMoEV1Gate", 0, "5.19.0"),
    "lfm2_moe": ("Lfm2MoeTopKRouter", 0, "5.19.0"),
    "llama4_text": ("Llama4Router", 1, "5.19.0"),
}


_MISSING = object()


def late_router_declaration(model: nn.Module) -> Any:
    """
    For a model of a family in [`LATE_ROUTER_DECLARATIONS`] under a transformers release older than the one that
    declares its routers, that declaration (an `OutputRecorder` on the router class of the model's own module);
    `None` otherwise, and for remote code.
    """
    late = LATE_ROUTER_DECLARATIONS.get(getattr(getattr(model, "config", None), "model_type", None))
    if late is None or not is_older_than("transformers", late[2]):
        return None
    router_class = getattr(sys.modules.get(type(model).__module__), late[0], None)
    if router_class is None:
        return None
    from transformers.utils.output_capturing import OutputRecorder

    return OutputRecorder(router_class, index=late[1])


def router_declaration(model: nn.Module) -> Any:
    """
    The `_can_record_outputs["router_logits"]` entry of a transformers (sub-)model, or `None`: its own, or for the
    families of [`LATE_ROUTER_DECLARATIONS`] under transformers older than 5.18.0 or 5.19.0, the declaration of the
    release that declares their routers, so that their routers are found as on newer releases.
    """
    late = late_router_declaration(model)
    if late is not None:
        return late
    return (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")


@contextlib.contextmanager
def late_router_logits_recorded(model: nn.Module) -> Iterator[None]:
    """
    Makes transformers record the router logits (`output_router_logits=True`) of the families of
    [`LATE_ROUTER_DECLARATIONS`] under the releases that do not declare their routers yet, for the block: their model
    classes get the later release's declaration. Without it their MoE load-balancing loss has no logits to work with,
    and training GraniteMoE with it fails (`AttributeError: 'int' object has no attribute 'to'`, transformers 5.14.1
    with TRL 1.8.0); the DeepSeek-style families have no such loss. The hooks installed on the model stay, inactive
    once the block ends.
    """
    from transformers import PreTrainedModel
    from transformers.utils import output_capturing

    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    restore: dict[type, tuple[Any, Any]] = {}
    for module in model.modules():
        recorder = late_router_declaration(module) if isinstance(module, PreTrainedModel) else None
        if recorder is None or registry is None:
            continue
        declarations = dict(module._can_record_outputs or {})
        if declarations.get("router_logits") is not None and type(module) not in restore:
            continue  # declared by this release (Llama 4's MoE block): recorded already
        cls = type(module)
        if cls not in restore:
            restore[cls] = (cls.__dict__.get("_can_record_outputs", _MISSING), registry.get(str(cls), _MISSING))
            cls._can_record_outputs = registry[str(cls)] = {**declarations, "router_logits": recorder}
        if not module.__dict__.get("_hf_sara_router_logits_recorded", False):
            if getattr(module, "_output_capturing_hooks_installed", False):
                output_capturing.recursively_install_hooks(module, "", [("router_logits", recorder)])
            else:
                output_capturing.maybe_install_capturing_hooks(module)
            module._hf_sara_router_logits_recorded = True
    try:
        yield
    finally:
        for cls, (attribute, entry) in restore.items():
            if attribute is _MISSING:
                del cls._can_record_outputs
            else:
                cls._can_record_outputs = attribute
            if entry is _MISSING:
                registry.pop(str(cls), None)
            else:
                registry[str(cls)] = entry


def enable_activation_checkpointing(
    model: nn.Module, checkpointing_kwargs: dict[str, Any] | None = None, every_n_layers: int = 1
) -> None:
    """
    Turns on transformers' activation checkpointing of `model` (a `PreTrainedModel` or a PEFT model):
    `activation_checkpointing_enable` from transformers 5.23.0, `gradient_checkpointing_enable` before it.

    Args:
        model (`torch.nn.Module`):
            The model.
        checkpointing_kwargs (`dict`, *optional*):
            Passed to `torch.utils.checkpoint.checkpoint` (e.g. `{"use_reentrant": False}`).
        every_n_layers (`int`, *optional*, defaults to 1):
            Checkpoint every n-th decoder layer only (transformers 5.16.0 and later).

    Raises:
        `ValueError`: for `every_n_layers > 1` before transformers 5.16.0.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(checkpointing_kwargs, every_n_layers=every_n_layers)
        return
    extra = {}
    if every_n_layers != 1:
        if not supports_every_n_layers():
            raise ValueError(
                f"Checkpointing every {every_n_layers} layers needs transformers 5.16.0 or later (installed: "
                f"{installed_version('transformers')})."
            )
        extra["every_n_layers"] = every_n_layers
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs, **extra)


def supports_every_n_layers() -> bool:
    """Whether transformers can checkpoint every n-th decoder layer only (from transformers 5.16.0)."""
    from transformers import PreTrainedModel

    method = getattr(PreTrainedModel, "activation_checkpointing_enable", PreTrainedModel.gradient_checkpointing_enable)
    return "every_n_layers" in inspect.signature(method).parameters or not is_older_than("transformers", "5.16.0")


def checksum_of_rank_zero(checksum: str) -> str:
    """
    Rank 0's `checksum` of the model's weights, on every rank, when the other ranks may not hold those weights yet.

    Before transformers 5.23.0, under FSDP's CPU-RAM-efficient loading, `from_pretrained` fills the parameters of every
    rank but each node's first with zeros, which the engine overwrites with rank 0's weights only when it prepares the
    model (`sync_module_states`): a checksum taken before, on those ranks, would be of the zeros. Every rank must call
    it; outside that case `checksum` is returned as it is.
    """
    if not is_older_than("transformers", "5.23.0") or not torch.distributed.is_initialized():
        return checksum
    from transformers.integrations import is_fsdp_enabled

    if torch.distributed.get_world_size() == 1 or not is_fsdp_enabled():
        return checksum
    received = [checksum]
    torch.distributed.broadcast_object_list(received, src=0)
    return received[0]


# ---------------------------------------------------------------------------------------------------------------------
# PEFT
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def peft_adapter_loading() -> Iterator[None]:
    """
    Lets PEFT before 0.20.0 load a LoRA adapter on a model that transformers converts at loading (fused MoE experts:
    Qwen3-MoE, Mixtral, ...). PEFT 0.19 rebuilds transformers' `WeightConverter`s with the arguments
    `distributed_operation` and `quantization_operation`, which the constructor of transformers 5.x does not take
    (`TypeError: WeightConverter.__init__() got an unexpected keyword argument 'distributed_operation'`); for the
    block, the constructor takes them and sets them as attributes, as PEFT 0.20.0 does. Does nothing with PEFT 0.20.0
    and later.

    ```python
    with peft_adapter_loading():
        model = PeftModel.from_pretrained(model, adapter)
    ```
    """
    if not is_older_than("peft", "0.20.0"):
        yield
        return
    from transformers.core_model_loading import WeightConverter

    if "distributed_operation" in inspect.signature(WeightConverter.__init__).parameters:
        yield
        return
    original = WeightConverter.__init__

    @functools.wraps(original)
    def init(self, *args, distributed_operation=None, quantization_operation=None, **kwargs):
        original(self, *args, **kwargs)
        self.distributed_operation = distributed_operation
        self.quantization_operation = quantization_operation

    WeightConverter.__init__ = init
    try:
        yield
    finally:
        WeightConverter.__init__ = original


def load_peft_adapter(model: nn.Module, adapter: str, **kwargs: Any) -> nn.Module:
    """`PeftModel.from_pretrained(model, adapter, **kwargs)`, under [`peft_adapter_loading`]."""
    from peft import PeftModel

    with peft_adapter_loading():
        return PeftModel.from_pretrained(model, adapter, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------------------------------


def has_fused_lm_head() -> bool:
    """Whether `SFTTrainer` gives the model TRL's fused LM head (`fused_lm_head=True`): from TRL 1.15.0."""
    return not is_older_than("trl", "1.15.0")


def sft_config_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """
    `SFTConfig` (or [`SARAConfig`]) keyword arguments as the installed transformers and TRL name them:

    - `activation_checkpointing` and `activation_checkpointing_kwargs` are `gradient_checkpointing` and
      `gradient_checkpointing_kwargs` before transformers 5.23.0;
    - `router_aux_loss_coef=None` (the coefficient of the model's config) is accepted from TRL 1.14.0; before it, the
      argument is left out and TRL's default (0.001) applies.
    """
    arguments = dict(arguments)
    if is_older_than("transformers", "5.23.0"):
        for name in ("activation_checkpointing", "activation_checkpointing_kwargs"):
            if name in arguments:
                arguments[name.replace("activation", "gradient")] = arguments.pop(name)
    if (
        is_older_than("trl", "1.14.0")
        and "router_aux_loss_coef" in arguments
        and arguments["router_aux_loss_coef"] is None
    ):
        del arguments["router_aux_loss_coef"]
    return arguments


def causal_lm_loss(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """
    The mean negative log-likelihood of the tokens that `inputs["labels"]` keeps (0 when it keeps none), computed
    through the model as `SFTTrainer` prepared it, without the MoE load-balancing loss.

    From TRL 1.15.0 through TRL's fused LM head (`fused_lm_head=True`, the per-token log-probabilities without the full
    logits); before it, from the logits (or from the model's own loss when TRL's `loss_type="chunked_nll"` patched the
    forward to return none).
    """
    if has_fused_lm_head():
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        return -outputs.log_probs.sum() / outputs.label_mask.sum().clamp(min=1)
    labels = inputs["labels"]
    outputs = model(**inputs, use_cache=False, output_router_logits=False)
    if outputs.logits is None:
        return outputs.loss
    shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    token_losses = nn.functional.cross_entropy(
        outputs.logits.float().flatten(0, -2), shift_labels.flatten().to(outputs.logits.device), reduction="sum"
    )
    return token_losses / (shift_labels != -100).sum().clamp(min=1)


def rows_kept_by_preparation(prepared: Any, row_column: str, max_length: int | None) -> set[int]:
    """
    The rows (their `row_column` ids) that `SFTTrainer`'s dataset preparation kept with a token in the loss.

    From TRL 1.9.0 it drops the examples that truncation to `max_length` leaves without a token in the loss (a prompt
    that fills `max_length`, say); TRL 1.8 keeps them, fully masked. Those are left out here as well, so that hf_sara
    finds (and refuses) the same rows on every release.

    Args:
        prepared ([`~datasets.Dataset`]):
            A dataset as `SFTTrainer._prepare_dataset` returned it, with the `row_column` hf_sara added.
        row_column (`str`):
            The column of the rows' ids.
        max_length (`int`, *optional*):
            The `max_length` it was truncated to.
    """
    if max_length is None or not is_older_than("trl", "1.9.0") or "labels" not in prepared.column_names:
        return set(prepared[row_column])
    emptied = prepared.filter(
        lambda input_ids, labels: len(input_ids) >= max_length and all(label == -100 for label in labels),
        input_columns=["input_ids", "labels"],
    )
    return set(prepared[row_column]) - set(emptied[row_column])
