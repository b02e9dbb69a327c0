"""Tiny MoE models built from config classes, one per family, shared by the tests and `utils/families_table.py`."""

from __future__ import annotations

import logging
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
logging.getLogger("transformers").setLevel(logging.ERROR)

from hf_sara.testing import (  # noqa: E402
    COMMON,
    FAMILIES_BY_TYPE,
    MODEL_TYPES,
    NUM_EXPERTS,
    VOCAB_SIZE,
    random_batch,
    tiny_config,
    tiny_model,
    train_tokenizer,
)

__all__ = ["COMMON", "FAMILIES_BY_TYPE", "MODEL_TYPES", "NUM_EXPERTS", "VOCAB_SIZE", "random_batch", "tiny_config"]


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


def without_anchors(dataset, rows: list[int]):
    """`dataset` with the anchors of `rows` removed."""
    from datasets import Dataset

    records = dataset.to_list()
    for row in rows:
        records[row].update(anchor_prompt=None, anchor_completion=None)
    return Dataset.from_list(records)


_TOKENIZER = None


def pairs_tokenizer():
    """A byte-level BPE tokenizer trained on the shipped pairs, with a chat template that marks assistant turns."""
    global _TOKENIZER
    if _TOKENIZER is None:
        pairs = load_pairs()
        texts = [
            text for column in ("prompt", "completion", "anchor_prompt", "anchor_completion") for text in pairs[column]
        ]
        _TOKENIZER = train_tokenizer(
            texts, vocab_size=400, special_tokens=SPECIAL_TOKENS, unk_token=None, chat_template=CHAT_TEMPLATE
        )
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


# One SGD step without clipping at a constant rate: the update is linear in the gradient, so the alignment term's share
# of an update is the difference with a run of weight 0.
LINEAR_STEP = dict(max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0)


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


# Anchors files read and written whole, to damage them in tests (a trainer only ever writes them row by row).


def read_anchor_file(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of an anchors file, and its metadata."""
    from safetensors.torch import load_file

    from hf_sara.training.anchors.file import MappedAnchorFile

    return load_file(os.fspath(path)), MappedAnchorFile(path).metadata


def write_anchor_file(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Writes `tensors` and `metadata` as an anchors file, in one step."""
    from hf_sara.training.anchors.file import AnchorFileWriter

    shapes = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in tensors.items()}
    with AnchorFileWriter(path, shapes, metadata) as writer:
        for name, tensor in tensors.items():
            writer.write(name, slice(None), tensor)
        writer.commit()
