"""`hf-sara replicate`: the published comparison (full fine-tuning, SARA, SARA on all layers), evaluated per language
beside the paper's numbers; resumable, and under `accelerate launch` one arm per launch."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from .common import CommandError


@dataclass
class ReplicationArguments:
    """The replication's own options, next to TRL's script, training (`SARAConfig`) and model arguments."""

    arms: list[str] = field(
        default_factory=lambda: ["full_ft", "sara", "sara_all_layers"],
        metadata={"help": "Arms to train now (finished ones are skipped): full_ft, sara, sara_all_layers."},
    )
    stage: str = field(
        default="all",
        metadata={
            "help": "'train': train the arms only (one `accelerate launch` per arm on several GPUs); 'evaluate': "
            "evaluate the base and every trained arm, analyse routing and write the table; 'all': both.",
            "choices": ["train", "evaluate", "all"],
        },
    )
    benchmarks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "BENCHMARK:LANG=TASK or BENCHMARK:LANG=FILE sources (default: Global-MMLU, BELEBELE and MGSM "
            "harness tasks for hi, ne, bn, te, sw; MGSM has bn, te, sw only)."
        },
    )
    eval_limit: float | None = field(default=None, metadata={"help": "only the first N items per task"})
    eval_batch_size: str = field(default="8", metadata={"help": "harness batch size, or 'auto'"})
    eval_num_fewshot: int | None = field(default=None, metadata={"help": "few-shot examples (default: the task's)"})
    eval_device_map: str | None = field(
        default=None, metadata={"help": "device_map for evaluation, e.g. 'auto' for a model larger than one GPU"}
    )
    analysis_split: str = field(
        default="test", metadata={"help": "split of the pairs for the routing analysis (default: test, if any)"}
    )
    tiny: bool = field(
        default=False,
        metadata={
            "help": "offline smoke run: a tiny untrained Qwen3-MoE, the embedded pairs and the shipped sample eval "
            "files (unless --benchmarks is given), a few steps on the CPU"
        },
    )


def replication_parser():
    from trl import ModelConfig, ScriptArguments, TrlParser

    from ..training.config import SARAConfig

    return TrlParser((ScriptArguments, SARAConfig, ModelConfig, ReplicationArguments), prog="hf-sara replicate")


def _tiny_inputs(replication_args: ReplicationArguments, training_args):
    """The tiny offline setting: a saved tiny model, the embedded pairs, the sample eval files, a short CPU budget."""
    import dataclasses

    from ..testing import load_demo_pairs, save_tiny_model
    from ..tools.eval_files import sample_eval_files
    from ..tools.pairs import split_by_item

    model_dir = os.path.join(training_args.output_dir, "tiny-model")
    if not os.path.isdir(model_dir):  # written aside and renamed: a killed run leaves no half-saved model
        staging = tempfile.mkdtemp(dir=training_args.output_dir, prefix=".tiny-model-")
        os.replace(save_tiny_model(staging), model_dir)
    train, test = split_by_item(load_demo_pairs())
    budget = dict(max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=1, use_cpu=True)
    budget.update(bf16=False, gradient_checkpointing=False, max_length=64, logging_steps=1, report_to=[])
    training_args = dataclasses.replace(training_args, **budget)
    samples = sample_eval_files()
    benchmarks = replication_args.benchmarks or [f"global_mmlu:{lang}={samples[lang]}" for lang in ("sw", "en")]
    return model_dir, train, test, training_args, benchmarks


def replicate_command(argv: list[str]) -> int:
    import torch
    import yaml
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from ..tools.evaluation import EvalSettings, require_lm_eval
    from ..tools.replication import ARMS, Replication, parse_benchmarks, published_benchmarks
    from ..tools.reporting import markdown_table
    from .common import batch_size, check_local_reference, load_dataset_dict
    from .train import model_init_kwargs

    try:
        script_args, training_args, model_args, replication_args = replication_parser().parse_args_and_config(
            args=argv
        )
    except yaml.YAMLError as error:
        raise CommandError(f"the --config file is not valid YAML: {' '.join(str(error).split())}") from None
    unknown = [arm for arm in replication_args.arms if arm not in ARMS]
    if unknown:
        raise CommandError(f"unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    if model_args.use_peft:
        raise CommandError("the published comparison is full fine-tuning: drop --use_peft")
    if replication_args.stage != "train":
        require_lm_eval()
    os.makedirs(training_args.output_dir, exist_ok=True)
    if replication_args.tiny:
        model_name, train, analysis, training_args, specs = _tiny_inputs(replication_args, training_args)
    else:
        if not model_args.model_name_or_path or not script_args.dataset_name:
            raise CommandError("--model_name_or_path and --dataset_name are required (or --tiny for a smoke run)")
        model_name = model_args.model_name_or_path
        check_local_reference(model_name, "model")
        check_local_reference(script_args.dataset_name, "dataset")
        dataset = load_dataset_dict(script_args.dataset_name, script_args.dataset_config)
        if script_args.dataset_train_split not in dataset:
            raise CommandError(
                f"the dataset has no split {script_args.dataset_train_split!r} (it has {list(dataset)})"
            )
        train = dataset[script_args.dataset_train_split]
        analysis = dataset.get(replication_args.analysis_split)
        specs = replication_args.benchmarks
    benchmarks = parse_benchmarks(specs) if specs else published_benchmarks()
    settings = EvalSettings(
        num_fewshot=replication_args.eval_num_fewshot,
        batch_size=batch_size(replication_args.eval_batch_size),
        limit=replication_args.eval_limit,
        device_map=replication_args.eval_device_map,
        trust_remote_code=training_args.trust_remote_code,
        device=None if torch.cuda.is_available() and not training_args.use_cpu else "cpu",
    )
    model_kwargs = model_init_kwargs(model_args, training_args)
    tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=training_args.trust_remote_code)
    state = PartialState()
    replication = Replication(
        training_args.output_dir,
        model_name,
        train,
        tokenizer,
        training_args,
        benchmarks,
        settings,
        analysis_pairs=analysis,
        model_kwargs=model_kwargs,
        log=state.print,
    )
    arms = replication_args.arms if replication_args.stage != "evaluate" else []
    evaluate = replication_args.stage != "train"
    for arm in arms:
        replication.train(arm)
    if evaluate and state.is_main_process:  # the harness evaluates on one process
        outcome = replication.run(arms=[], evaluate=True)
        print()
        print(markdown_table(outcome["rows"], ".2f"))
        print()
        for kind, path in outcome["paths"].items():
            print(f"{kind}: {path}")
    state.wait_for_everyone()
    return 0
