"""The example scripts, recipes and notebooks run (in tiny mode) or parse, so they cannot rot."""

import glob
import os
import subprocess
import sys

import nbformat
import pytest
from accelerate.commands.config.config_args import load_config_from_file
from nbclient import NotebookClient

from hf_sara import router_weight_names
from hf_sara.cli.train import trl_parser

from .testing_utils import tiny_model

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
TINY_ENVIRONMENT = {**os.environ, "HF_SARA_TINY": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_sft_script_with_the_three_line_change(tmp_path):
    script = os.path.join(EXAMPLES, "sft_with_sara.py")
    source = open(script, encoding="utf-8").read()
    assert source.count("# SARA:") == 3  # the three changed lines, marked
    completed = subprocess.run(
        [sys.executable, script, "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=TINY_ENVIRONMENT,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (tmp_path / "adapter_model.safetensors").exists()
    assert "## SARA settings" in (tmp_path / "README.md").read_text()


def test_routing_demo_script():
    completed = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "routing_demo.py"), "--steps", "10"],
        capture_output=True,
        text=True,
        env=TINY_ENVIRONMENT,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| aligned mean |" in completed.stdout


@pytest.mark.parametrize("notebook", sorted(glob.glob(os.path.join(EXAMPLES, "notebooks", "*.ipynb"))))
def test_notebook_runs_top_to_bottom(notebook, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_SARA_TINY", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    document = nbformat.read(notebook, as_version=4)
    NotebookClient(
        document, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in document.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [output for output in outputs if output.get("output_type") == "error"]
    text = "".join(output.get("text", "") for output in outputs)
    assert "| language | pairs |" in text
    if notebook.endswith("train_analyze_push.ipynb"):  # the callback logged during training; the merge ran
        assert "routing/js_" in text and "Merged" in text


RECIPES = {
    "qwen3_30b_a3b.yaml": ("qwen3_moe", "7-34", False),
    "qwen3_30b_a3b_lora_zero3.yaml": ("qwen3_moe", "published", True),
    "phi35_moe.yaml": ("phimoe", "published", True),
    "granite_colab.yaml": ("granitemoe", "published", True),
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_parses_with_the_cli_parser(recipe):
    model_type, layers, use_peft = RECIPES[recipe]
    path = os.path.join(EXAMPLES, "recipes", recipe)
    script_args, training_args, model_args = trl_parser("hf-sara train").parse_args_and_config(
        args=["--config", path, "--output_dir", "unused", "--use_cpu", "true", "--bf16", "false", "--fp16", "false"]
    )
    assert training_args.sara_layers == layers and training_args.sara_weight == 1.5
    # The published runs' scaling (the released code summed the term over accumulation steps and processes).
    assert training_args.sara_loss_reduction == ("sum" if recipe == "qwen3_30b_a3b.yaml" else "step_mean")
    assert training_args.sara_anchor_mode == "offline"
    assert training_args.gradient_checkpointing
    if recipe != "qwen3_30b_a3b_lora_zero3.yaml":  # there: TRL's choice under ZeRO-3 + PEFT (reentrant)
        assert training_args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    assert model_args.use_peft == use_peft
    if use_peft:
        # The router weights the recipe puts LoRA on are the ones this family's routers have.
        assert model_args.lora_target_parameters == router_weight_names(tiny_model(model_type))
        assert model_args.lora_dropout == 0.0


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(EXAMPLES, "accelerate", "*.yaml"))))
def test_accelerate_config_loads(config):
    assert load_config_from_file(config).num_processes == 8
