"""Work-arounds for what transformers and TRL get wrong when they train MoE models, each applied only where it is
needed and named with the release it was last seen in: drop one once the oldest supported release has the fix.

- TRL's fused LM head on some families, and the router logits that older transformers does not record for the
  load-balancing loss ([`sft_trainer_compatibility`]);
- `output_router_logits` left on by `SFTTrainer` after training ([`restore_output_router_logits`]);
- resumed checkpoints loaded without transformers' weight conversion ([`load_checkpoint_with_conversion`]);
- whether `Trainer` divides a loss by the accumulation steps, as each transformers release decides it
  ([`loss_is_scaled_for_accumulation`]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers import PreTrainedModel
from transformers.utils import logging

from ..compat import late_router_logits_recorded
from ..files.checkpoints import checkpoint_weight_names
from ..routing.families import num_experts

logger = logging.get_logger(__name__)


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def sft_trainer_compatibility(model: nn.Module) -> Iterator[None]:
    """
    Makes TRL's fused LM head work on families it trips over, and undoes it afterwards (seen with TRL 1.16.0, the
    newest release as of 2026-12).

    - The fused head's load-balancing loss reads `config.num_experts`, which PhiMoE and GraniteMoE name
      `num_local_experts` (`AttributeError: ... has no attribute 'num_experts'`): the count is aliased as
      `num_experts` on the text config.
    - It finds the backbone through `base_model_prefix`, which `Llama4ForCausalLM` declares as `language_model`
      while its backbone is `model` (`... has no attribute 'last_hidden_state'`): the instance's prefix is pointed
      at `model`.

    Also records, for the load-balancing loss, the router logits of the families whose routers transformers declares
    only from 5.18.0/5.19.0 ([`~hf_sara.compat.late_router_logits_recorded`]).
    """
    causal_lm = _causal_lm(model)
    text_config = causal_lm.config.get_text_config()
    added_num_experts = False
    if not hasattr(text_config, "num_experts") and num_experts(text_config) is not None:
        text_config.num_experts = num_experts(text_config)
        added_num_experts = True
    replaced_prefix = False
    prefix = getattr(causal_lm, "base_model_prefix", "")
    backbone = getattr(causal_lm, "model", None)
    if getattr(causal_lm, prefix, None) is None and isinstance(backbone, PreTrainedModel):
        causal_lm.base_model_prefix = "model"
        replaced_prefix = True
    try:
        with late_router_logits_recorded(causal_lm):
            yield
    finally:
        if added_num_experts:
            del text_config.num_experts
        if replaced_prefix:
            del causal_lm.base_model_prefix


def output_router_logits_of(config: Any) -> bool:
    """The `output_router_logits` setting of a (composite) config's text config."""
    return bool(getattr(config.get_text_config(), "output_router_logits", False))


@contextlib.contextmanager
def restore_output_router_logits(model: nn.Module, value: bool) -> Iterator[None]:
    """
    Puts `value` back as the model's `output_router_logits` when the block ends: `SFTTrainer` sets it to `True` for the
    load-balancing loss and leaves it so after training, and `generate()` then fails at the first decoding step on
    several families (seen with TRL 1.16.0).
    """
    try:
        yield
    finally:
        text_config = model.config.get_text_config()
        if hasattr(text_config, "output_router_logits"):
            text_config.output_router_logits = value


def load_checkpoint_with_conversion(model: nn.Module, checkpoint: str) -> None:
    """
    Loads a checkpoint's weights into `model` through `from_pretrained` when their names do not cover the model's.

    transformers 5 saves a model in its checkpoint format (e.g. one tensor per expert), but `Trainer` loads that state
    dict into the live model without converting it back, so fused MoE experts (`experts.gate_up_proj`) silently keep
    the weights they had before the resume (seen with transformers 5.23.0). `from_pretrained` converts. Not for
    sharded engines or PEFT models, which `Trainer` loads its own way.

    Raises:
        `ValueError`: when the checkpoint was saved from another architecture or size.
    """
    stored = checkpoint_weight_names(checkpoint)
    if stored is None or set(model.state_dict()) <= stored:
        return
    dtype = next(model.parameters()).dtype
    loaded = type(model).from_pretrained(checkpoint, dtype=dtype)
    try:
        model.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"The checkpoint {checkpoint} does not fit this model ({str(error).splitlines()[0]}): it was saved from "
            "another architecture or size. Resume with the model that run started from."
        ) from None
    logger.info(f"SARA: loaded the weights of {checkpoint} with transformers' checkpoint conversion.")


def loss_is_scaled_for_accumulation(trainer: Any, num_items_in_batch: Any) -> bool:
    """
    Whether `Trainer.training_step` leaves the loss undivided by the gradient-accumulation steps (the loss was
    normalised by `num_items_in_batch`), as transformers decides it: `Trainer.loss_is_scaled_for_ga` when a trainer
    sets it (transformers >= 5.19), else a model that takes loss kwargs with a token count, or a `compute_loss_func`.
    A term added to such a loss must be divided by the accumulation steps itself.
    """
    override = getattr(trainer, "loss_is_scaled_for_ga", None)
    if override is not None:
        return bool(override)
    return bool(
        (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None)
        or getattr(trainer, "compute_loss_func", None) is not None
    )
