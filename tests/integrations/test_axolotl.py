"""
The Axolotl plugin (`hf_sara.integrations.axolotl`), in Axolotl's own environment (`make test-axolotl`): `axolotl
train` end to end on a tiny MoE, offline, the anchors' tokens against Axolotl's chat_template strategy, and the
`sara_*` keys at config validation. Skipped where Axolotl is not installed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("axolotl")

from axolotl.prompt_strategies import load as load_strategy  # noqa: E402
from axolotl.utils.config import validate_config  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402
from safetensors import safe_open  # noqa: E402

from hf_sara.integrations.axolotl import SARAPlugin  # noqa: E402
from hf_sara.integrations.axolotl.args import SARAInputArgs  # noqa: E402
from hf_sara.testing import load_demo_pairs, pair_texts, tiny_qwen3_moe, train_tokenizer  # noqa: E402
from hf_sara.training.arguments import SARAArguments  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[2]
EXAMPLE = REPOSITORY / "examples" / "axolotl" / "qwen3_30b_a3b_sara.yaml"
PLUGIN = "hf_sara.integrations.axolotl.SARAPlugin"
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NUM_ROWS = 48
ANCHORLESS_EVERY = 8  # rows 0, 8, 16, ... have no anchor


def _messages(prompt: str, completion: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE and its tokenizer (with a chat template), and paired conversations with their languages."""
    root = tmp_path_factory.mktemp("axolotl")
    pairs = load_demo_pairs()
    tokenizer = train_tokenizer(pair_texts(pairs) + ["<|user|>", "<|assistant|>"], chat_template=TEMPLATE)
    model = tiny_qwen3_moe(tokenizer)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as file:
        for index, row in enumerate(pairs.select(range(NUM_ROWS))):
            anchored = index % ANCHORLESS_EVERY != 0
            record = {
                "messages": _messages(row["prompt"], row["completion"]),
                "anchor_messages": _messages(row["anchor_prompt"], row["anchor_completion"]) if anchored else None,
                "language": row["language"],
            }
            file.write(json.dumps(record, ensure_ascii=False) + "\n")
    return root


def _config(workspace: Path, name: str, **overrides) -> dict:
    return {
        "base_model": str(workspace / "model"),
        "plugins": [PLUGIN],
        "sara_weight": 0.7,
        "sara_layers": "1-2",
        "datasets": [
            {"path": str(workspace / "pairs.jsonl"), "ds_type": "json", "type": "chat_template"},
        ],
        "chat_template": "tokenizer_default",
        "dataset_prepared_path": str(workspace / name / "prepared"),
        "output_dir": str(workspace / name / "out"),
        "val_set_size": 0.125,
        "sequence_len": 128,
        "micro_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "max_steps": 4,
        "num_epochs": 1,
        "learning_rate": 0.001,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 2,
        "eval_steps": 4,
        "save_steps": 4,
        "bf16": False,
        "fp16": False,
        "tf32": False,
        "gradient_checkpointing": False,
        **overrides,
    }


def _axolotl_train(workspace: Path, name: str, **overrides) -> tuple[Path, list[dict]]:
    """Runs `axolotl train` (its CLI's module, without `accelerate launch`) on the YAML; returns the output folder and
    the logs of its last checkpoint."""
    (workspace / name).mkdir()
    path = workspace / name / "config.yaml"
    path.write_text(yaml.safe_dump(_config(workspace, name, **overrides)))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "AXOLOTL_DO_NOT_TRACK": "1",
        "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")]),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.train", str(path)], env=env, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-6000:]
    output = workspace / name / "out"
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    return output, state["log_history"]


def _check_sara_run(output: Path, logs: list[dict], evaluated: bool = True) -> None:
    train_logs = [entry for entry in logs if "loss" in entry]
    assert len(train_logs) == 2 and all("sara/js" in entry and entry["sara/weight"] == 0.7 for entry in train_logs)
    assert any(key.startswith("sara/js_") and key[len("sara/js_") :] in ("sw", "hi", "bn") for key in train_logs[0])
    if evaluated:
        assert any("eval_sara/js" in entry and "eval_loss" in entry for entry in logs)
    card = (output / "README.md").read_text()
    assert "## SARA settings" in card and "| sara_layers | `1-2`: MoE layers [1, 2] of 4 |" in card


