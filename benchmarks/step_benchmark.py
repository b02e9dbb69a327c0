"""What SARA costs per training step, against plain SFT and against the `output_router_logits` aux-loss path.

    python benchmarks/step_benchmark.py                    # the full sweep, writes benchmarks/RESULTS_CPU.md
    python benchmarks/step_benchmark.py --quick            # one small configuration, prints only

For each configuration (sequence length, number of experts, gradient checkpointing on/off) and the same model, batch
and tokens, four variants are built from the same initial weights:

- `sft`: TRL's `SFTTrainer`, load-balancing loss off (`router_aux_loss_coef=0`);
- `sft_aux`: `SFTTrainer` with the model's `output_router_logits=True` aux-loss path (`router_aux_loss_coef=0.001`);
- `sara_offline`: `SARATrainer`, offline anchors (aux loss off, like `sft`);
- `sara_online`: `SARATrainer`, online anchors (an extra forward without gradient per step).

Step time: `trainer.training_step` (forward, loss, backward) plus the optimizer step, timed round-robin across the
four variants in one process (so machine noise hits them alike); median over the measured steps after warm-up.
Peak memory: each variant runs alone in a fresh subprocess; the peak resident set size during the measured steps minus
the resident size just before them (CPU), or `torch.cuda.max_memory_allocated` minus the allocation before them (GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

VARIANTS = ("sft", "sft_aux", "sara_offline", "sara_online")
SWEEP = [  # (sequence length, experts)
    (256, 8),
    (1024, 8),
    (4096, 8),
    (1024, 32),
    (1024, 128),
    (4096, 128),
]


def build(variant: str, seq_len: int, experts: int, checkpointing: bool, batch_size: int, hidden: int, layers: int):
    """A trainer and one collated batch for `variant`, from weights seeded identically for every variant."""
    from datasets import Dataset
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    from transformers.utils import logging
    from trl import SFTConfig, SFTTrainer

    from hf_sara import SARAConfig, SARATrainer, patch_model
    from hf_sara.testing import load_demo_pairs, pair_texts, train_tokenizer

    logging.set_verbosity_error()
    tokenizer = train_tokenizer(pair_texts(load_demo_pairs()))
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
        num_experts=experts, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=seq_len + 8,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tokenizer), (2 * batch_size, seq_len), generator=generator).tolist()
    rows = {"input_ids": ids[:batch_size], "anchor_input_ids": ids[batch_size:]}
    common = dict(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch_size, max_length=None, report_to="none",
        bf16=torch.cuda.is_available(), gradient_checkpointing=checkpointing, save_strategy="no", disable_tqdm=True,
        router_aux_loss_coef=0.001 if variant == "sft_aux" else 0.0, use_cpu=not torch.cuda.is_available(),
        learning_rate=1e-5,
    )  # fmt: skip
    if variant.startswith("sara"):
        trainer = SARATrainer(
            model=patch_model(model), args=SARAConfig(**common, sara_anchor_mode=variant.split("_")[1]),
            train_dataset=Dataset.from_dict(rows), processing_class=tokenizer,
        )  # fmt: skip
        if variant == "sara_offline":
            trainer.train_anchor_table()
    else:
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**common), train_dataset=Dataset.from_dict({"input_ids": rows["input_ids"]}),
            processing_class=tokenizer,
        )  # fmt: skip
    trainer.create_optimizer_and_scheduler(num_training_steps=1000)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this benchmark bypasses
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(batch_size)]))
    trainer.model.train()
    return trainer, batch


def step(trainer, batch) -> float:
    start = time.perf_counter()
    trainer.training_step(trainer.model, dict(batch))
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(args) -> None:
    """Runs one variant alone and prints its peak extra memory during the measured steps (bytes)."""
    trainer, batch = build(args.variant, args.seq_len, args.experts, args.checkpointing, args.batch_size, args.hidden,
                           args.layers)  # fmt: skip
    for _ in range(args.warmup):
        step(trainer, batch)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(args.steps):
        step(trainer, batch)
    if torch.cuda.is_available():
        extra = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if peak <= peak_before:  # the warm-up already reached this peak
            peak = peak_before
        extra = peak - before
    print(json.dumps({"extra_bytes": extra}))


def measure_memory(variant, seq_len, experts, checkpointing, args) -> int:
    command = [
        sys.executable, __file__, "--memory-worker", "--variant", variant, "--seq-len", str(seq_len),
        "--experts", str(experts), "--batch-size", str(args.batch_size), "--hidden", str(args.hidden),
        "--layers", str(args.layers), "--warmup", "1", "--steps", "2",
    ] + (["--checkpointing"] if checkpointing else [])  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])["extra_bytes"]


def measure_time(seq_len, experts, checkpointing, args) -> dict[str, list[float]]:
    built = {variant: build(variant, seq_len, experts, checkpointing, args.batch_size, args.hidden, args.layers)
             for variant in VARIANTS}  # fmt: skip
    times = {variant: [] for variant in VARIANTS}
    for index in range(args.warmup + args.steps):
        order = VARIANTS if index % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            elapsed = step(*built[variant])
            if index >= args.warmup:
                times[variant].append(elapsed)
    return times


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, bf16"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, fp32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small configuration, printed only")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "RESULTS_CPU.md"))
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--experts", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args)
        return

    sweep = [(256, 8)] if args.quick else SWEEP
    lines = [
        f"Machine: {machine()}. Model: Qwen3-MoE, hidden {args.hidden}, {args.layers} layers (all MoE), top-2, "
        f"batch {args.batch_size} x sequence length. Step time: median of {args.steps} steps after {args.warmup} "
        "warm-up steps, the four variants timed round-robin in one process. Extra memory: peak during 2 steps "
        "minus the level before them, each variant alone in a fresh process (CPU: resident set size, coarse: a few "
        "MiB of noise).",
        "",
        "| seq | experts | ckpt | sft ms | sft_aux / sft | sara_offline / sft | sara_online / sft | tokens/s (sft) "
        "| extra MiB: sft | sft_aux | sara_offline | sara_online |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seq_len, experts in sweep:
        for checkpointing in (False, True):
            times = measure_time(seq_len, experts, checkpointing, args)
            medians = {variant: statistics.median(values) for variant, values in times.items()}
            tokens = args.batch_size * seq_len
            memory = {}
            if not args.no_memory:
                memory = {v: measure_memory(v, seq_len, experts, checkpointing, args) / 2**20 for v in VARIANTS}
            row = [
                str(seq_len), str(experts), "on" if checkpointing else "off", f"{medians['sft'] * 1e3:.1f}",
                *(f"{medians[v] / medians['sft']:.3f}" for v in VARIANTS[1:]), f"{tokens / medians['sft']:.0f}",
                *(f"{memory[v]:.1f}" if memory else "-" for v in VARIANTS),
            ]  # fmt: skip
            lines.append("| " + " | ".join(row) + " |")
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    if args.quick:
        print(report)
        return
    command = "python benchmarks/step_benchmark.py " + " ".join(sys.argv[1:])
    with open(args.output, "w", encoding="utf-8") as handle:
        handle.write(f"<!-- generated by: {command.strip()} -->\n\n{report}")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
