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


# Trainer tests: a tokenizer trained on the shipped pairs, a tiny Qwen3-MoE sized for it, the pairs in every format.

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
PAIRS_FILE = os.path.join(DATA_DIR, "pairs.jsonl")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def load_pairs():
    """The shipped pairs as a `datasets.Dataset` (prompt/completion, anchor_prompt/anchor_completion, language)."""
    from datasets import load_dataset

    return load_dataset("json", data_files=PAIRS_FILE, split="train")


_TOKENIZER = None


def pairs_tokenizer():
    """A byte-level BPE tokenizer trained on the shipped pairs, with a chat template that marks assistant turns."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        pairs = load_pairs()
        texts = [
            text for column in ("prompt", "completion", "anchor_prompt", "anchor_completion") for text in pairs[column]
        ]
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tokenizer.train_from_iterator(texts, trainer)
        _TOKENIZER = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
        _TOKENIZER.chat_template = CHAT_TEMPLATE
    return _TOKENIZER


def pairs_model(seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny Qwen3-MoE whose vocabulary fits `pairs_tokenizer()`."""
    tokenizer = pairs_tokenizer()
    extra = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    extra.update(overrides)
    return tiny_model("qwen3_moe", seed=seed, **extra).train()


def pairs_in_format(dataset_format: str):
    """The shipped pairs converted to one of SFTTrainer's dataset formats, on both sides."""
    pairs = load_pairs()
    if dataset_format == "prompt_completion":
        return pairs
    if dataset_format == "conversational_prompt_completion":

        def convert(row):
            return {
                "prompt": [{"role": "user", "content": row["prompt"]}],
                "completion": [{"role": "assistant", "content": row["completion"].strip()}],
                "anchor_prompt": [{"role": "user", "content": row["anchor_prompt"]}],
                "anchor_completion": [{"role": "assistant", "content": row["anchor_completion"].strip()}],
            }
    elif dataset_format == "messages":

        def convert(row):
            return {
                "messages": [
                    {"role": "user", "content": row["prompt"]},
                    {"role": "assistant", "content": row["completion"].strip()},
                ],
                "anchor_messages": [
                    {"role": "user", "content": row["anchor_prompt"]},
                    {"role": "assistant", "content": row["anchor_completion"].strip()},
                ],
            }
    elif dataset_format == "text":

        def convert(row):
            return {
                "text": row["prompt"] + row["completion"],
                "anchor_text": row["anchor_prompt"] + row["anchor_completion"],
            }
    else:
        raise ValueError(dataset_format)
    columns = ["prompt", "completion", "anchor_prompt", "anchor_completion"]
    converted = pairs.map(convert)
    if dataset_format != "conversational_prompt_completion":
        converted = converted.remove_columns(columns)
    return converted


TRAINING_ARGUMENTS = dict(
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    max_steps=4,
    learning_rate=1e-3,
    logging_steps=1,
    report_to="none",
    use_cpu=True,
    bf16=False,
    seed=0,
    data_seed=0,
    save_strategy="no",
    max_length=64,
    gradient_checkpointing=False,
    dataloader_num_workers=0,
    disable_tqdm=True,
)


def sara_config(output_dir: str, **overrides: Any):
    """A SARAConfig for quick, deterministic CPU runs, aligning all 4 layers of the tiny models."""
    from hf_sara import SARAConfig

    return SARAConfig(output_dir=str(output_dir), **{**TRAINING_ARGUMENTS, "sara_layers": "all", **overrides})


def sft_config(output_dir: str, **overrides: Any):
    """The SFTConfig that matches `sara_config`, for TRL's plain SFTTrainer."""
    from trl import SFTConfig

    return SFTConfig(output_dir=str(output_dir), **{**TRAINING_ARGUMENTS, **overrides})


def distributed_config(output_dir: str, **overrides: Any):
    """
    A `sara_config` for 2-process CPU runs under `accelerate launch`. Under DeepSpeed, `use_cpu` must stay False
    (accelerate ignores DeepSpeed when it is set) and the backend is gloo; DDP and FSDP run with `use_cpu`.
    SGD with a large learning rate makes the update linear in the gradient, so runs can be compared update for update.
    """
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    engine_arguments = dict(use_cpu=False, ddp_backend="gloo") if deepspeed else {}
    return sara_config(output_dir, **{"optim": "sgd", "learning_rate": 0.5, **engine_arguments, **overrides})
