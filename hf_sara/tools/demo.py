"""The embedded default: a small parallel instruction set, a tokenizer trained on it, a tiny Qwen3-MoE, and the demo
that fine-tunes it with plain SFT and with SARA from the same start."""

from __future__ import annotations

import os
from typing import Any

from datasets import Dataset
from peft import LoraConfig
from transformers import Qwen3MoeForCausalLM
from transformers.utils import logging
from trl import SFTConfig, SFTTrainer

from ..routing.layers import DEFAULT_LAYERS, resolve_layers
from ..routing.patching import patch_model
from ..testing import load_demo_pairs, pair_texts, tiny_qwen3_moe, train_tokenizer
from ..training.config import SARAConfig
from ..training.paired_data import TEXT_FIELD, detect_paired_format, plain_texts
from ..training.trainer import SARATrainer
from .analysis import RoutingReport, analyze_routing, divergence_table, write_report
from .pairs import split_by_item
from .reporting import markdown_table

logger = logging.get_logger(__name__)

LORA_ROUTER = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.gate.weight"])


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
    paired_format = detect_paired_format(train_pairs.column_names)
    texts = plain_texts(train_pairs, paired_format)
    # Each English item once (it anchors several languages), in a fixed order.
    english = sorted(set(zip(*(train_pairs[name] for name in paired_format.anchor_columns), strict=True)))
    texts += ["".join(anchor) for anchor in english]
    base_model = tiny_qwen3_moe(tokenizer, seed)
    base_trainer = SFTTrainer(
        model=base_model,
        args=SFTConfig(**_training_arguments(os.path.join(output_dir, "base"), base_steps, 3e-3, seed, **common)),
        train_dataset=Dataset.from_dict({TEXT_FIELD: texts}),
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
