"""Offline anchors at scale: their computation time on 1 vs 2 ranks, and the host memory a rank holds for them as the
number of rows grows.

    python benchmarks/anchor_benchmark.py        # writes benchmarks/RESULTS_ANCHORS_CPU.md

Time: `OfflineAnchors.compute` (what `SARATrainer` and `hf-sara anchors` run) on the same rows of a tiny Qwen3-MoE, in
one process and in two (`accelerate launch`, gloo), one thread per process, timed between barriers; the runs
alternate and each setting reports the median of `--repeats`. Rows computed per rank are counted.

Memory: anchor files of 1k, 10k and 100k rows of a 48-layer x 128-expert table (fp32, as Qwen3-30B-A3B's) are
written with the streaming writer; then, in a fresh process per file, a rank opens them and looks up the rows of 500
batches of 16 random rows, as training does. Reported: the growth of the process's private (anonymous) memory, which
is what a rank holds; the file pages it reads are shared with the other ranks of the node and reclaimable (page
cache). For contrast, the previous way, every rank loading the whole table (`safetensors.torch.load_file`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYERS, EXPERTS = 48, 128
MEMORY_ROWS = (1_000, 10_000, 100_000)
WRITE_ROWS = 64  # rows the writer receives at once (a gather round of 8 ranks x 8 rows)


def _status(field: str) -> int:
    """A field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


# ---------------------------------------------------------------------------------------------------------------------
# Time: one rank vs two
# ---------------------------------------------------------------------------------------------------------------------


def compute_child(rows: int, seq_len: int, batch_size: int, output: str) -> None:
    """Runs in each rank: computes the anchors of `rows` random rows, prints the time between barriers."""
    from accelerate import Accelerator
    from datasets import Dataset
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from hf_sara import patch_model
    from hf_sara.training.anchors import AnchorIdentity, AnchorTable, OfflineAnchors
    from hf_sara.training.paired_data import ROW_COLUMN

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, pad_token_id=0,
    )  # fmt: skip
    model = patch_model(Qwen3MoeForCausalLM(config).eval())
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (rows,), generator=generator).tolist()
    ids = [torch.randint(3, 1024, (length,), generator=generator).tolist() for length in lengths]
    table = Dataset.from_dict({"input_ids": ids, ROW_COLUMN: list(range(rows))})
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    tables = {"train": AnchorTable(table, 0, rows)}
    identity = AnchorIdentity.of(model, {"train": tables["train"].identity("all")}, "all")
    anchors, computed = OfflineAnchors.compute(
        model, tables, output, identity,
        batch_size=batch_size, device=accelerator.device, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, gather=accelerator.gather,
        write=accelerator.is_main_process, wait_for_everyone=accelerator.wait_for_everyone,
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    counts = accelerator.gather(torch.tensor([computed])).tolist()
    if accelerator.is_main_process:
        print(
            json.dumps({"seconds": elapsed, "rows_per_rank": counts, "checksum": float(anchors.table("train").sum())})
        )


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_compute(ranks: int, rows: int, seq_len: int, batch_size: int, output: str) -> dict:
    child = [__file__, "--child", "--rows", str(rows), "--seq-len", str(seq_len), "--batch-size", str(batch_size)]
    child += ["--output", output]
    if ranks == 1:
        command = [sys.executable, *child]
    else:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(ranks),
            "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", *child,
        ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-3000:])
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------------
# Memory: what a rank holds as the table grows
# ---------------------------------------------------------------------------------------------------------------------


def write_table(path: str, rows: int) -> float:
    """Writes a random anchors table with the streaming writer; returns the writer's private memory growth (bytes)."""
    from hf_sara.training.anchors.file import AnchorFileWriter

    shapes = {
        "train.distributions": ((rows, LAYERS, EXPERTS), torch.float32),
        "train.has_anchor": ((rows,), torch.bool),
    }
    # One block of rows, made before the baseline and written again and again: the measure is the writer's alone.
    values = torch.randn(WRITE_ROWS, LAYERS, EXPERTS, generator=torch.Generator().manual_seed(0)).softmax(-1)
    baseline, peak = _status("RssAnon"), 0
    with AnchorFileWriter(path, shapes, {"format": "hf_sara.training.anchors/1"}) as writer:
        for start in range(0, rows, WRITE_ROWS):
            end = min(start + WRITE_ROWS, rows)
            writer.write("train.distributions", torch.arange(start, end), values[: end - start])
            peak = max(peak, _status("RssAnon") - baseline)
        writer.write("train.has_anchor", slice(None), torch.ones(rows, dtype=torch.bool))
        writer.commit()
    return peak


