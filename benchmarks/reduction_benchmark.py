"""Which reduction of the alignment term is the paper's formula: `sara_loss_reduction="step_mean"` against `"mean"`.

    python benchmarks/reduction_benchmark.py        # writes benchmarks/RESULTS_REDUCTION_CPU.md

The paper's loss averages the JS divergence over the examples that have an anchor. One optimizer step sees a batch of
examples; the trainer splits it into micro-batches (gradient accumulation), processes and, with packing, packs. The
reference is the formula over the step's whole batch: one micro-batch holding all of it. For each split, the alignment
term's share of one SGD step's router update (learning rate 1, no clipping, so the update is linear in the gradient:
the update with the term minus the update of the same run with `sara_weight=0`) is compared with the reference's, as
`||update - reference|| / ||reference||`. Data: the first 32 pairs of the embedded set (the demo's tokenizer and tiny
Qwen3-MoE, fp32, CPU), all anchored, or with a quarter of them (every fourth row) without anchor; padded batches, and
packed ones (`packing=True`, BFD, 128 tokens a pack).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS = 32
SPLITS = {"padded": [(32, 1), (8, 4), (4, 8), (2, 16)], "packed": [(8, 1), (4, 2), (2, 4), (1, 8)]}


def _dataset(anchorless_every: int | None):
    from datasets import Dataset

    from hf_sara.testing import load_demo_pairs

    records = load_demo_pairs().select(range(ROWS)).to_list()
    if anchorless_every:
        for index in range(0, ROWS, anchorless_every):
            records[index].update(anchor_prompt=None, anchor_completion=None)
    return Dataset.from_list(records)


def _router_update(output_dir: str, dataset, tokenizer, batch: int, accumulation: int, **overrides) -> torch.Tensor:
    from hf_sara import SARAConfig, SARATrainer
    from hf_sara.testing import tiny_qwen3_moe

    model = tiny_qwen3_moe(tokenizer)
    args = SARAConfig(
        output_dir=tempfile.mkdtemp(dir=output_dir),  # each run its own offline anchors
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        use_cpu=True,
        bf16=False,
        seed=0,
        data_seed=0,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        max_length=128,
        router_aux_loss_coef=0.0,
        sara_layers="all",
        shuffle_dataset=False,
        **overrides,
    )
    trainer = SARATrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    routers = [p for name, p in trainer.model.named_parameters() if name.endswith("mlp.gate.weight")]
    before = torch.cat([p.detach().flatten().clone() for p in routers])
    trainer.train()
    return torch.cat([p.detach().flatten() for p in routers]) - before


def measure() -> list[tuple[str, str, str, str, float]]:
    from transformers.utils import logging

    from hf_sara.testing import load_demo_pairs, pair_texts, train_tokenizer

    logging.set_verbosity_error()
    tokenizer = train_tokenizer(pair_texts(load_demo_pairs()))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for data, anchorless in (("all anchored", None), ("1 in 4 without anchor", 4)):
            dataset = _dataset(anchorless)
            for layout, splits in SPLITS.items():
                packing = dict(packing=True, packing_strategy="bfd") if layout == "packed" else {}
                # `sampler` order: with one step over all rows, every split sees the same rows in the same order.
                shares = {}
                for reduction in ("step_mean", "mean"):
                    for batch, accumulation in splits:
                        common = dict(sara_loss_reduction=reduction, **packing)
                        sara = _router_update(folder, dataset, tokenizer, batch, accumulation, **common)
                        sft = _router_update(
                            folder, dataset, tokenizer, batch, accumulation, sara_weight=0.0, **common
                        )
                        shares[reduction, batch, accumulation] = sara - sft
                reference = shares[("step_mean", *splits[0])]
                for reduction in ("step_mean", "mean"):
                    for batch, accumulation in splits[1:]:
                        share = shares[reduction, batch, accumulation]
                        deviation = ((share - reference).norm() / reference.norm()).item()
                        split = f"{accumulation} x {batch}"
                        rows.append((data, layout, split, reduction, deviation))
                        print(f"{data:>22} {layout:>6} {split:>7} {reduction:>9}: {deviation:.2e}", flush=True)
    return rows


def write_results(rows, path: str, command: str) -> None:
    lines = [
        "# Alignment-term reduction: the step's formula vs the micro-batch mean (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, fp32.",
        "",
        "Deviation of the alignment term's router update from the paper's formula over the step's whole batch "
        "(`||update - reference|| / ||reference||`; reference: one micro-batch holding the step's batch). Split: "
        "accumulation steps x micro-batch (rows, or packs when packed).",
        "",
        "| data | batches | split | step_mean | mean |",
        "|---|---|---|---|---|",
    ]
    table = {}
    for data, layout, split, reduction, deviation in rows:
        table.setdefault((data, layout, split), {})[reduction] = deviation
    for (data, layout, split), values in table.items():
        lines.append(f"| {data} | {layout} | {split} | {values['step_mean']:.1e} | {values['mean']:.1e} |")
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "RESULTS_REDUCTION_CPU.md"))
    options = parser.parse_args()
    torch.set_num_threads(1)
    rows = measure()
    write_results(rows, options.output, "python benchmarks/reduction_benchmark.py")
    print(f"written: {options.output}")


if __name__ == "__main__":
    main()
