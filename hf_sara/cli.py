"""The `hf-sara` command line: train, anchors, analyze, pairs, demo, eval."""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

from .files import OutputDirectoryLockedError

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

Run `hf-sara <command> --help` for the options of a command.
"""


class CommandError(Exception):
    """An error the user can fix; reported as one line."""


def _load_dataset(name: str, config: str | None = None):
    from datasets import DatasetDict, load_dataset

    if os.path.isfile(name):
        extension = name.rsplit(".", 1)[-1].lower()
        builder = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv", "tsv": "csv"}.get(extension)
        if builder is None:
            raise CommandError(f"cannot read {name}: expected a .json, .jsonl, .parquet, .csv or .tsv file")
        if os.path.getsize(name) == 0:
            raise CommandError(f"{name} is empty: there is no row to read")
        extra = {"delimiter": "\t"} if extension == "tsv" else {}
        try:
            dataset = load_dataset(builder, data_files=name, split="train", **extra)
        except Exception as error:  # the builders raise many kinds (DatasetGenerationError, ArrowInvalid, ...)
            cause = error.__cause__ or error
            reason = " ".join(str(cause).split())[:300] or type(cause).__name__
            raise CommandError(
                f"cannot read {name} as a {builder.upper()} dataset ({reason}); each row must be one object with the "
                "same columns (JSONL: one JSON object per line)"
            ) from None
        return DatasetDict({"train": dataset})
    if os.path.exists(name) and not os.path.isdir(name):
        raise CommandError(f"cannot read {name}")
    return load_dataset(name, name=config)


def _split(dataset, split: str, name: str):
    if split not in dataset:
        raise CommandError(f"{name} has no split {split!r} (it has {', '.join(dataset)}); pass one with --split")
    return dataset[split]


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return number


def _batch_size(value: str) -> int | str:
    return value if value == "auto" else _positive_int(value)


def _device(value: str) -> str:
    import torch

    try:
        torch.device(value)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    return value


_DATA_FILE_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".txt")


def _check_local_reference(name: str, what: str) -> None:
    """A name written as a local path must exist (otherwise the Hub client reports an invalid repo id)."""
    looks_local = os.path.isabs(name) or name.startswith((".", "~")) or name.lower().endswith(_DATA_FILE_EXTENSIONS)
    if looks_local and not os.path.exists(os.path.expanduser(name)):
        raise CommandError(f"{what} {name} not found: no such file or directory")


def _load_tokenizer(model: str, adapter: str | None = None, **kwargs):
    """The adapter's tokenizer when it was saved with one (SARATrainer saves it), else the base model's."""
    from transformers import AutoTokenizer

    if adapter is not None:
        local_without_tokenizer = os.path.isdir(adapter) and not os.path.isfile(
            os.path.join(adapter, "tokenizer_config.json")
        )
        if not local_without_tokenizer:
            try:
                return AutoTokenizer.from_pretrained(adapter, **kwargs)
            except (OSError, ValueError):
                pass
    return AutoTokenizer.from_pretrained(model, **kwargs)


def _trl_parser(prog: str):
    from trl import ModelConfig, ScriptArguments, TrlParser

    from .config import SARAConfig

    return TrlParser((ScriptArguments, SARAConfig, ModelConfig), prog=prog)


def _build_trainer(argv: list[str], prog: str):
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from .patching import patch_model
    from .trainer import SARATrainer

    try:
        script_args, training_args, model_args = _trl_parser(prog).parse_args_and_config(args=argv)
    except yaml.YAMLError as error:
        raise CommandError(f"the --config file is not valid YAML: {' '.join(str(error).split())}") from None
    if not model_args.model_name_or_path:
        raise CommandError("--model_name_or_path is required")
    if not script_args.dataset_name:
        raise CommandError("--dataset_name is required (a Hub dataset, or a local .jsonl/.json/.parquet file)")
    _check_local_reference(model_args.model_name_or_path, "model")
    _check_local_reference(script_args.dataset_name, "dataset")
    dataset = _load_dataset(script_args.dataset_name, script_args.dataset_config)
    if script_args.dataset_train_split not in dataset:
        raise CommandError(f"the dataset has no split {script_args.dataset_train_split!r} (it has {list(dataset)})")
    dtype = model_args.dtype
    model_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=getattr(torch, dtype) if dtype not in (None, "auto") else dtype,
        quantization_config=get_quantization_config(model_args),
        **(training_args.model_init_kwargs or {}),
    )
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    eval_dataset = None
    if training_args.eval_strategy != "no" and script_args.dataset_test_split in dataset:
        eval_dataset = dataset[script_args.dataset_test_split]
    trainer = SARATrainer(
        model=patch_model(model),
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    return trainer, script_args, training_args


def train_command(argv: list[str]) -> int:
    trainer, script_args, training_args = _build_trainer(argv, "hf-sara train")
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Pushed to the Hub: {trainer.hub_model_id}")
    trainer.accelerator.end_training()  # under `accelerate launch`: a clean exit of every rank
    return 0


def anchors_command(argv: list[str]) -> int:
    import torch

    # Under `accelerate launch` every rank computes its share of the rows; one rank writes the file.
    trainer, _, _ = _build_trainer(argv, "hf-sara anchors")
    anchors = trainer.prepare_offline_anchors()
    name = next(iter(anchors.ranges))
    rows, layers, _ = anchors.file.shape(f"{name}.distributions")
    computed = trainer.accelerator.gather(torch.tensor([trainer.anchor_rows_computed], device=trainer.args.device))
    trainer.accelerator.print(
        f"Saved anchors of {rows} rows x {layers} MoE layers to {anchors.path} (rows computed per rank: "
        f"{', '.join(str(count) for count in computed.tolist())})"
    )
    trainer.accelerator.end_training()
    return 0


def _staged_output(output_dir: str, write: Callable[[str], dict[str, str]]) -> dict[str, str]:
    """Writes into a temporary folder and moves the files into `output_dir` only once everything succeeded."""
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".hf-sara-")
    try:
        paths = write(staging)
        os.makedirs(output_dir, exist_ok=True)
        moved = {}
        for kind, path in paths.items():
            target = os.path.join(output_dir, os.path.relpath(path, staging))
            os.replace(path, target)
            moved[kind] = target
        return moved
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def analyze_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-sara analyze",
        description="Routing divergence between each language's examples and their anchors, per MoE layer, for a "
        "model or a base/adapter pair: a markdown and CSV table and PNG figures.",
    )
    parser.add_argument("--model", required=True, help="model name or path (the base model when --adapter is given)")
    parser.add_argument("--adapter", help="a PEFT adapter (name or path) to compare with the base model")
    parser.add_argument(
        "--data", help="paired dataset: .jsonl/.json/.parquet file or Hub name (default: the embedded demo pairs)"
    )
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--output-dir", required=True, help="where the table and figures are written")
    parser.add_argument(
        "--layers", default=None, help="aligned layers for the summary table (default: published band)"
    )
    parser.add_argument("--batch-size", type=_positive_int, default=16)
    parser.add_argument("--max-length", type=_positive_int, default=512)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from .analysis import analyze_routing, markdown_table, write_report
    from .analysis import divergence_table as table
    from .demo import load_demo_pairs
    from .layers import resolve_layers
    from .patching import get_routing_state, patch_model

    _check_local_reference(args.model, "model")
    if args.adapter:
        _check_local_reference(args.adapter, "adapter")
    if args.data is not None:
        _check_local_reference(args.data, "dataset")
    dataset = load_demo_pairs() if args.data is None else _split(_load_dataset(args.data), args.split, args.data)
    tokenizer = _load_tokenizer(args.model, args.adapter)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = patch_model(AutoModelForCausalLM.from_pretrained(args.model).to(device))
    aligned = resolve_layers(args.layers, len(get_routing_state(model).captured_layers))  # before the analysis
    reports = {
        "base" if args.adapter else "model": analyze_routing(
            model, tokenizer, dataset, args.batch_size, args.max_length
        )
    }
    if args.adapter:
        from peft import PeftModel

        adapted = patch_model(PeftModel.from_pretrained(model, args.adapter))
        reports["adapter"] = analyze_routing(adapted, tokenizer, dataset, args.batch_size, args.max_length)
    paths = _staged_output(args.output_dir, lambda staging: write_report(reports, staging, aligned))
    print(f"Mean routing divergence to the anchors over MoE layers {aligned}:\n")
    print(markdown_table(table(reports, aligned)))
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def pairs_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-sara pairs",
        description="Build a paired dataset (JSONL) for SARA from a parallel corpus or a translated instruction set.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--aligned", nargs=2, metavar=("SOURCE", "ANCHOR"), help="two line-aligned text files")
    source.add_argument(
        "--multilingual",
        metavar="FILE",
        help="a TSV/CSV/JSONL file with one column per language (texts, or prompt/completion objects)",
    )
    parser.add_argument("--language", help="language code of SOURCE (with --aligned)")
    parser.add_argument("--anchor-language", default="en", help="the anchor language (default: en)")
    parser.add_argument("--languages", help="comma-separated languages to keep (with --multilingual; default: all)")
    parser.add_argument("--output", required=True, help="the JSONL file to write")
    args = parser.parse_args(argv)

    from .pairs import pairs_from_aligned_files, pairs_from_multilingual, write_jsonl

    inputs = args.aligned or [args.multilingual]
    if any(
        os.path.exists(path) and os.path.samefile(path, args.output) for path in inputs if os.path.exists(args.output)
    ):
        raise CommandError(f"--output {args.output} is one of the input files: write the pairs to another file")
    if args.aligned:
        if not args.language:
            raise CommandError("--language is required with --aligned (the language code of SOURCE)")
        rows = pairs_from_aligned_files(*args.aligned, args.language, args.anchor_language)
    else:
        languages = args.languages.split(",") if args.languages else None
        rows = pairs_from_multilingual(args.multilingual, args.anchor_language, languages)
    write_jsonl(rows, args.output)
    anchored = sum(1 for row in rows if row.get("anchor_text") or row.get("anchor_prompt"))
    print(f"Wrote {len(rows)} pairs ({anchored} with an anchor) to {args.output}")
    return 0


def demo_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-sara demo",
        description="The main job on the embedded default, offline: a tiny Qwen3-MoE learns five languages, then LoRA "
        "fine-tuning on the low-resource pairs with plain SFT and with SARA from the same start; prints the routing "
        "divergence per language, writes figures, saves the SARA adapter and its model card.",
    )
    parser.add_argument("--output-dir", default="outputs/demo", help="where everything is written")
    parser.add_argument("--base-steps", type=int, default=300, help="steps of the multilingual base training")
    parser.add_argument("--steps", type=int, default=150, help="steps of each LoRA fine-tuning")
    parser.add_argument("--sara-weight", type=float, default=1.5)
    parser.add_argument("--sara-layers", default=None, help="aligned layers (default: the published band)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from .demo import format_demo_summary, run_demo
    from .layers import DEFAULT_LAYERS, resolve_layers

    # Checked before the base training, which takes most of the run.
    if args.steps < 1 or args.base_steps < 1:
        raise CommandError("--steps and --base-steps must be at least 1")
    if not (math.isfinite(args.sara_weight) and args.sara_weight >= 0):
        raise CommandError(f"--sara-weight must be a finite number >= 0, got {args.sara_weight}")
    resolve_layers(args.sara_layers or DEFAULT_LAYERS, 4)  # the demo's model has 4 MoE layers

    result = run_demo(
        args.output_dir,
        base_steps=args.base_steps,
        steps=args.steps,
        sara_weight=args.sara_weight,
        sara_layers=args.sara_layers or DEFAULT_LAYERS,
        seed=args.seed,
    )
    print()
    print(format_demo_summary(result))
    return 0


def eval_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-sara eval",
        description="Accuracy per language through lm-evaluation-harness, for a model or a base model and a PEFT "
        "adapter side by side: harness tasks (e.g. global_mmlu_full_sw, belebele_swh_Latn, mgsm_direct_sw) and local "
        "files in the Global-MMLU (question, option_a..option_d, answer[, subject]) or M3KE (question, A, B, C, D, "
        "answer) schema. Without --tasks and --files it evaluates the small sample files shipped with hf_sara.",
    )
    parser.add_argument("--model", required=True, help="model name or path (the base model when --adapter is given)")
    parser.add_argument("--adapter", help="a PEFT adapter (name or path) to evaluate next to the base model")
    parser.add_argument(
        "--tasks", nargs="+", default=[], metavar="[LANG=]TASK", help="harness tasks or groups, one per language"
    )
    parser.add_argument(
        "--files", nargs="+", default=[], metavar="[LANG=]FILE", help="local .jsonl/.json/.csv files, one per language"
    )
    parser.add_argument("--output-dir", required=True, help="where the tables, chart, task files and cache go")
    parser.add_argument(
        "--num-fewshot", type=_non_negative_int, default=None, help="few-shot examples (default: the task's own)"
    )
    parser.add_argument("--batch-size", type=_batch_size, default=8, help="harness batch size, or 'auto' (default: 8)")
    parser.add_argument(
        "--limit", type=_positive_float, default=None, help="only the first N items (or a fraction < 1) per task"
    )
    parser.add_argument("--max-length", type=_positive_int, default=None, help="longest input (default: the model's)")
    parser.add_argument("--device", type=_device, default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="model dtype"
    )
    parser.add_argument("--apply-chat-template", action="store_true", help="format prompts with the chat template")
    parser.add_argument("--no-cache", action="store_true", help="do not keep the harness's response cache")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)

    from .eval_files import sample_eval_files
    from .evaluation import check_task_names, parse_sources, require_lm_eval, task_manager_for

    require_lm_eval()
    _check_local_reference(args.model, "model")
    if args.adapter:
        _check_local_reference(args.adapter, "adapter")
    files = args.files or ([] if args.tasks else [f"{lang}={path}" for lang, path in sample_eval_files().items()])
    sources = parse_sources(args.tasks, files)
    tasks_dir = os.path.join(args.output_dir, "harness_tasks")
    task_manager = task_manager_for()
    check_task_names(sources, task_manager)  # before loading the model, which can take minutes
    created = [path for path in (args.output_dir, tasks_dir) if not os.path.exists(path)]
    try:
        return _evaluate_and_report(args, sources, tasks_dir, task_manager)
    except BaseException:
        for path in created:  # leave no partial output behind
            shutil.rmtree(path, ignore_errors=True)
        raise


def _evaluate_and_report(args, sources, tasks_dir: str, task_manager) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from .analysis import markdown_table
    from .evaluation import (
        accuracy_table,
        evaluate_model,
        model_fingerprint,
        task_manager_for,
        write_eval_report,
        write_local_tasks,
    )

    if write_local_tasks(sources, tasks_dir):  # validated row by row before anything is written
        task_manager = task_manager_for(tasks_dir)
    batch_size = args.batch_size
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    # The harness's cache is keyed by request only: what changes the answers to the same requests goes in its name.
    settings = f"dtype={args.dtype};max_length={args.max_length};chat_template={args.apply_chat_template}"
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code).to(
        device
    )
    model.eval()
    tokenizer = _load_tokenizer(args.model, args.adapter, trust_remote_code=args.trust_remote_code)

    def evaluate(label: str, evaluated, *references: str | None):
        cache = (
            None
            if args.no_cache
            else os.path.join(args.output_dir, "lm_eval_cache", model_fingerprint(*references, settings))
        )
        print(f"Evaluating the {label} on {', '.join(source.language for source in sources)}")
        return evaluate_model(
            evaluated,
            tokenizer,
            sources,
            tasks_dir=tasks_dir,
            task_manager=task_manager,
            num_fewshot=args.num_fewshot,
            batch_size=batch_size,
            limit=limit,
            cache_path=cache,
            apply_chat_template=args.apply_chat_template,
            max_length=args.max_length,
        )

    scores, summaries = {}, {}
    label = "base" if args.adapter else "model"
    scores[label], summaries[label] = evaluate(label, model, args.model)
    if args.adapter:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(model, args.adapter).eval()
        scores["adapter"], summaries["adapter"] = evaluate("adapter", adapted, args.model, args.adapter)
    paths = _staged_output(args.output_dir, lambda staging: write_eval_report(scores, staging, summaries))
    print()
    print(markdown_table(accuracy_table(scores)))
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "train": train_command,
    "anchors": anchors_command,
    "analyze": analyze_command,
    "pairs": pairs_command,
    "demo": demo_command,
    "eval": eval_command,
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


if __name__ == "__main__":
    raise SystemExit(main())
