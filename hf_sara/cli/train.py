"""`hf-sara train` and `hf-sara anchors`: a `SARATrainer` built from TRL's script arguments, under `accelerate launch`
as on one process."""

from __future__ import annotations

from .common import CommandError, check_local_reference

# A depth no model reaches: resolving a selection against it checks its syntax only.
_ANY_DEPTH = 1 << 20


def trl_parser(prog: str):
    """TRL's `TrlParser` over `ScriptArguments`, [`SARAConfig`] and `ModelConfig`: `trl sft`'s flags + SARA's."""
    from trl import ModelConfig, ScriptArguments, TrlParser

    from ..training.config import SARAConfig

    return TrlParser((ScriptArguments, SARAConfig, ModelConfig), prog=prog)


def build_trainer(argv: list[str], prog: str):
    """Parses `argv` (flags or `--config` YAML) and builds the patched model, its tokenizer and the `SARATrainer`."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import get_peft_config

    from ..routing.discovery import find_routers
    from ..routing.layers import resolve_layers
    from ..routing.patching import patch_model
    from ..tools.loading import load_dataset_dict, model_init_kwargs
    from ..training.trainer import SARATrainer

    try:
        script_args, training_args, model_args = trl_parser(prog).parse_args_and_config(args=argv)
    except yaml.YAMLError as error:
        raise CommandError(f"the --config file is not valid YAML: {' '.join(str(error).split())}") from None
    if not model_args.model_name_or_path:
        raise CommandError("--model_name_or_path is required")
    if not script_args.dataset_name:
        raise CommandError("--dataset_name is required (a Hub dataset, or a local .jsonl/.json/.parquet file)")
    # The layer selection's syntax, before the data is read or anything written (its range once the model is loaded).
    resolve_layers(training_args.sara_layers, _ANY_DEPTH)
    check_local_reference(model_args.model_name_or_path, "model")
    check_local_reference(script_args.dataset_name, "dataset")
    dataset = load_dataset_dict(script_args.dataset_name, script_args.dataset_config)
    if script_args.dataset_train_split not in dataset:
        raise CommandError(f"the dataset has no split {script_args.dataset_train_split!r} (it has {list(dataset)})")
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, **model_init_kwargs(model_args, training_args)
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    patch_model(model)  # refuses a dense model
    resolve_layers(training_args.sara_layers, len(find_routers(model)))  # before the datasets are prepared
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
    trainer, script_args, training_args = build_trainer(argv, "hf-sara train")
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

    from ..training.anchors import distributions_key

    # Under `accelerate launch` every rank computes its share of the rows; one rank writes the file.
    trainer, _, _ = build_trainer(argv, "hf-sara anchors")
    anchors = trainer.prepare_offline_anchors()
    name = next(iter(anchors.ranges))
    rows, layers, _ = anchors.file.shape(distributions_key(name))
    computed = trainer.accelerator.gather(torch.tensor([trainer.anchor_rows_computed], device=trainer.args.device))
    trainer.accelerator.print(
        f"Saved anchors of {rows} rows x {layers} MoE layers to {anchors.path} (rows computed per rank: "
        f"{', '.join(str(count) for count in computed.tolist())})"
    )
    trainer.accelerator.end_training()
    return 0
