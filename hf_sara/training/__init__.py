"""Training: [`SARAConfig`], [`SARATrainer`] and what they build on.

- [`config`]: the SARA settings on top of TRL's `SFTConfig`.
- [`trainer`]: `SFTTrainer` with paired datasets and the alignment loss.
- [`paired_data`]: the paired dataset format (an example and its anchor under a prefix), read and split.
- [`collator`]: paired batches around the trainer's own collator.
- [`anchors`], [`anchor_file`]: offline anchor distributions, computed across ranks and memory-mapped.
- [`model_card`]: the "SARA settings" section of the model card, written and read back.
- [`trl_compat`]: work-arounds for TRL on some MoE families.
"""
