"""The embedded default: a small parallel instruction set, a tokenizer trained on it, a tiny Qwen3-MoE, and the demo
that fine-tunes it with plain SFT and with SARA from the same start."""

from __future__ import annotations

import os
import random
from importlib import resources
from typing import Any

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from .analysis import RoutingReport, analyze_routing, divergence_table, markdown_table, write_report
from .config import SARAConfig
from .layers import DEFAULT_LAYERS, resolve_layers
from .patching import patch_model
from .trainer import SARATrainer

logger = logging.get_logger(__name__)

DEMO_DATA_FILE = "parallel_instructions.jsonl"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
LORA_ROUTER = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.gate.weight"])


def demo_data_path() -> str:
    """Path of the embedded parallel instruction set (272 pairs: sw, hi, bn, es with English anchors)."""
    return str(resources.files("hf_sara").joinpath("data", DEMO_DATA_FILE))


def load_demo_pairs() -> Dataset:
    """The embedded parallel instruction set as a paired dataset (prompt/completion, anchor_*, language)."""
    return load_dataset("json", data_files=demo_data_path(), split="train")


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts` with the `tokenizers` library (`<pad>`, `<eos>`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="right"
    )


def pair_texts(dataset: Dataset) -> list[str]:
    """Every prompt and completion of both sides of a paired dataset."""
    columns = ("prompt", "completion", "anchor_prompt", "anchor_completion")
    return [text for column in columns for text in dataset[column] if text]


def demo_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen3MoeForCausalLM:
    """A tiny Qwen3-MoE (4 layers, 8 experts, top-2) built from its config, sized for `tokenizer`."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return Qwen3MoeForCausalLM(config)


def save_tiny_model(path: str, seed: int = 0) -> str:
    """
    Saves a tiny, untrained Qwen3-MoE and a tokenizer trained on the embedded pairs to `path`, like a Hub checkpoint,
    and returns `path`. The examples and notebooks use it when `HF_SARA_TINY=1`, so they run offline in seconds.
    """
    tokenizer = train_tokenizer(pair_texts(load_demo_pairs()))
    demo_model(tokenizer, seed).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def split_by_item(dataset: Dataset, held_out: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Splits pairs so that all translations of one anchor fall on the same side (no leak across languages)."""
    anchors = sorted(set(dataset["anchor_prompt"]))
    random.Random(seed).shuffle(anchors)
    test_anchors = set(anchors[: max(1, int(len(anchors) * held_out))])
    is_test = [anchor in test_anchors for anchor in dataset["anchor_prompt"]]
    train = dataset.select([i for i, flag in enumerate(is_test) if not flag])
    test = dataset.select([i for i, flag in enumerate(is_test) if flag])
    return train, test


def _training_arguments(output_dir: str, steps: int, learning_rate: float, seed: int, **extra: Any) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=16,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        logging_steps=max(1, steps // 5),
        save_strategy="no",
        report_to="none",
        seed=seed,
        bf16=False,
        gradient_checkpointing=False,
        max_length=64,
        dataloader_num_workers=0,
        **extra,
    )


def run_demo(
    output_dir: str,
    base_steps: int = 300,
    steps: int = 150,
    sara_weight: float = 1.5,
    sara_layers: str = DEFAULT_LAYERS,
    seed: int = 0,
    disable_tqdm: bool | None = None,
) -> dict[str, Any]:
    """
    The main job on the embedded default, offline.

    1. A tiny Qwen3-MoE learns all five languages (plain SFT on every prompt and completion, full fine-tuning): the
       base model. Like a real multilingual model, it routes the languages differently.
    2. From that base, two LoRA fine-tunings on the low-resource examples (attention and router weights), with the same
       seed and batches: plain SFT (TRL's `SFTTrainer`) and SARA (`SARATrainer`, offline anchors, published weight).
    3. The routing divergence between held-out low-resource examples and their English anchors is measured per
       language and layer for the base and both adapters; the table and figures go to `output_dir/analysis`.
    4. The SARA adapter, its model card and the tokenizer are saved to `output_dir/sara-adapter`, the base model to
       `output_dir/base-model`.

    Returns:
        `dict`: the reports per model (`"base"`, `"SFT"`, `"SARA"`), the table rows, the aligned layers and the paths.
    """
    pairs = load_demo_pairs()
    train_pairs, test_pairs = split_by_item(pairs, seed=seed)
    tokenizer = train_tokenizer(pair_texts(pairs))
    common = {"disable_tqdm": disable_tqdm}

    # 1. The base model: every language, plain SFT, full fine-tuning.
    english = sorted(set(zip(train_pairs["anchor_prompt"], train_pairs["anchor_completion"], strict=True)))
    texts = [p + c for p, c in zip(train_pairs["prompt"], train_pairs["completion"], strict=True)]
    texts += [p + c for p, c in english]
    base_model = demo_model(tokenizer, seed)
    base_trainer = SFTTrainer(
        model=base_model,
        args=SFTConfig(**_training_arguments(os.path.join(output_dir, "base"), base_steps, 3e-3, seed, **common)),
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
    )
    base_trainer.train()
    base_dir = os.path.join(output_dir, "base-model")
    base_model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)

    # 2. Two LoRA fine-tunings from the same base on the low-resource pairs.
    low_resource = train_pairs
    reports: dict[str, RoutingReport] = {}
    base_copy = patch_model(Qwen3MoeForCausalLM.from_pretrained(base_dir))
    reports["base"] = analyze_routing(base_copy, tokenizer, test_pairs)
    arms = {
        "SFT": (SFTTrainer, SFTConfig, {}),
        "SARA": (SARATrainer, SARAConfig, {"sara_weight": sara_weight, "sara_layers": sara_layers}),
    }
    trainers = {}
    for name, (trainer_class, config_class, extra) in arms.items():
        arguments = _training_arguments(os.path.join(output_dir, name.lower()), steps, 5e-3, seed, **common, **extra)
        trainer = trainer_class(
            model=patch_model(Qwen3MoeForCausalLM.from_pretrained(base_dir)),
            args=config_class(**arguments),
            train_dataset=low_resource,
            processing_class=tokenizer,
            peft_config=LoraConfig(**LORA_ROUTER),
        )
        trainer.train()
        trainers[name] = trainer
        reports[name] = analyze_routing(patch_model(trainer.model), tokenizer, test_pairs)

    # 3. Report.
    aligned = resolve_layers(sara_layers, len(reports["base"].divergence[next(iter(reports["base"].divergence))]))
    paths = write_report(reports, os.path.join(output_dir, "analysis"), aligned)
    rows = divergence_table(reports, aligned)

    # 4. Save the SARA adapter with its model card.
    adapter_dir = os.path.join(output_dir, "sara-adapter")
    trainers["SARA"].save_model(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    paths.update({"adapter": adapter_dir, "base_model": base_dir})
    return {"reports": reports, "rows": rows, "aligned": aligned, "paths": paths, "test_pairs": len(test_pairs)}


def format_demo_summary(result: dict[str, Any]) -> str:
    """The demo's table and where its outputs are."""
    lines = [
        f"Routing divergence JS(low-resource example || English anchor), mean over the aligned MoE layers "
        f"{result['aligned']}, on {result['test_pairs']} held-out pairs:",
        "",
        markdown_table(result["rows"]),
        "",
    ]
    lines += [f"{kind}: {path}" for kind, path in result["paths"].items()]
    return "\n".join(lines)
