"""Tiny models, tokenizers and pairs, built offline in seconds: for tests, examples, benchmarks and the demo.

- [`tiny_model`]: a randomly initialised tiny causal LM of any MoE family hf_sara is tested on ([`TINY_FAMILIES`]).
- [`train_tokenizer`]: a byte-level BPE tokenizer trained on given texts with the `tokenizers` library.
- [`load_demo_pairs`], [`pair_texts`]: the embedded parallel instruction set and its texts.
- [`tiny_qwen3_moe`], [`save_tiny_model`]: the demo's tiny Qwen3-MoE, in memory or saved like a Hub checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3MoeForCausalLM,
)

from .files.package_data import package_data_path
from .training.paired_data import DEFAULT_ANCHOR_PREFIX, PROMPT_COMPLETION_FIELDS

DEMO_DATA_FILE = "parallel_instructions.jsonl"
TINY_FAMILIES_FILE = "tiny_families.json"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]

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


@dataclass(frozen=True)
class TinyFamily:
    """A family that the tests build: its `model_type` and the config overrides that make it tiny."""

    model_type: str
    overrides: dict[str, Any] = field(default_factory=dict)


def _tiny_families() -> list[TinyFamily]:
    # One JSON object per family: the config keys that make it tiny, on top of `COMMON` (8 experts, top-k 2 or 1).
    with open(package_data_path("data", TINY_FAMILIES_FILE), encoding="utf-8") as handle:
        return [TinyFamily(model_type, overrides) for model_type, overrides in json.load(handle).items()]


# Tiny configs of every family the tests verify (`FAMILIES[...].tested` in `hf_sara.routing.families`).
TINY_FAMILIES = _tiny_families()
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


def train_tokenizer(
    texts: list[str],
    vocab_size: int = 1024,
    special_tokens: list[str] = SPECIAL_TOKENS,
    unk_token: str | None = "<unk>",
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """
    A byte-level BPE tokenizer trained on `texts` with the `tokenizers` library, padding on the right.

    Args:
        texts (`list[str]`): the training texts.
        vocab_size (`int`, *optional*, defaults to `1024`): the vocabulary size, special tokens included.
        special_tokens (`list[str]`, *optional*): added first; they must include `<pad>` and `<eos>`.
        unk_token (`str` or `None`, *optional*, defaults to `"<unk>"`): the unknown token, one of `special_tokens`.
        chat_template (`str`, *optional*): a chat template to set.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token=unk_token, padding_side="right"
    )
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


def demo_data_path() -> str:
    """Path of the embedded parallel instruction set (272 pairs: sw, hi, bn, es with English anchors)."""
    return package_data_path("data", DEMO_DATA_FILE)


def load_demo_pairs() -> Dataset:
    """The embedded parallel instruction set as a paired dataset (prompt/completion, anchor_*, language)."""
    return load_dataset("json", data_files=demo_data_path(), split="train")


def pair_texts(dataset: Dataset, anchor_prefix: str = DEFAULT_ANCHOR_PREFIX) -> list[str]:
    """Every prompt and completion of both sides of a prompt/completion paired dataset."""
    columns = [*PROMPT_COMPLETION_FIELDS, *(anchor_prefix + name for name in PROMPT_COMPLETION_FIELDS)]
    return [text for column in columns for text in dataset[column] if text]


def tiny_qwen3_moe(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen3MoeForCausalLM:
    """The demo's tiny Qwen3-MoE (4 layers, 8 experts, top-2) built from its config, sized for `tokenizer`."""
    sizes = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, head_dim=16)
    tokens = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = tiny_config("qwen3_moe", vocab_size=len(tokenizer), max_position_embeddings=256, **sizes, **tokens)
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config)


def save_tiny_model(path: str, seed: int = 0) -> str:
    """
    Saves the demo's tiny, untrained Qwen3-MoE and a tokenizer trained on the embedded pairs to `path`, like a Hub
    checkpoint, and returns `path`. The examples and notebooks use it when `HF_SARA_TINY=1`, so they run offline in
    seconds.
    """
    tokenizer = train_tokenizer(pair_texts(load_demo_pairs()))
    tiny_qwen3_moe(tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
