"""Training: [`SARAConfig`], [`SARATrainer`] and what they build on.

- [`arguments`]: the SARA settings as a mixin of any `TrainingArguments` (`SARAArguments`, `SARATrainingArguments`).
- [`config`]: the SARA settings on top of TRL's `SFTConfig`.
- [`mixin`]: the alignment loss, offline anchors, metrics and checkpoints for any `transformers.Trainer`.
- [`trainer`]: `SFTTrainer` with paired datasets in any format it accepts, and the mixin's loss.
- [`paired_data`]: the paired dataset format (an example and its anchor under a prefix), read and split.
- [`collator`]: paired batches around the trainer's own collator.
- [`anchors`]: offline anchor distributions: their identity, file, computation across ranks and cache policy.
- [`compat`]: work-arounds for transformers and TRL on MoE models, each named with the release it was seen in.
- [`model_card`]: the "SARA settings" section of the model card, written and read back.
"""
