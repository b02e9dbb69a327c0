"""`RoutingDivergenceCallback`: what it logs equals `analyze_routing` (`hf-sara analyze`) on the same checkpoint and
pairs, with TRL's `SFTTrainer`, `SARATrainer`, transformers' `Trainer` and on 2 processes (DDP, FSDP2); measuring
changes nothing in the training and leaves nothing on the model."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from trl import SFTTrainer

from hf_sara import RoutingDivergenceCallback, SARATrainer, is_patched, patch_model
from hf_sara.routing.layers import resolve_layers
from hf_sara.routing.patching import RouterHook
from hf_sara.tools.analysis import analyze_routing
from hf_sara.tools.monitor import FIGURE_FILE_NAME
from hf_sara.tools.paired_routing import encode_pairs, measure_pairs
from hf_sara.training.paired_data import detect_paired_format

from .test_dealing import run_on_ranks
from .test_distributed import DISTRIBUTED_TYPES, ENGINES, ROOT, free_port
from .testing_utils import load_pairs, pairs_in_format, pairs_model, pairs_tokenizer, sara_config, sft_config

SCRIPT = os.path.join(ROOT, "tests", "scripts", "monitor_train.py")
TOLERANCE = 1e-6


def hooks(model) -> dict[str, list]:
    """
    Every forward hook and pre-hook of every module, by module name. transformers installs its own output-recording
    hooks at a model's first forward: run one before taking the hooks to compare with.
    """
    return {
        name: [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        for name, module in model.named_modules()
    }


def first_forward(model) -> None:
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))


def routing_entries(log_history: list[dict]) -> dict[int, dict]:
    entries = [entry for entry in log_history if any(key.startswith("routing/") for key in entry)]
    steps = [entry["step"] for entry in entries]
    assert len(steps) == len(set(steps)), f"one measurement per step, got steps {steps}"
    return {entry["step"]: entry for entry in entries}


def difference_to_analysis(entry: dict, model, pairs, layers: list[int], batch_size: int = 16) -> float:
    """Largest difference between a logged entry and `analyze_routing` of `model` on `pairs`; checks the keys."""
    report = analyze_routing(patch_model(model), pairs_tokenizer(), pairs, batch_size=batch_size)
    expected = {f"routing/js_{language}": value for language, value in report.mean_divergence(layers).items()}
    for language, values in report.divergence.items():
        expected.update({f"routing/js_{language}_layer{i}": value for i, value in enumerate(values.tolist())})
    logged = {key: value for key, value in entry.items() if key.startswith("routing/")}
    assert set(logged) == set(expected)
    return max(abs(logged[key] - expected[key]) for key in expected)


@pytest.mark.parametrize("trainer_class", ["SFTTrainer", "SARATrainer"])
def test_logged_values_equal_analyze_on_the_checkpoints(trainer_class, tmp_path):
    pairs = load_pairs()
    checkpoints = dict(max_steps=2, save_strategy="steps", save_steps=1)
    if trainer_class == "SFTTrainer":
        model = pairs_model()
        trainer = SFTTrainer(
            model=model,
            args=sft_config(tmp_path, **checkpoints),
            train_dataset=pairs,
            processing_class=pairs_tokenizer(),
        )
        aligned = resolve_layers(None, 4)  # not a SARAConfig: the published band, as `hf-sara analyze`
    else:
        model = patch_model(pairs_model())
        trainer = SARATrainer(
            model=model,
            args=sara_config(tmp_path, **checkpoints),
            train_dataset=pairs,
            processing_class=pairs_tokenizer(),
        )
        aligned = [0, 1, 2, 3]  # the trainer's `sara_layers="all"`
    first_forward(model)  # transformers' own hooks installed (see `hooks`)
    before = hooks(model)
    callback = RoutingDivergenceCallback(trainer, pairs, steps=1)
    assert callback.layers == aligned
    trainer.add_callback(callback)

    measured = []  # (training mode, grad enabled) of the callback's forwards, the only ones with `logits_to_keep`

    def record(module, args, kwargs):
        if "logits_to_keep" in kwargs:
            measured.append((module.training, torch.is_grad_enabled()))

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    handle.remove()

    entries = routing_entries(trainer.state.log_history)
    assert sorted(entries) == [0, 1, 2]
    differences = {0: difference_to_analysis(entries[0], pairs_model(), pairs, aligned)}
    for step in (1, 2):
        checkpoint = AutoModelForCausalLM.from_pretrained(tmp_path / f"checkpoint-{step}")
        differences[step] = difference_to_analysis(entries[step], checkpoint, pairs, aligned)
    assert max(differences.values()) <= TOLERANCE, differences
    assert entries[2]["routing/js_sw"] != entries[0]["routing/js_sw"]  # the model changed in between
    # Every loss the trainer logs is still there (logging a measurement must not swallow the step's own log).
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2]
    assert measured and all(mode == (False, False) for mode in measured), measured
    assert model.training  # the trainer's mode, put back
    assert hooks(model) == before  # SFT: no hook left; SARA: its own patch, the very same hooks
    assert is_patched(model) == (trainer_class == "SARATrainer")
    if trainer_class == "SFTTrainer":
        assert len(measured) == 3 * 2  # 3 measurements x (examples, anchors) x 1 batch of 16
        assert not any(isinstance(hook, RouterHook) for module_hooks in before.values() for hook in module_hooks)
    assert (tmp_path / FIGURE_FILE_NAME).stat().st_size > 0


def test_measuring_does_not_change_the_training(tmp_path):
    runs = {}
    for name in ("without", "with"):
        trainer = SFTTrainer(
            model=pairs_model(),
            args=sft_config(
                tmp_path / name, max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2
            ),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        if name == "with":
            trainer.add_callback(RoutingDivergenceCallback(trainer, load_pairs(), steps=1, plot=False))
        trainer.train()
        losses = [
            (entry["step"], entry["loss"], entry["grad_norm"])
            for entry in trainer.state.log_history
            if "loss" in entry
        ]
        runs[name] = (trainer.model.state_dict(), trainer.optimizer.state_dict()["state"], losses)
    (weights, optimizer, losses), (weights_with, optimizer_with, losses_with) = runs["without"], runs["with"]
    assert losses == losses_with and len(losses) == 2
    assert weights.keys() == weights_with.keys()
    assert all(torch.equal(weights[key], weights_with[key]) for key in weights)
    assert optimizer.keys() == optimizer_with.keys() and optimizer
    for index, state in optimizer.items():
        assert all(torch.equal(state[key], optimizer_with[index][key]) for key in state)


def test_plain_trainer_measures_once_per_evaluation(tmp_path):
    tokenizer = pairs_tokenizer()
    pairs = load_pairs()
    texts = [prompt + completion for prompt, completion in zip(pairs["prompt"], pairs["completion"], strict=True)]
    tokenized = Dataset.from_dict({"text": texts}).map(lambda row: tokenizer(row["text"]), remove_columns=["text"])
    model = pairs_model()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, eval_strategy="steps", eval_steps=2,
            logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        ),
        train_dataset=tokenized,
        eval_dataset={"first": tokenized, "second": tokenized},  # two evaluations per eval step, one measurement
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )  # fmt: skip
    callback = RoutingDivergenceCallback(trainer, pairs, plot=False, measure_at_start=False)
    trainer.add_callback(callback)
    first_forward(model)
    before = hooks(model)
    trainer.train()
    entries = routing_entries(trainer.state.log_history)
    assert sorted(entries) == [2, 4]
    assert sorted(callback.reports) == [2, 4]
    assert not is_patched(model) and hooks(model) == before
    # The final measurement is that of the trained model.
    final = AutoModelForCausalLM.from_config(model.config)
    final.load_state_dict(model.state_dict())
    assert difference_to_analysis(entries[4], final, pairs, resolve_layers(None, 4)) <= TOLERANCE


def tokenized_format(tokenizer):
    """The `messages` pairs tokenized with the chat template, as `input_ids` / `anchor_input_ids`."""
    messages = pairs_in_format("messages")
    return Dataset.from_dict(
        {
            "language": messages["language"],
            **{
                f"{prefix}input_ids": [
                    tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False)[
                        "input_ids"
                    ]
                    for conversation in messages[f"{prefix}messages"]
                ]
                for prefix in ("", "anchor_")
            },
        }
    )


def test_every_paired_format_is_measured_outside_training_too(tmp_path):
    tokenizer = pairs_tokenizer()
    model = pairs_model()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        processing_class=tokenizer,
    )
    datasets = {name: pairs_in_format(name) for name in ("prompt_completion", "text", "messages")}
    datasets["conversational_prompt_completion"] = pairs_in_format("conversational_prompt_completion").remove_columns(
        ["language"]
    )
    datasets["input_ids"] = tokenized_format(tokenizer)
    first_forward(model)
    before = hooks(model)
    reports = {}
    for name, dataset in datasets.items():
        callback = RoutingDivergenceCallback(trainer, dataset, plot=False)
        reports[name] = callback.measure()
        assert callback.rows_measured == 16
        assert not is_patched(model) and hooks(model) == before  # patched for the measurement only

    def same(first, second):
        return all(
            torch.equal(reports[first].divergence[language], reports[second].divergence[language])
            for language in reports[first].divergence
        )

    assert same("prompt_completion", "text") and same("messages", "input_ids")
    assert not same("prompt_completion", "messages")  # the chat template changes the sequences
    # Without a language column every row is "unknown": the mean of both languages' rows.
    unknown = reports["conversational_prompt_completion"].divergence["unknown"]
    assert torch.allclose(unknown, (reports["messages"].divergence["sw"] + reports["messages"].divergence["hi"]) / 2)
    assert reports["prompt_completion"].counts == {"sw": 8, "hi": 8}
    reference = analyze_routing(patch_model(pairs_model()), tokenizer, datasets["prompt_completion"])
    assert all(
        torch.equal(reports["prompt_completion"].divergence[language], reference.divergence[language])
        for language in reference.divergence
    )
    # `analyze_routing` reads every format too, through the same measurement: the very same report.
    for name, dataset in datasets.items():
        assert_same_report(reports[name], analyze_routing(patch_model(pairs_model()), tokenizer, dataset))
    # Rows without an anchor are skipped; a model patched by the user stays patched, with the same hooks.
    patch_model(model)
    before = hooks(model)
    partial = pairs_in_format("prompt_completion").map(
        lambda row, index: {"anchor_prompt": None, "anchor_completion": None} if index < 4 else {}, with_indices=True
    )
    report = RoutingDivergenceCallback(trainer, partial, plot=False).measure()
    assert report.counts == {"sw": 6, "hi": 6} and hooks(model) == before


def assert_same_report(report, expected) -> None:
    assert report.counts == expected.counts
    for field in ("divergence", "usage"):
        values, expected_values = getattr(report, field), getattr(expected, field)
        assert list(values) == list(expected_values)
        assert all(torch.equal(values[key], expected_values[key]) for key in values), field


@pytest.mark.parametrize("num_processes", [2, 3])
def test_any_number_of_ranks_gives_the_report_of_one_process(num_processes):
    pairs = encode_pairs(load_pairs(), detect_paired_format(load_pairs().column_names), pairs_tokenizer())
    model = patch_model(pairs_model())
    expected, measured = measure_pairs(model, pairs, batch_size=3)
    assert measured == 16

    def work(rank, gather):  # each simulated rank runs its own copy (a capture belongs to one forward at a time)
        return measure_pairs(copy.deepcopy(model), pairs, 3, rank, num_processes, gather)

    results = run_on_ranks(num_processes, work)
    for report, _ in results:
        assert_same_report(report, expected)  # the usage too: summed pair after pair in the pairs' order
    assert sum(measured for _, measured in results) == 16


def test_refusals(tmp_path):
    trainer = Trainer(
        model=pairs_model(),
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        processing_class=pairs_tokenizer(),
    )
    pairs = load_pairs()
    with pytest.raises(ValueError, match="`steps`"):
        RoutingDivergenceCallback(trainer, pairs, steps=0)
    with pytest.raises(ValueError, match="has an anchor"):
        RoutingDivergenceCallback(trainer, pairs.map(lambda row: {"anchor_prompt": None, "anchor_completion": None}))
    with pytest.raises(ValueError, match="out of range"):
        RoutingDivergenceCallback(trainer, pairs, layers=[7])
    patch_model(trainer.model, layers=[0, 1])
    with pytest.raises(ValueError, match="leaves out the layers"):
        RoutingDivergenceCallback(trainer, pairs, layers="all")


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_two_processes_log_the_values_of_one(engine, tmp_path):
    model_dir, output_dir = tmp_path / "model", tmp_path / "run"
    pairs_model().save_pretrained(model_dir)
    output_dir.mkdir()
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *ENGINES[engine], "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", SCRIPT, str(output_dir), str(model_dir),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    ranks = [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(rank["distributed_type"].endswith(DISTRIBUTED_TYPES[engine]) for rank in ranks)
    assert ranks[0]["sharded"] == ("DTensor" if engine == "fsdp2" else "Parameter")
    # 16 pairs in batches of 6: rank 0 measured batches 0 and 2, rank 1 batch 1 (and ran batch 0 again, dropped).
    assert [rank["rows_measured"] for rank in ranks] == [10, 6]
    assert ranks[0]["logged"] == ranks[1]["logged"]
    assert all(not rank["patched"] and rank["router_hooks"] == 0 for rank in ranks)
    assert (output_dir / FIGURE_FILE_NAME).exists()
    entries = routing_entries(ranks[0]["logged"])
    assert sorted(entries) == [0, 1, 2]
    final = AutoModelForCausalLM.from_pretrained(model_dir)
    final.load_state_dict(load_file(output_dir / "final.safetensors"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process (OMP_NUM_THREADS=1): the same float kernels, the same bits
    try:
        differences = [
            difference_to_analysis(
                entries[0], AutoModelForCausalLM.from_pretrained(model_dir), load_pairs(), [1, 2, 3], 6
            ),
            difference_to_analysis(entries[2], final, load_pairs(), [1, 2, 3], 6),
        ]
    finally:
        torch.set_num_threads(threads)
    assert max(differences) <= TOLERANCE, differences


class _StopAtStep3(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("another callback failed")


def test_a_training_stopped_by_an_exception_leaves_nothing_on_the_model(tmp_path):
    model = pairs_model()
    trainer = SFTTrainer(
        model=model, args=sft_config(tmp_path), train_dataset=load_pairs(), processing_class=pairs_tokenizer()
    )
    first_forward(model)
    before = hooks(model)
    trainer.add_callback(RoutingDivergenceCallback(trainer, load_pairs(), steps=1, plot=False))
    trainer.add_callback(_StopAtStep3())
    with pytest.raises(RuntimeError, match="another callback failed"):
        trainer.train()
    assert not is_patched(model)
    assert hooks(model) == before


def test_a_figure_that_cannot_be_written_does_not_cost_the_training(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr("hf_sara.tools.monitor.logger.warning", warnings.append)
    (tmp_path / FIGURE_FILE_NAME).mkdir()  # a folder where the figure goes
    trainer = SFTTrainer(
        model=pairs_model(),
        args=sft_config(tmp_path, max_steps=1),
        train_dataset=load_pairs(),
        processing_class=pairs_tokenizer(),
    )
    callback = RoutingDivergenceCallback(trainer, load_pairs())
    trainer.add_callback(callback)
    trainer.train()  # raised IsADirectoryError after the last step
    assert sorted(callback.reports) == [0, 1]
    assert [w for w in warnings if "could not write" in w and FIGURE_FILE_NAME in w]
    trainer.save_model(tmp_path / "model")
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_bad_pairs_are_refused_naming_the_dataset_row(tmp_path):
    trainer = Trainer(
        model=pairs_model(),
        args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
        processing_class=pairs_tokenizer(),
    )
    vocab_size = trainer.model.get_input_embeddings().num_embeddings
    rows = [{"input_ids": [5, 6, 7], "anchor_input_ids": [8, 9]} for _ in range(24)]
    empty = [dict(row) for row in rows]
    empty[20]["input_ids"] = []
    with pytest.raises(ValueError, match=r"Row\(s\) \[20\] of the pairs have an empty example"):
        RoutingDivergenceCallback(trainer, Dataset.from_list(empty), plot=False)
    beyond = [dict(row) for row in rows]
    beyond[3]["anchor_input_ids"] = [8, vocab_size]
    with pytest.raises(ValueError, match=r"Row\(s\) \[3\] of the pairs have anchor token ids outside the model's"):
        RoutingDivergenceCallback(trainer, Dataset.from_list(beyond), plot=False)
    with pytest.raises(ValueError, match=r"Row\(s\) \[3\] of the pairs have anchor token ids outside"):  # the same
        analyze_routing(patch_model(pairs_model()), pairs_tokenizer(), Dataset.from_list(beyond))
    with pytest.raises(ValueError, match=r"DatasetDict .*pass one split"):
        RoutingDivergenceCallback(trainer, DatasetDict({"train": load_pairs()}), plot=False)