def lookup_child(path: str, rows: int, mode: str) -> None:
    """Runs in a fresh process: opens a table as a rank does and looks up 500 batches; prints the memory growth."""
    from safetensors.torch import load_file

    from hf_sara.training.anchors import OfflineAnchors
    from hf_sara.training.anchors.file import MappedAnchorFile

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, rows, (16,), generator=generator) for _ in range(500)]
    baseline_anon, baseline_file = _status("RssAnon"), _status("RssFile")
    start = time.perf_counter()
    if mode == "mapped":
        anchors = OfflineAnchors(MappedAnchorFile(path), {"train": (0, rows)})
        opened = time.perf_counter()
        for batch in batches:
            anchors.lookup(batch, (16, LAYERS, EXPERTS))
    else:  # the previous trainer: every rank copied the whole table into its own dense tensors
        loaded = load_file(path)
        table = {name: tensor.clone() for name, tensor in loaded.items()}
        del loaded
        opened = time.perf_counter()
        for batch in batches:
            table["train.distributions"][batch], table["train.has_anchor"][batch]  # noqa: B018
    done = time.perf_counter()
    result = {
        "anon": _status("RssAnon") - baseline_anon,
        "file": _status("RssFile") - baseline_file,
        "open_s": opened - start,
        "lookup_ms": (done - opened) / len(batches) * 1e3,
    }
    print(json.dumps(result))


def run_lookup(path: str, rows: int, mode: str) -> dict:
    command = [sys.executable, __file__, "--lookup-child", path, "--rows", str(rows), "--mode", mode]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(completed.stderr[-3000:])
    return json.loads(completed.stdout.strip().splitlines()[-1])


def mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512, help="rows whose anchors are computed (time)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-rows", type=int, nargs="+", default=list(MEMORY_ROWS))
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "RESULTS_ANCHORS_CPU.md"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lookup-child", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="mapped", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        compute_child(options.rows, options.seq_len, options.batch_size, options.output)
        return
    if options.lookup_child:
        lookup_child(options.lookup_child, options.rows, options.mode)
        return

    command = " ".join(["python", "benchmarks/anchor_benchmark.py", *sys.argv[1:]])
    lines = [
        "# Offline anchors: computation on 1 vs 2 ranks, and a rank's memory as the table grows",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, one thread per "
        "process.",
        "",
    ]
    with tempfile.TemporaryDirectory() as directory:
        times: dict[int, list[float]] = {1: [], 2: []}
        details = {}
        checksums = set()
        for _ in range(options.repeats):
            for ranks in (1, 2):
                path = os.path.join(directory, f"anchors_{ranks}.safetensors")
                result = run_compute(ranks, options.rows, options.seq_len, options.batch_size, path)
                times[ranks].append(result["seconds"])
                details[ranks] = result["rows_per_rank"]
                checksums.add(round(result["checksum"], 3))
        one, two = statistics.median(times[1]), statistics.median(times[2])
        lines += [
            f"## Computation time, {options.rows} rows of up to {options.seq_len} tokens, batch {options.batch_size}",
            "",
            "Tiny Qwen3-MoE (hidden 256, 4 MoE layers, 8 experts), `OfflineAnchors.compute` timed between barriers, "
            f"median of {options.repeats} alternating runs.",
            "",
            "| ranks | rows per rank | seconds (median) | all runs | time vs 1 rank |",
            "|---|---|---|---|---|",
            f"| 1 | {details[1]} | {one:.2f} | {', '.join(f'{t:.2f}' for t in times[1])} | 1.00 |",
            f"| 2 | {details[2]} | {two:.2f} | {', '.join(f'{t:.2f}' for t in times[2])} | {two / one:.2f} |",
            "",
            f"Both computed the same table (sums of all entries: {sorted(checksums)}).",
            "",
        ]
        rows_table = [
            f"## A rank's memory for the anchors, {LAYERS} layers x {EXPERTS} experts (fp32)",
            "",
            "Private memory growth of a fresh process that opens the table and looks up 500 batches of 16 random "
            "rows; the file pages it touches are shared page cache (`RssFile`). Dense copy: every rank holding the "
            f"whole table, as the trainer did before. The writer receives {WRITE_ROWS} rows at a time.",
            "",
            "| rows | file MiB | writer private MiB | mapped: private MiB | mapped: file pages MiB | mapped: ms per "
            "lookup | dense copy: private MiB | dense copy: s to load |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for rows in options.memory_rows:
            path = os.path.join(directory, f"table_{rows}.safetensors")
            writer = write_table(path, rows)
            mapped = run_lookup(path, rows, "mapped")
            loaded = run_lookup(path, rows, "load_file")
            rows_table.append(
                f"| {rows:,} | {mib(os.path.getsize(path))} | {mib(writer)} | {mib(mapped['anon'])} | "
                f"{mib(mapped['file'])} | {mapped['lookup_ms']:.3f} | {mib(loaded['anon'])} | {loaded['open_s']:.2f} |"
            )
            os.remove(path)
        lines += rows_table + [""]
    text = "\n".join(lines)
    with open(options.output, "w") as handle:
        handle.write(text)
    print(text)


if __name__ == "__main__":
    main()
