"""Run by tests/test_monitor.py under `accelerate launch --num_processes 2` (DDP or FSDP2, on CPU with gloo; DeepSpeed
runs it too, with `DS_ACCELERATOR=cpu`): plain TRL `SFTTrainer` full fine-tuning of a saved tiny MoE with a
`RoutingDivergenceCallback`. Each rank writes what it logged, how many pairs it measured and whether anything of the
patch is left to `<output_dir>/rank<N>.json`; rank 0 also writes the full weights after training to
`<output_dir>/final.safetensors`.

Usage: monitor_train.py OUTPUT_DIR MODEL_DIR
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.scripts.distributed_train import open_the_fsdp_gate_on_cpu  # noqa: E402

MEASURE_STEPS = 1
BATCH_SIZE = 6  # 16 pairs: 3 batches, so one rank runs a batch it drops (sharded engines need every rank's forward)


def main() -> None:
    output_dir, model_dir = sys.argv[1:3]
    if os.environ.get("ACCELERATE_USE_FSDP", "false") == "true":
        open_the_fsdp_gate_on_cpu()

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from hf_sara import RoutingDivergenceCallback, is_patched
    from hf_sara.distributed import full_parameters
    from hf_sara.routing.patching import RouterHook
    from tests.testing_utils import load_pairs, pairs_tokenizer, sft_config

    # Under DeepSpeed, `use_cpu` must stay False (accelerate ignores DeepSpeed when it is set), with gloo.
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    engine_arguments = dict(use_cpu=False, ddp_backend="gloo") if deepspeed else {}
    args = sft_config(
        output_dir, max_steps=2, per_device_train_batch_size=2, optim="sgd", learning_rate=0.5, **engine_arguments
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = SFTTrainer(model=model, args=args, train_dataset=load_pairs(), processing_class=pairs_tokenizer())
    callback = RoutingDivergenceCallback(trainer, load_pairs(), steps=MEASURE_STEPS, batch_size=BATCH_SIZE)
    trainer.add_callback(callback)
    trainer.train()

    named = list(trainer.model.named_parameters())
    with full_parameters([parameter for _, parameter in named]) as values:
        weights = {name: value.detach().cpu().contiguous() for (name, _), value in zip(named, values, strict=True)}
    accelerator = trainer.accelerator
    if accelerator.is_main_process:
        save_file(weights, os.path.join(output_dir, "final.safetensors"))
    result = {
        "world_size": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "sharded": type(named[0][1]).__name__,
        "logged": [entry for entry in trainer.state.log_history if any(key.startswith("routing/") for key in entry)],
        "rows_measured": callback.rows_measured,
        "patched": is_patched(trainer.model),
        "router_hooks": sum(
            isinstance(hook, RouterHook)
            for module in trainer.model.modules()
            for hook in module._forward_hooks.values()
        ),
        "figure": os.path.exists(os.path.join(output_dir, "routing_layer_divergence.png")),
    }
    with open(os.path.join(output_dir, f"rank{accelerator.process_index}.json"), "w") as handle:
        json.dump(result, handle)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
