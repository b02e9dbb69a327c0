"""`hf-sara replicate`: the published comparison (full fine-tuning, SARA, SARA on all layers), evaluated per language
beside the paper's numbers; resumable, and under `accelerate launch` one arm per launch."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

from ..tools.replication import ARMS
from .common import CommandError, batch_size, check_local_reference


@dataclass
class ReplicationArguments:
    """The replication's own options, next to TRL's script, training (`SARAConfig`) and model arguments."""

    arms: list[str] = field(
        default_factory=lambda: list(ARMS),
        metadata={"help": f"Arms to train (finished ones are skipped): {', '.join(ARMS)}."},
    )
    stage: str = field(
        default="all",
        metadata={
            "help": "'train': train the arms only (under `accelerate launch`: one arm per launch); 'evaluate': "
            "evaluate the base and every trained arm, write the table and analyse routing (one process); 'all': "
            "both, on one process.",
            "choices": ["train", "evaluate", "all"],
        },
    )
    benchmarks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "BENCHMARK:LANG=TASK or BENCHMARK:LANG=FILE sources (default: the published Global-MMLU, "
            "BELEBELE and MGSM harness tasks; MGSM has no hi or ne)."
        },
    )
    harness_limit: float | None = field(default=None, metadata={"help": "only the first N items per task"})
    harness_batch_size: str = field(default="8", metadata={"help": "lm-evaluation-harness batch size, or 'auto'"})
    harness_num_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples (default: task's)"})
    harness_device_map: str | None = field(
        default=None, metadata={"help": "device_map for evaluation and analysis, e.g. 'auto' beyond one GPU"}
    )
    tiny: bool = field(
        default=False,
        metadata={
            "help": "offline smoke run: a tiny untrained Qwen3-MoE, the embedded pairs and the shipped sample eval "
            "files (unless --benchmarks is given), 4 training steps (on CPUs under `accelerate launch`, add --use_cpu "
            "true, as for any CPU training)"
        },
    )


def replication_parser():
    from trl import ModelConfig, ScriptArguments, TrlParser

    from ..training.config import SARAConfig

    return TrlParser((ScriptArguments, SARAConfig, ModelConfig, ReplicationArguments), prog="hf-sara replicate")


def replicate_command(argv: list[str]) -> int:
    import yaml
    from accelerate import PartialState

    from ..tools.evaluation.run import EvalSettings
    from ..tools.evaluation.tasks import check_task_names, require_lm_eval, task_manager_for
    from ..tools.loading import load_dataset_dict, load_tokenizer, model_init_kwargs
    from ..tools.replication import Replication, parse_benchmarks, published_benchmarks, tiny_setup
    from ..tools.reporting import markdown_table
    from .common import non_negative_int, option_value, positive_float, print_paths

    try:
        script_args, training_args, model_args, options = replication_parser().parse_args_and_config(args=argv)
    except yaml.YAMLError as error:
        raise CommandError(f"the --config file is not valid YAML: {' '.join(str(error).split())}") from None
    unknown = [arm for arm in options.arms if arm not in ARMS]
    if unknown:
        raise CommandError(f"unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    if model_args.use_peft:
        raise CommandError("the published comparison is full fine-tuning: drop --use_peft")
    # The evaluation options, checked as `hf-sara eval` checks its own, before anything is written.
    settings = EvalSettings(
        num_fewshot=option_value("--harness_num_fewshot", options.harness_num_fewshot, non_negative_int, "0 or more"),
        batch_size=option_value(
            "--harness_batch_size", options.harness_batch_size, batch_size, "a positive integer or 'auto'"
        ),
        limit=option_value("--harness_limit", options.harness_limit, positive_float, "a positive number"),
        device_map=options.harness_device_map,
        trust_remote_code=training_args.trust_remote_code,
        device="cpu" if training_args.use_cpu else None,
    )
    benchmark_specs = parse_benchmarks(options.benchmarks) if options.benchmarks else None
    state = PartialState()
    if state.num_processes > 1 and (options.stage != "train" or len(options.arms) != 1):
        raise CommandError(
            "under `accelerate launch`, train one arm per launch (`--stage train --arms ARM`), then evaluate in one "
            "process (`hf-sara replicate ... --stage evaluate`, with `--harness_device_map auto` for a large model)"
        )
    evaluating = options.stage != "train"
    if evaluating:
        require_lm_eval()
    if not options.tiny:
        if not model_args.model_name_or_path or not script_args.dataset_name:
            raise CommandError("--model_name_or_path and --dataset_name are required (or --tiny for a smoke run)")
        check_local_reference(model_args.model_name_or_path, "model")
        check_local_reference(script_args.dataset_name, "dataset")
    created = not os.path.exists(training_args.output_dir)
    try:
        os.makedirs(training_args.output_dir, exist_ok=True)
        if options.tiny:
            with state.main_process_first():  # one process writes the tiny model, the others read it
                model_name, train, analysis, training_args, specs = tiny_setup(training_args.output_dir, training_args)
            benchmarks = benchmark_specs or parse_benchmarks(specs)
        else:
            model_name = model_args.model_name_or_path
            dataset = load_dataset_dict(script_args.dataset_name, script_args.dataset_config)
            if script_args.dataset_train_split not in dataset:
                split = script_args.dataset_train_split
                raise CommandError(f"the dataset has no split {split!r} (it has {list(dataset)})")
            train, analysis = dataset[script_args.dataset_train_split], dataset.get(script_args.dataset_test_split)
            if analysis is None and evaluating:
                state.print(
                    f"No routing analysis: the dataset has no split {script_args.dataset_test_split!r} of held-out "
                    f"pairs (it has {list(dataset)}); name one with --dataset_test_split."
                )
            benchmarks = benchmark_specs or published_benchmarks()
        tokenizer = load_tokenizer(
            model_name, model_revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
        replication = Replication(
            training_args.output_dir,
            model_name,
            train,
            tokenizer,
            training_args,
            benchmarks,
            settings,
            analysis_pairs=analysis,
            model_kwargs=model_init_kwargs(model_args, training_args),
            log=state.print,
        )
        if evaluating:  # unknown task names are refused now, not after the training
            check_task_names(
                [source for sources in replication.sources.values() for source in sources], task_manager_for()
            )
        replication.check_trained_arms()  # arms trained before from another base or with other settings
    except BaseException:
        if created and state.is_main_process:  # a refused run leaves nothing behind (the tiny model included)
            shutil.rmtree(training_args.output_dir, ignore_errors=True)
        raise
    outcome = replication.run(options.arms if options.stage != "evaluate" else [], with_evaluation=evaluating)
    if evaluating:
        print()
        print(markdown_table(outcome["rows"], ".2f"))
        print()
        print_paths(outcome["paths"])
    return 0
