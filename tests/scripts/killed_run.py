"""Run by tests/test_reliability.py: a short SARA training (or `hf-sara pairs`) that kills itself with SIGKILL at a
chosen point of a file write, as a preempted node or the out-of-memory killer would, or runs to the end.

Usage: killed_run.py OUTPUT_DIR KILL_AT [--resume]
KILL_AT: "anchors" (anchor file rows written, not committed), "checkpoint" (second checkpoint: model saved, its
trainer_state.json half written), "pairs" (half of a pairs file written), or "none". Writes OUTPUT_DIR/done.json
with the logged losses when it runs to the end.
"""

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    output_dir, kill_at = sys.argv[1], sys.argv[2]
    resume = "--resume" in sys.argv
    if kill_at == "pairs":
        import hf_sara.tools.pairs as pairs

        rows = [
            {"language": "sw", "text": f"maandishi {index}", "anchor_text": f"text {index}"} for index in range(50)
        ]
        original = json.dumps

        def dumps(value, **kwargs):
            if value is rows[25]:
                kill()
            return original(value, **kwargs)

        pairs.json.dumps = dumps
        pairs.write_jsonl(rows, os.path.join(output_dir, "pairs.jsonl"))
        return

    from transformers import TrainerState
    from transformers.utils import logging

    from hf_sara import SARATrainer
    from hf_sara.training.anchors.file import AnchorFileWriter
    from tests.testing_utils import load_pairs, pairs_model, pairs_tokenizer, sara_config

    logging.set_verbosity_warning()  # testing_utils silences transformers' loggers; hf_sara's warnings are checked

    if kill_at == "anchors":
        AnchorFileWriter.commit = lambda self: kill()
    elif kill_at == "checkpoint":
        original_save = TrainerState.save_to_json

        def save_to_json(self, path):
            if self.global_step == 4:
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write('{"global_step": 4, "log_hist')
                kill()
            original_save(self, path)

        TrainerState.save_to_json = save_to_json
    trainer = SARATrainer(
        model=pairs_model(),
        args=sara_config(output_dir, max_steps=6, save_strategy="steps", save_steps=2, optim="sgd", learning_rate=0.5),
        train_dataset=load_pairs(),
        processing_class=pairs_tokenizer(),
    )
    trainer.train(resume_from_checkpoint=True if resume else None)
    losses = {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}
    with open(os.path.join(output_dir, "done.json"), "w") as handle:
        json.dump({"losses": losses}, handle)


if __name__ == "__main__":
    main()
