"""Run by tests/test_distributed.py under `accelerate launch --num_processes 2`: two SARA steps with DDP on CPU (gloo),
then each rank writes the SARA metrics it logged and a checksum of its weights to `<output_dir>/rank<N>.json`."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from hf_sara import SARATrainer  # noqa: E402
from tests.testing_utils import load_pairs, pairs_model, pairs_tokenizer, sara_config  # noqa: E402


def main() -> None:
    output_dir = sys.argv[1]
    anchor_mode = sys.argv[2]
    trainer = SARATrainer(
        model=pairs_model(),
        args=sara_config(output_dir, max_steps=2, per_device_train_batch_size=2, sara_anchor_mode=anchor_mode),
        train_dataset=load_pairs(),
        processing_class=pairs_tokenizer(),
    )
    trainer.train()
    logged = [
        {key: value for key, value in entry.items() if key.startswith("sara/") or key == "loss"}
        for entry in trainer.state.log_history
        if "sara/js" in entry
    ]
    checksum = float(sum(p.detach().double().sum() for p in trainer.model.parameters()))
    rank = trainer.accelerator.process_index
    result = {"world_size": trainer.accelerator.num_processes, "logged": logged, "checksum": checksum}
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
