"""The features that run on a GPU in practice, checked on one: SARA LoRA training in bf16 with the routing callback,
the callback's values against `analyze_routing`, the merge against the adapter model, and what one callback
measurement costs next to a training step.

    python benchmarks/cuda_check.py --output benchmarks/RESULTS_CUDA_CHECK.md

The demo's tiny Qwen3-MoE and pairs (`hf_sara/testing.py`), LoRA on attention and routers as in the demo. Needs CUDA.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import transformers  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from hf_sara import (  # noqa: E402
    RoutingDivergenceCallback,
    SARAConfig,
    SARATrainer,
    merge_adapter,
    patch_model,
    routing_distributions,  # noqa: E402
)
from hf_sara.testing import load_demo_pairs, pair_texts, save_tiny_model, train_tokenizer  # noqa: E402
from hf_sara.tools.analysis import analyze_routing  # noqa: E402
from hf_sara.tools.demo import LORA_ROUTER  # noqa: E402
from hf_sara.tools.pairs import split_by_item  # noqa: E402


def timed(function, repeats: int) -> float:
    """Median seconds of `function()` after one warm-up call, synchronising the GPU around each call."""
    function()
    values = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        values.append(time.perf_counter() - start)
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "RESULTS_CUDA_CHECK.md"))
    options = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/cuda_check.py needs a CUDA GPU.")

    pairs = load_demo_pairs()
    train_pairs, test_pairs = split_by_item(pairs)
    tokenizer = train_tokenizer(pair_texts(pairs))
    lines = []
    with tempfile.TemporaryDirectory() as work:
        base_dir = save_tiny_model(os.path.join(work, "base"))
        model = patch_model(AutoModelForCausalLM.from_pretrained(base_dir))
        args = SARAConfig(
            output_dir=os.path.join(work, "sara"), max_steps=options.steps, per_device_train_batch_size=16,
            learning_rate=5e-3, logging_steps=5, report_to="none", bf16=True, max_length=64, save_strategy="no",
            sara_layers="all", disable_tqdm=True,
        )  # fmt: skip
        trainer = SARATrainer(
            model=model, args=args, train_dataset=train_pairs, processing_class=tokenizer,
            peft_config=LoraConfig(**LORA_ROUTER),
        )  # fmt: skip
        callback = RoutingDivergenceCallback(trainer, test_pairs, steps=10, plot=False)
        trainer.add_callback(callback)
        start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - start
        logged = [entry for entry in trainer.state.log_history if any(key.startswith("routing/") for key in entry)]
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        js = [entry["sara/js"] for entry in trainer.state.log_history if "sara/js" in entry]

        # The callback's last values against the analysis of the trained model, in the same dtype and device.
        report = analyze_routing(patch_model(trainer.model), tokenizer, test_pairs)
        expected = {f"routing/js_{lang}": value for lang, value in report.mean_divergence(list(range(4))).items()}
        callback_difference = max(abs(logged[-1][key] - value) for key, value in expected.items())

        # Merge: a plain model whose logits and routing equal the adapter model's.
        adapter_dir = os.path.join(work, "adapter")
        trainer.save_model(adapter_dir)
        tokenizer.save_pretrained(adapter_dir)
        merged_dir = os.path.join(work, "merged")
        merge_adapter(base_dir, adapter_dir, merged_dir, dtype="float32")
        device = torch.device("cuda")
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).to(device)
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).to(device)
        batch = tokenizer(test_pairs["prompt"][:16], return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            logit_difference = (adapted(**batch).logits - merged(**batch).logits).abs().max().item()
            routing_difference = (
                (
                    routing_distributions(patch_model(adapted), batch["input_ids"], batch["attention_mask"])
                    - routing_distributions(patch_model(merged), batch["input_ids"], batch["attention_mask"])
                )
                .abs()
                .max()
                .item()
            )
            generated = merged.generate(**batch, max_new_tokens=8, do_sample=False)

        # Cost: one callback measurement over the held-out pairs vs one training step (forward + backward).
        train_batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.train()

        def training_step():
            with trainer.compute_loss_context_manager():
                trainer.compute_loss(trainer.model, dict(train_batch)).backward()
            trainer.model.zero_grad(set_to_none=True)

        measure_seconds = timed(callback.measure, options.repeats)
        step_seconds = timed(training_step, options.repeats)

    command = "python benchmarks/cuda_check.py" + (" " + " ".join(sys.argv[1:]) if len(sys.argv) > 1 else "")
    lines += [
        f"<!-- generated by: {command} -->",
        "",
        "# CUDA check: bf16 SARA LoRA training, routing callback, merge",
        "",
        f"Command: `{command}`",
        "",
        f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}. "
        f"Model: the demo's tiny Qwen3-MoE; {len(train_pairs)} training pairs, {len(test_pairs)} held-out pairs.",
        "",
        "| check | result |",
        "|---|---|",
        f"| SARA LoRA training, bf16, {options.steps} steps | {train_seconds:.1f} s; loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}; sara/js {js[0]:.4f} -> {js[-1]:.4f} |",
        f"| callback measurements logged | {len(logged)} (steps {[entry['step'] for entry in logged]}) |",
        f"| callback's last values vs `analyze_routing` on the trained model | max abs difference "
        f"{callback_difference:.2e} |",
        f"| merged model vs adapter model, fp32 logits | max abs difference {logit_difference:.2e} |",
        f"| merged model vs adapter model, routing | max abs difference {routing_difference:.2e} |",
        f"| `generate()` on the merged model | {tuple(generated.shape)} tokens |",
        f"| one callback measurement, {len(test_pairs)} pairs (median of {options.repeats}) | "
        f"{measure_seconds * 1e3:.1f} ms = {measure_seconds * 1e3 * 100 / len(test_pairs):.1f} ms per 100 pairs |",
        f"| one training step, batch 16, forward + backward (median of {options.repeats}) | "
        f"{step_seconds * 1e3:.1f} ms; measurement / step = {measure_seconds / step_seconds:.2f} |",
    ]
    text = "\n".join(lines) + "\n"
    with open(options.output, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
