"""The `hf-sara` command line: train, anchors, analyze, pairs, demo, eval, merge, replicate. One module per
subcommand (arguments and printing only); the work is done by `hf_sara.training` and `hf_sara.tools`."""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..files import OutputDirectoryLockedError
from .analyze import analyze_command
from .common import CommandError
from .demo import demo_command
from .eval import eval_command
from .merge import merge_command
from .pairs import pairs_command
from .replicate import replicate_command
from .train import anchors_command, train_command

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


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train_command,
    "anchors": anchors_command,
    "analyze": analyze_command,
    "pairs": pairs_command,
    "demo": demo_command,
    "eval": eval_command,
    "replicate": replicate_command,
    "merge": merge_command,
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
    try:
        return COMMANDS[command](rest)
    except (CommandError, ValueError, OSError, ImportError, KeyError, OutputDirectoryLockedError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"hf-sara {command}: error: {message}", file=sys.stderr)
        return 2
