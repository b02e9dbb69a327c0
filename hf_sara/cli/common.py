"""What every `hf-sara` subcommand shares: its error type, argument types, and how names on the command line become
datasets, models and tokenizers."""

from __future__ import annotations

import argparse
import os


class CommandError(Exception):
    """An error the user can fix; reported as one line."""


def command_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of `hf-sara <command>`, described by its module's docstring (without its name)."""
    description = " ".join(description.removeprefix(f"`hf-sara {command}`: ").split())
    return argparse.ArgumentParser(prog=f"hf-sara {command}", description=description)


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def batch_size(value: str) -> int | str:
    return value if value == "auto" else positive_int(value)


def device(value: str) -> str:
    """A torch device this machine has: `cpu`, `cuda[:N]` with CUDA and that many GPUs, `mps` on Apple silicon."""
    import torch

    try:
        parsed = torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if parsed.type == "meta":
        raise argparse.ArgumentTypeError("'meta' holds no weights and computes nothing: choose cpu or cuda")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{value!r}: this machine has no CUDA GPU (or torch was built without CUDA); use cpu"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise argparse.ArgumentTypeError(
                f"{value!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has no Apple MPS device; use cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{value!r}: hf-sara runs on cpu, cuda or mps")
    return value


def option_value(option: str, value, parse, expected: str):
    """
    `value` of `option` checked by one of the argument types above (for options an argparse parser did not check, such
    as those of a dataclass parser), or a one-line [`CommandError`] naming the option.
    """
    if value is None:
        return None
    try:
        return parse(str(value))
    except argparse.ArgumentTypeError as error:
        raise CommandError(f"argument {option}: {error}") from None
    except ValueError:
        raise CommandError(f"argument {option}: {expected}, not {value!r}") from None


_DATA_FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt")


def check_local_reference(name: str | None, what: str) -> None:
    """A name written as a local path must exist (otherwise the Hub client reports an invalid repo id)."""
    if name is None:
        return
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.lower().endswith(_DATA_FILE_EXTENSIONS)
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise CommandError(f"{what} {name} not found: no such file or directory")


def load_split(name: str, split: str):
    """One split of [`load_dataset_dict`]`(name)`, refused with the splits it has when it is not there."""
    from ..tools.loading import load_dataset_dict

    check_local_reference(name, "dataset")
    dataset = load_dataset_dict(name)
    if split not in dataset:
        raise CommandError(f"{name} has no split {split!r} (it has {', '.join(dataset)}); pass one with --split")
    return dataset[split]


def add_model_arguments(parser: argparse.ArgumentParser, adapter_use: str) -> None:
    """`--model` and `--adapter`, as the commands that compare a base model with its adapter take them."""
    parser.add_argument("--model", required=True, help="model name or path (the base model when --adapter is given)")
    parser.add_argument("--adapter", help=f"a PEFT adapter (name or path) to {adapter_use}")
    parser.add_argument(
        "--allow-base-name-mismatch",
        action="store_true",
        help="accept a --model named otherwise than in the adapter's config (a copy of it); shapes are still checked",
    )


def check_model_references(args: argparse.Namespace) -> None:
    """Refuses a `--model` or `--adapter` written as a local path that does not exist, before anything is loaded."""
    check_local_reference(args.model, "model")
    check_local_reference(args.adapter, "adapter")


def check_adapter(args: argparse.Namespace) -> None:
    """Refuses an `--adapter` not made for `--model` (the check `hf-sara merge` makes), before any weight loads."""
    if args.adapter is not None:
        from ..tools.merge import check_adapter_fits_base

        check_adapter_fits_base(args.model, args.adapter, args.allow_base_name_mismatch, lora_only=False)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def print_paths(paths: dict[str, str]) -> None:
    for kind, path in paths.items():
        print(f"{kind}: {path}")
