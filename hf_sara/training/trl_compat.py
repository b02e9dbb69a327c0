"""Work-arounds for what TRL's `SFTTrainer` gets wrong on some MoE families, applied only while it trains/evaluates."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn
from transformers import PreTrainedModel

from ..routing.families import num_experts


def _causal_lm(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def sft_trainer_compatibility(model: nn.Module) -> Iterator[None]:
    """
    Makes TRL 1.x's fused LM head work on families it trips over, and undoes it afterwards.

    - The fused head's load-balancing loss reads `config.num_experts`, which PhiMoE and GraniteMoE name
      `num_local_experts` (`AttributeError: ... has no attribute 'num_experts'`): the count is aliased as
      `num_experts` on the text config.
    - It finds the backbone through `base_model_prefix`, which `Llama4ForCausalLM` declares as `language_model`
      while its backbone is `model` (`... has no attribute 'last_hidden_state'`): the instance's prefix is pointed
      at `model`.
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
        yield
    finally:
        if added_num_experts:
            del text_config.num_experts
        if replaced_prefix:
            del causal_lm.base_model_prefix
