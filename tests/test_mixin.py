"""`SARAMixin` with transformers' plain `Trainer` (the authors' setup): tokenized pairs, the same loss and update as
`SARATrainer`, offline anchors, metrics, checkpointing and the model card."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from hf_sara import SARAMixin, SARATrainer, SARATrainingArguments
from hf_sara.training.arguments import convert_training_arguments

from .testing_utils import LINEAR_STEP, TRAINING_ARGUMENTS, load_pairs, pairs_model, pairs_tokenizer, sara_config

ANCHORLESS_ROWS = [1, 4, 6, 9, 12, 14]


class SARATokenizedTrainer(SARAMixin, Trainer):
    """What a user writes: the mixin before their trainer."""


def tokenized_pairs(labels: str = "completion") -> Dataset:
    """
    The shipped pairs tokenized on both sides (prompt + completion, no special tokens). `labels`: "completion" leaves
    the prompt out of them (-100), "all" keeps every token, "none" gives no `labels` column (TRL's collator then makes
    them from every token). Rows in `ANCHORLESS_ROWS` have no anchor.
    """
    tokenizer = pairs_tokenizer()
    records = []
    for index, row in enumerate(load_pairs()):
        record = {"language": row["language"]}
        for prefix in ("", "anchor_"):
            prompt = tokenizer(row[prefix + "prompt"], add_special_tokens=False).input_ids
            completion = tokenizer(row[prefix + "completion"], add_special_tokens=False).input_ids
            anchorless = prefix and index in ANCHORLESS_ROWS
            record[prefix + "input_ids"] = None if anchorless else prompt + completion
            if labels != "none":
                masked = [-100] * len(prompt) if labels == "completion" else prompt
                record[prefix + "labels"] = None if anchorless else masked + completion
        records.append(record)
    return Dataset.from_list(records)


def collator():
    tokenizer = copy.deepcopy(pairs_tokenizer())
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


STEP = dict(**LINEAR_STEP, per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1)


def plain_arguments(output_dir, **overrides) -> SARATrainingArguments:
    common = {key: value for key, value in TRAINING_ARGUMENTS.items() if key != "max_length"}
    return SARATrainingArguments(
        output_dir=str(output_dir), **{**common, "sara_layers": "all", "remove_unused_columns": True, **overrides}
    )


def _routers(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if name.endswith("mlp.gate.weight")}


def _train(trainer) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    routers = _routers(trainer.model)
    before = {name: p.detach().clone() for name, p in routers.items()}
    trainer.train()
    logs = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return {name: routers[name].detach() - before[name] for name in routers}, logs


def _plain_trainer(output_dir, labels: str = "completion", **overrides):
    return SARATokenizedTrainer(
        model=pairs_model(),
        args=plain_arguments(output_dir, **{**STEP, **overrides}),
        train_dataset=tokenized_pairs(labels),
        data_collator=collator(),
    )


def _sara_trainer(output_dir, **overrides):
    return SARATrainer(
        model=pairs_model(),
        args=sara_config(output_dir, **{**STEP, "max_length": None, **overrides}),
        train_dataset=tokenized_pairs("none"),
        processing_class=pairs_tokenizer(),
    )


@pytest.mark.parametrize("reduction", ["step_mean", "mean", "sum"])
def test_plain_trainer_gets_the_loss_and_update_of_sara_trainer(tmp_path, reduction):
    # The same tokens in the loss (every token: TRL's collator makes the labels of tokenized rows from all of them),
    # and the load-balancing loss off (SFTTrainer adds it to the loss itself, a plain Trainer inside the model's).
    options = dict(sara_loss_reduction=reduction)
    plain_update, plain_logs = _train(_plain_trainer(tmp_path / "plain", labels="all", **options))
    sara_update, sara_logs = _train(_sara_trainer(tmp_path / "sara", router_aux_loss_coef=0.0, **options))
    assert plain_logs["sara/js"] == pytest.approx(sara_logs["sara/js"], rel=1e-5)
    assert plain_logs["loss"] == pytest.approx(sara_logs["loss"], rel=1e-5)
    assert "sara/js_sw" in plain_logs and plain_logs["sara/weight"] == 1.5
    for name, update in sara_update.items():
        assert update.norm() > 1e-4
        torch.testing.assert_close(plain_update[name], update, rtol=0, atol=1e-6, msg=name)


def test_the_alignment_update_of_the_plain_trainer_is_the_same_in_every_checkpointing_mode(tmp_path):
    def alignment_update(name, **overrides):
        with_term, _ = _train(_plain_trainer(tmp_path / name / "sara", **overrides))
        without, _ = _train(_plain_trainer(tmp_path / name / "sft", sara_weight=0.0, **overrides))
        return {key: with_term[key] - without[key] for key in with_term}

    reference = alignment_update("none")
    assert max(update.norm() for update in reference.values()) > 1e-4
    for mode in (False, True):
        update = alignment_update(
            f"reentrant-{mode}", gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": mode}
        )
        for key in reference:
            torch.testing.assert_close(update[key], reference[key], rtol=0, atol=1e-6, msg=f"{mode}: {key}")


def test_offline_anchors_metrics_and_model_card(tmp_path):
    trainer = SARATokenizedTrainer(
        model=pairs_model(),
        args=plain_arguments(tmp_path, max_steps=2, per_device_eval_batch_size=4),
        train_dataset=tokenized_pairs(),
        eval_dataset={"sw": tokenized_pairs().select(range(4)), "hi": tokenized_pairs().select(range(8, 12))},
        data_collator=collator(),
    )
    trainer.train()
    assert (tmp_path / "sara_anchors.safetensors").is_file()
    assert trainer.anchor_rows_computed == (16 - len(ANCHORLESS_ROWS)) + 3 + 3  # rows 1 and 9 have no anchor
    metrics = trainer.evaluate()
    # Each named eval dataset logs its SARA metrics under its own prefix, like its loss.
    assert {"eval_sw_loss", "eval_sw_sara/js", "eval_hi_loss", "eval_hi_sara/js"} <= set(metrics)
    assert not any(key.startswith("eval_sara/") for key in metrics)
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert "## SARA settings" in card and "| sara_loss_reduction | step_mean |" in card


def test_a_dataset_passed_to_evaluate_is_prepared(tmp_path):
    trainer = _plain_trainer(tmp_path)
    metrics = trainer.evaluate(tokenized_pairs().select(range(6)))
    assert metrics["eval_sara/js"] >= 0


def test_plain_training_arguments_are_converted_with_the_sara_defaults(tmp_path):
    common = {key: value for key, value in TRAINING_ARGUMENTS.items() if key != "max_length"}
    trainer = SARATokenizedTrainer(
        model=pairs_model(),
        args=TrainingArguments(output_dir=str(tmp_path), **common),
        train_dataset=tokenized_pairs(),
        data_collator=collator(),
    )
    assert isinstance(trainer.args, SARATrainingArguments)
    assert trainer.args.sara_weight == 1.5 and trainer.args.learning_rate == TRAINING_ARGUMENTS["learning_rate"]
    assert convert_training_arguments(trainer.args, TrainingArguments).learning_rate == trainer.args.learning_rate


def test_text_pairs_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"takes tokenized pairs: .*anchor_input_ids.*or use `SARATrainer`"):
        SARATokenizedTrainer(
            model=pairs_model(), args=plain_arguments(tmp_path), train_dataset=load_pairs(), data_collator=collator()
        )


def test_an_example_without_tokens_is_refused(tmp_path):
    records = tokenized_pairs().to_list()
    records[3]["input_ids"], records[3]["labels"] = [], []
    with pytest.raises(ValueError, match=r"Row\(s\) \[3\] of the train dataset have no token"):
        SARATokenizedTrainer(
            model=pairs_model(),
            args=plain_arguments(tmp_path),
            train_dataset=Dataset.from_list(records),
            data_collator=collator(),
        )


def test_an_sft_loss_on_the_anchors_needs_their_labels(tmp_path):
    dataset = tokenized_pairs().remove_columns("anchor_labels")
    trainer = SARATokenizedTrainer(
        model=pairs_model(),
        args=plain_arguments(tmp_path, max_steps=1, anchor_sft_weight=1.0),
        train_dataset=dataset,
        data_collator=collator(),
    )
    with pytest.raises(ValueError, match="anchor_labels"):
        trainer.train()


class _CountingCollator:
    """A collator of rows that counts the rows it collates."""

    def __init__(self):
        self.collator, self.rows = collator(), 0

    def __call__(self, rows):
        assert all(isinstance(row, dict) for row in rows)
        self.rows += len(rows)
        return self.collator(rows)


def test_a_trainer_s_row_collator_collates_the_anchors(tmp_path):
    class RowCollatorTrainer(SARATokenizedTrainer):
        # What a trainer whose own collator takes bins of rows (Axolotl's multipack) does.
        def _sara_row_collator(self):
            return rows

    rows = _CountingCollator()
    trainer = RowCollatorTrainer(
        model=pairs_model(),
        args=plain_arguments(tmp_path / "rows", sara_anchor_mode="offline"),
        train_dataset=tokenized_pairs(),
        data_collator=collator(),
    )
    table = trainer.train_anchor_table()
    assert rows.rows >= 16 - len(ANCHORLESS_ROWS)  # every anchor went through it (and the verification batch)
    reference = _plain_trainer(tmp_path / "plain").train_anchor_table()
    torch.testing.assert_close(table, reference, rtol=0, atol=1e-6)

    rows.rows = 0
    online = RowCollatorTrainer(
        model=pairs_model(),
        args=plain_arguments(tmp_path / "online", sara_anchor_mode="online", **STEP),
        train_dataset=tokenized_pairs(),
        data_collator=collator(),
    )
    _, logs = _train(online)
    assert rows.rows > 0 and "sara/js" in logs


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    def run(output_dir, resume=None):
        arguments = dict(max_steps=4, save_strategy="steps", save_steps=2, optim="sgd", learning_rate=0.5)
        trainer = SARATokenizedTrainer(
            model=pairs_model(),
            args=plain_arguments(output_dir, **arguments, sara_warmup_ratio=0.5),
            train_dataset=tokenized_pairs(),
            data_collator=collator(),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    def after_step_2(trainer, key):
        return [entry[key] for entry in trainer.state.log_history if key in entry and entry["step"] > 2]

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-2"))  # with the first run's anchors
    assert len(after_step_2(full, "loss")) == 2
    assert after_step_2(resumed, "loss") == pytest.approx(after_step_2(full, "loss"), abs=1e-6)
    assert after_step_2(resumed, "sara/js") == pytest.approx(after_step_2(full, "sara/js"), rel=1e-2)


def test_padding_free_batches_of_the_plain_trainer_align_like_padded_ones(tmp_path):
    from transformers import DataCollatorWithFlattening

    def first_logs(name, data_collator):
        trainer = SARATokenizedTrainer(
            model=pairs_model(),
            args=plain_arguments(tmp_path / name, **STEP, sara_pooling="completion"),
            train_dataset=tokenized_pairs(),
            data_collator=data_collator,
        )
        return _train(trainer)[1]

    padded = first_logs("padded", collator())
    flattened = first_logs("flattened", DataCollatorWithFlattening())
    assert flattened["sara/js"] == pytest.approx(padded["sara/js"], rel=1e-4)
