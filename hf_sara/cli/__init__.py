"""The `hf-sara` command line: train, anchors, analyze, pairs, demo, eval, merge, replicate. One module per
subcommand (arguments and printing only); the work is done by `hf_sara.training` and `hf_sara.tools`."""

from __future__ import annotations

import importlib
import sys

from ..files.lock import OutputDirectoryLockedError
from .common import CommandError

USAGE = """hf-sara <command> [options]

commands:
  train     SARA fine-tuning of a model on a paired dataset (all SARAConfig, SFTConfig and PEFT options as flags,
            or a YAML file with --config); runs unchanged under `accelerate launch`
  anchors   compute and save the offline anchor distributions of a paired dataset
  analyze   routing divergence between each language and its anchors, per layer: tables and figures
  pairs     build a paired dataset from aligned text files or a multilingual TSV/CSV/JSONL file
  demo      the main job on the embedded default, offline: SFT vs SARA on a tiny MoE, with the analysis
  eval      accuracy per language through lm-evaluation-harness (harness tasks or local Global-MMLU/M3KE files),
            for a model or a base/adapter pair: a markdown and CSV table and a bar chart
  merge     merge a LoRA adapter (routers, fused experts, modules_to_save included) into its base model and save a
            plain model folder for serving (loads with AutoModelForCausalLM, without PEFT)
  replicate the published comparison (full fine-tuning, SARA, SARA on all layers), evaluated per language beside
            the paper's numbers, with the routing analysis; resumable (`--tiny`: an offline smoke run)

Run `hf-sara <command> --help` for the options of a command.
"""


# Each command's module and function, imported only when it runs: a launched process loads what its command needs.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("train", "train_command"),
    "anchors": ("train", "anchors_command"),
    "analyze": ("analyze", "analyze_command"),
    "pairs": ("pairs", "pairs_command"),
    "demo": ("demo", "demo_command"),
    "eval": ("eval", "eval_command"),
    "replicate": ("replicate", "replicate_command"),
    "merge": ("merge", "merge_command"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hf-sara: error: unknown command {command!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module, function = COMMANDS[command]
    try:
        return getattr(importlib.import_module(f".{module}", __name__), function)(rest)
    except (CommandError, ValueError, OSError, ImportError, KeyError, OutputDirectoryLockedError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"hf-sara {command}: error: {message}", file=sys.stderr)
        return 2
