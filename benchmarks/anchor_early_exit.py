"""The offline anchor pass ending after the published band's last MoE layer, against the pass over every layer and a
plain no-grad forward of the same batches, at Qwen3-30B-A3B's depth (48 MoE layers) on a CPU.

    python benchmarks/anchor_early_exit.py        # writes benchmarks/RESULTS_ANCHOR_EARLY_EXIT_CPU.md

The published band at 48 layers is 7..34, so the anchors' forward ends after MoE layer 34: layers 35..47 and the LM
head are not run. A 48-layer Qwen3-MoE with small layers (hidden 64, 8 experts, top-2, vocabulary 2048), fp32, one
thread; 64 rows of 96..128 random tokens, batch 8. The three variants take turns, order reversed every repeat, after a
warm-up; medians. `OfflineAnchors.compute` is what `SARATrainer` and `hf-sara anchors` run (each batch pooled and
written to the memory-mapped file); the plain forward runs the same collated batches with `logits_to_keep=1`.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYERS = 48


def measure(repeats: int, rows: int, batch_size: int) -> dict[str, list[float]]:
    from datasets import Dataset
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from hf_sara import OfflineAnchors, patch_model, resolve_layers
    from hf_sara.training.anchors import AnchorIdentity, AnchorTable
    from hf_sara.training.paired_data import ROW_COLUMN

    config = Qwen3MoeConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = patch_model(Qwen3MoeForCausalLM(config).eval())
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(96, 129, (rows,), generator=generator).tolist()
    ids = [torch.randint(3, 2048, (length,), generator=generator).tolist() for length in lengths]
    table = Dataset.from_dict({"input_ids": ids, ROW_COLUMN: list(range(rows))})
    tables = {"train": AnchorTable(table, 0, rows)}
    band = resolve_layers(None, LAYERS)

    def collate(examples):
        width = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.zeros(len(examples), width, dtype=torch.long)
        attention_mask = torch.zeros(len(examples), width, dtype=torch.long)
        for index, example in enumerate(examples):
            input_ids[index, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
            attention_mask[index, : len(example["input_ids"])] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    folder = tempfile.mkdtemp()

    def plain():
        with torch.no_grad():
            for start in range(0, rows, batch_size):
                batch = collate(table.select(range(start, min(start + batch_size, rows))))
                model(**batch, use_cache=False, logits_to_keep=1, output_router_logits=False)

    def anchor_pass(layers: int):
        identity = AnchorIdentity.of(model, {"train": tables["train"].identity("all")}, "all", computed_layers=layers)
        path = os.path.join(folder, f"anchors-{layers}-{time.monotonic_ns()}.safetensors")
        OfflineAnchors.compute(model, tables, path, identity, collate, batch_size)
        os.remove(path)

    variants = {
        "plain no-grad forward": plain,
        f"anchor pass, ends after MoE layer {band[-1]} (the band's last)": lambda: anchor_pass(band[-1] + 1),
        f"anchor pass over all {LAYERS} MoE layers": lambda: anchor_pass(LAYERS),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(1 + repeats):
        for name in list(variants) if repeat % 2 == 0 else list(reversed(variants)):
            start = time.perf_counter()
            variants[name]()
            if repeat > 0:
                times[name].append(time.perf_counter() - start)
        print(f"repeat {repeat}: " + ", ".join(f"{values[-1]:.2f}" for values in times.values() if values), flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "RESULTS_ANCHOR_EARLY_EXIT_CPU.md"))
    options = parser.parse_args()
    torch.set_num_threads(1)
    times = measure(options.repeats, options.rows, options.batch_size)
    plain = statistics.median(next(iter(times.values())))
    command = "python benchmarks/anchor_early_exit.py " + " ".join(sys.argv[1:])
    lines = [
        "# Offline anchor pass: ending after the band's last layer (CPU)",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (one thread used), torch {torch.__version__}, fp32. "
        f"Qwen3-MoE with {LAYERS} MoE layers (hidden 64, 8 experts), {options.rows} rows of 96-128 tokens, batch "
        f"{options.batch_size}; medians of {options.repeats} interleaved repeats after a warm-up.",
        "",
        "| what | median s | min-max s | vs plain no-grad forward |",
        "|---|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.3f} | {min(values):.3f}-{max(values):.3f} | {median / plain:.3f} |")
    with open(options.output, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
