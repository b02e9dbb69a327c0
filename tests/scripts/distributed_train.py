"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2` (DDP, DeepSpeed ZeRO-2/3 or FSDP2, on
CPU with gloo): full fine-tuning of a saved tiny MoE with SARA, as `hf-sara train` does it (the model loaded by path
after the training arguments, so ZeRO-3 partitions it at load). Each rank writes what it logged, the full router
weights after training and how many anchor rows it computed to `<output_dir>/rank<N>.json`.

Usage: distributed_train.py OUTPUT_DIR MODEL_DIR ANCHORS [--anchors-only] [--gradient-checkpointing] [--lora DIR]
ANCHORS: "trainer" (offline, computed by the trainer), "online", or the path of precomputed offline anchors.
With `--lora DIR` the saved LoRA adapter DIR is trained on the model (and its weights are what the rank writes).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def open_the_fsdp_gate_on_cpu() -> None:
    """
    accelerate 1.15 turns FSDP on only for accelerator processes: on a CPU process it silently stays DDP. Open that
    one gate, so that `accelerate launch --use_fsdp` shards the model with torch's `fully_shard` (over gloo) exactly as
    it does on GPUs.
    """
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        fsdp_plugin = kwargs.get("fsdp_plugin") or self.__dict__.get("fsdp_plugin")
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = __init__


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("model_dir")
    parser.add_argument("anchors")
    parser.add_argument("--anchors-only", action="store_true", help="compute the offline anchors, do not train")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--eval-batch-size", type=int, default=4, help="rows per anchor forward")
    parser.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every N steps (0: never)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in OUTPUT_DIR")
    parser.add_argument("--sara-weight", type=float, default=1.5)
    parser.add_argument("--loss-reduction", default="mean", help="sara_loss_reduction")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--linear-update", action="store_true", help="no clipping, constant rate: updates add up")
    parser.add_argument("--lora", help="a saved LoRA adapter to train on the model")
    parser.add_argument("--reentrant", action="store_true", help="reentrant gradient checkpointing")
    parser.add_argument("--without-anchors", default="", help="comma-separated rows whose anchor is removed")
    parser.add_argument("--batch-size", type=int, default=2, help="per_device_train_batch_size")
    options = parser.parse_args()
    if os.environ.get("ACCELERATE_USE_FSDP", "false") == "true":
        open_the_fsdp_gate_on_cpu()

    from transformers import AutoModelForCausalLM

    from hf_sara import SARATrainer, patch_model
    from hf_sara.distributed import full_parameters
    from hf_sara.routing.patching import get_routing_state
    from tests.testing_utils import distributed_config, load_pairs, pairs_tokenizer, without_anchors

    offline = options.anchors != "online"
    args = distributed_config(
        options.output_dir,
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        sara_anchor_mode="offline" if offline else "online",
        sara_anchor_path=None if options.anchors in ("trainer", "online") else options.anchors,
        gradient_checkpointing=options.gradient_checkpointing,
        per_device_eval_batch_size=options.eval_batch_size,
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        sara_weight=options.sara_weight,
        sara_loss_reduction=options.loss_reduction,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        **(dict(max_grad_norm=0.0, lr_scheduler_type="constant") if options.linear_update else {}),
        **(dict(gradient_checkpointing_kwargs={"use_reentrant": True}) if options.reentrant else {}),
    )
    model = AutoModelForCausalLM.from_pretrained(options.model_dir)  # after the arguments, as `hf-sara train` does
    if options.lora:
        from hf_sara.compat import load_peft_adapter

        model = load_peft_adapter(model, options.lora, is_trainable=True)
    rows = [int(row) for row in options.without_anchors.split(",") if row]
    dataset = without_anchors(load_pairs(), rows) if rows else load_pairs()
    tokenizer = pairs_tokenizer()
    trainer = SARATrainer(model=patch_model(model), args=args, train_dataset=dataset, processing_class=tokenizer)
    if options.anchors_only:
        trainer.prepare_offline_anchors()
    else:
        trainer.train(resume_from_checkpoint=True if options.resume else None)
    logged = [
        {key: value for key, value in entry.items() if key.startswith("sara/") or key in ("loss", "step")}
        for entry in trainer.state.log_history
        if "sara/js" in entry
    ]
    state = get_routing_state(trainer.model)
    if options.lora:  # the adapter's weights on the routers (a LoRA pair each)
        routers = {
            name: parameter
            for site in state.captured_sites
            for name, parameter in trainer.model.get_submodule(site.name).named_parameters(prefix=site.name)
            if "lora_" in name
        }
    else:
        routers = {site.name: trainer.model.get_submodule(site.name).weight for site in state.captured_sites}
    with full_parameters(list(routers.values())) as values:
        weights = {name: value.float().cpu().tolist() for name, value in zip(routers, values, strict=True)}
    result = {
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "sharded": type(next(iter(routers.values()))).__name__,
        "logged": logged,
        "router_weights": weights,
        "anchor_rows_computed": trainer.anchor_rows_computed,
        "gradient_checkpointing_kwargs": trainer.args.gradient_checkpointing_kwargs,
    }
    with open(os.path.join(options.output_dir, f"rank{trainer.accelerator.process_index}.json"), "w") as handle:
        json.dump(result, handle)
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # destroys the process group: no communication thread left at exit


if __name__ == "__main__":
    main()