def test_full_fine_tuning_end_to_end(workspace):
    output, logs = _axolotl_train(workspace, "full")
    _check_sara_run(output, logs)
    with safe_open(output / "sara_anchors.safetensors", "pt") as anchors:
        flags = {name: anchors.get_tensor(name) for name in anchors.keys() if name.endswith(".has_anchor")}
    # Every anchored row of Axolotl's train and eval splits has its routing in the file, computed once.
    assert set(flags) == {"train.has_anchor", "eval.has_anchor"}
    assert sum(int(flag.sum()) for flag in flags.values()) == NUM_ROWS - NUM_ROWS // ANCHORLESS_EVERY
    assert (output / "model.safetensors").is_file()


def test_lora_with_sample_packing_end_to_end(workspace):
    lora = dict(adapter="lora", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    # Packed evaluation (Axolotl's default under `sample_packing`) logged no `eval_loss` here even without the plugin.
    output, logs = _axolotl_train(workspace, "lora_packed", sample_packing=True, eval_sample_packing=False, **lora)
    _check_sara_run(output, logs)
    assert (output / "sara_anchors.safetensors").is_file() and (output / "adapter_model.safetensors").is_file()


def test_online_anchors_and_anchor_sft_with_sample_packing_end_to_end(workspace):
    output, logs = _axolotl_train(
        workspace,
        "online_packed",
        sample_packing=True,
        sara_anchor_mode="online",
        anchor_sft_weight=0.5,
        sara_pooling="completion",  # the pooled-token check reads the rows through the row collator
        val_set_size=0.0,
        eval_steps=None,
    )
    _check_sara_run(output, logs, evaluated=False)
    assert all("sara/anchor_sft_loss" in entry for entry in logs if "loss" in entry)
    assert not (output / "sara_anchors.safetensors").exists()
    assert "| sara_pooling | completion |" in (output / "README.md").read_text()


def _strategy_config(workspace: Path) -> tuple[DictDefault, DictDefault]:
    cfg = DictDefault(
        {"chat_template": "tokenizer_default", "sequence_len": 128, "train_on_inputs": False, "datasets": []}
    )
    return cfg, DictDefault({"path": str(workspace / "pairs.jsonl"), "type": "chat_template"})


def test_anchors_are_tokenized_by_axolotl_s_chat_template_strategy(workspace):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    cfg, ds_cfg = _strategy_config(workspace)
    plain = load_strategy("chat_template", tokenizer, cfg, ds_cfg)
    paired = load_strategy("hf_sara.integrations.axolotl.chat_template", tokenizer, cfg, copy.deepcopy(ds_cfg))
    rows = [json.loads(line) for line in (workspace / "pairs.jsonl").read_text().splitlines()[:9]]
    for index, row in enumerate(rows):
        tokenized = paired.tokenize_prompt(dict(row))
        example = plain.tokenize_prompt({"messages": row["messages"]})
        assert tokenized["input_ids"] == example["input_ids"] and tokenized["labels"] == example["labels"]
        assert tokenized["language"] == row["language"]
        if row["anchor_messages"] is None:
            assert tokenized["anchor_input_ids"] == tokenized["anchor_labels"] == []
            continue
        anchor = plain.tokenize_prompt({"messages": row["anchor_messages"]})
        assert tokenized["anchor_input_ids"] == anchor["input_ids"], index
        assert tokenized["anchor_labels"] == anchor["labels"], index
        assert tokenized["anchor_attention_mask"] == anchor["attention_mask"], index
        assert any(label == -100 for label in tokenized["anchor_labels"])  # the template's masking applies too
        assert tokenized["anchor_input_ids"] != tokenized["input_ids"]


def _validated(config: dict) -> DictDefault:
    """Axolotl's own config validation, after the plugins registered (what `axolotl train` does before training)."""
    from axolotl.cli.config import prepare_plugins

    cfg = DictDefault(copy.deepcopy(config))
    prepare_plugins(cfg)
    return validate_config(cfg)


def test_sara_keys_pass_config_validation_and_reach_the_training_arguments(workspace):
    cfg = _validated(_config(workspace, "valid", sara_anchor_mode="online", sara_pooling="completion"))
    assert cfg.datasets[0]["type"] == "hf_sara.integrations.axolotl.chat_template"
    arguments = SARAPlugin().get_training_args(cfg)
    expected = {"sara_weight": 0.7, "sara_layers": "1-2", "sara_anchor_mode": "online", "sara_pooling": "completion"}
    assert arguments == expected


@pytest.mark.parametrize(
    "key, value",
    [("sara_weight", -1.0), ("sara_anchor_mode", "nearline"), ("sara_warmup_ratio", 2.0), ("sara_pooling", "some")],
)
def test_a_bad_sara_value_is_refused_at_config_validation(workspace, key, value):
    with pytest.raises(ValueError, match=f"`{key}`"):
        _validated(_config(workspace, "invalid", **{key: value}))


def test_datasets_of_another_type_are_refused():
    with pytest.raises(ValueError, match="type: alpaca"):
        SARAPlugin().register({"datasets": [{"path": "data.jsonl", "type": "alpaca"}]})


def test_the_yaml_keys_are_the_library_s_settings():
    assert set(SARAInputArgs.model_fields) == {field.name for field in dataclasses.fields(SARAArguments)}


def test_the_example_recipe_passes_axolotl_s_validation():
    config = yaml.safe_load(EXAMPLE.read_text())
    assert config["plugins"] == [PLUGIN]
    cfg = _validated(config)
    assert cfg.sara_weight == 1.5 and cfg.sara_layers == "7-34"
    assert cfg.datasets[0]["type"] == "hf_sara.integrations.axolotl.chat_template"


def test_the_trainer_refuses_arguments_without_sara_and_packing_without_a_row_collator(tmp_path):
    from types import SimpleNamespace

    from transformers import TrainingArguments

    from hf_sara.integrations.axolotl.trainer import AxolotlSARATrainer

    trainer = object.__new__(AxolotlSARATrainer)  # the checks alone, before any model or dataset
    with pytest.raises(ValueError, match="list `hf_sara.integrations.axolotl.SARAPlugin` under `plugins:`"):
        trainer._sara_arguments(None, TrainingArguments(str(tmp_path)))
    trainer.args, trainer._sara_axolotl_row_collator = SimpleNamespace(sample_packing=True), None
    with pytest.raises(ValueError, match="collator of plain rows"):
        trainer._sara_row_collator()
    trainer.args.sample_packing = False
    assert trainer._sara_row_collator() is None


def test_anchors_under_packing_are_collated_as_rows_with_the_multipack_collator_s_settings(workspace):
    from axolotl.utils.collators import V2BatchSamplerDataCollatorForSeq2Seq
    from transformers import AutoTokenizer

    from hf_sara.integrations.axolotl.trainer import _row_collator

    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    packing = V2BatchSamplerDataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8)
    rows = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1], "position_ids": [0, 1, 2]},
        {"input_ids": [8], "labels": [8], "attention_mask": [1], "position_ids": [0]},
    ]
    # The multipack collator packs a list of rows into one; the row collator pads them, one per row, alike.
    assert packing(copy.deepcopy(rows))["input_ids"].shape == (1, 8)
    batch = _row_collator(packing, None)(copy.deepcopy(rows))
    assert batch["input_ids"].shape == (2, 8) and batch["position_ids"].shape == (2, 8)
    assert batch["labels"][1].tolist() == [8] + [-100] * 7 and batch["attention_mask"].sum().item() == 4
    assert _row_collator(object(), "fallback") == "fallback"
