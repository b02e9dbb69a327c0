"""Tiny MoE models built from config classes, one per family, shared by the tests and `utils/families_table.py`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB_SIZE = 128
NUM_EXPERTS = 8

COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_MLA = dict(
    num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8
)


@dataclass(frozen=True)
class TinyFamily:
    """A family under test: its `model_type`, the config overrides that make it tiny, and what it is known to do."""

    model_type: str
    overrides: dict[str, Any] = field(default_factory=dict)
    # Whether the router's own top-k weights are ratios of its scoring function (false for PhiMoE's sparsemixer).
    weights_follow_scoring: bool = True


TINY_FAMILIES = [
    TinyFamily("qwen3_moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
    TinyFamily(
        "qwen2_moe",
        dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    ),
    TinyFamily("mixtral", dict(num_local_experts=8, num_experts_per_tok=2)),
    TinyFamily("phimoe", dict(num_local_experts=8, num_experts_per_tok=2), weights_follow_scoring=False),
    TinyFamily("olmoe", dict(num_experts=8, num_experts_per_tok=2)),
    TinyFamily("granitemoe", dict(num_local_experts=8, num_experts_per_tok=2)),
    TinyFamily("granitemoeshared", dict(num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=32)),
    TinyFamily(
        "deepseek_v2",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            first_k_dense_replace=1,
            n_shared_experts=1,
            topk_method="greedy",
            **_MLA,
        ),
    ),
    TinyFamily(
        "deepseek_v3",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
            **_MLA,
        ),
    ),
    TinyFamily(
        "glm4_moe",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
        ),
    ),
    TinyFamily(
        "dots1",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=1,
            n_shared_experts=1,
        ),
    ),
    TinyFamily(
        "gpt_oss",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            layer_types=["sliding_attention", "full_attention"] * 2,
            sliding_window=16,
        ),
    ),
    TinyFamily(
        "jamba",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            expert_layer_period=2,
            expert_layer_offset=1,
            mamba_d_state=4,
            mamba_d_conv=4,
            mamba_dt_rank=4,
        ),
    ),
    TinyFamily(
        "llama4_text",
        dict(
            num_local_experts=8,
            num_experts_per_tok=1,
            intermediate_size_mlp=64,
            interleave_moe_layer_step=1,
            no_rope_layers=[1, 1, 1, 1],
        ),
    ),
    TinyFamily(
        "qwen3_next",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            layer_types=["linear_attention", "full_attention"] * 2,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
        ),
    ),
    TinyFamily("ernie4_5_moe", dict(moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_layer_start_index=1)),
    TinyFamily("hunyuan_v1_moe", dict(num_experts=8, moe_topk=2, moe_intermediate_size=32, head_dim=8)),
    TinyFamily(
        "minimax",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            layer_types=["linear_attention", "full_attention"] * 2,
            block_size=16,
        ),
    ),
    TinyFamily(
        "lfm2_moe",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            num_dense_layers=1,
            layer_types=["conv", "full_attention"] * 2,
        ),
    ),
    TinyFamily("flex_olmo", dict(num_experts=8, num_experts_per_tok=2)),
]
FAMILIES_BY_TYPE = {family.model_type: family for family in TINY_FAMILIES}
MODEL_TYPES = [family.model_type for family in TINY_FAMILIES]


def tiny_config(model_type: str, **extra: Any):
    """The tiny config of a family, with `extra` overrides."""
    family = FAMILIES_BY_TYPE[model_type]
    return AutoConfig.for_model(model_type, **{**COMMON, **family.overrides, **extra})


def tiny_model(model_type: str, seed: int = 0, **extra: Any) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of the family, in eval mode, seeded."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **extra))
    return model.eval()


def random_batch(batch_size: int = 3, seq_len: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and a right-padded attention mask whose rows have different lengths."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB_SIZE, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch_size):
        attention_mask[row, seq_len - 2 * row :] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, COMMON["pad_token_id"])
    return input_ids, attention_mask


def router_parameters(model: torch.nn.Module, site_name: str) -> list[torch.nn.Parameter]:
    """The trainable parameters of one router."""
    return [p for p in model.get_submodule(site_name).parameters() if p.requires_grad]
