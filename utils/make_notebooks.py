"""Writes the example notebooks (examples/notebooks/*.ipynb) from the cells below.

    python utils/make_notebooks.py && ruff format examples/notebooks

The notebooks run on Colab as they are; with `HF_SARA_TINY=1` they use a tiny local MoE and run offline in seconds,
which is how the tests execute them.
"""

from pathlib import Path

import nbformat

OUTPUT = Path(__file__).resolve().parent.parent / "examples" / "notebooks"

INSTALL = """\
# On Colab: install hf_sara (with matplotlib for the figures, lm-evaluation-harness for `eval`). Set HF_SARA_SOURCE
# to a path or git URL of the repository if you install from source.
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("hf_sara") is None:
    source = os.environ.get("HF_SARA_SOURCE", "hf_sara[analysis,eval]")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", source])"""

SETUP = """\
import os
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sara import SARAConfig, SARATrainer, find_routers, patch_model, router_weight_names
from hf_sara.testing import load_demo_pairs, save_tiny_model
from hf_sara.tools.analysis import analyze_routing, divergence_table
from hf_sara.tools.pairs import split_by_item
from hf_sara.tools.reporting import markdown_table

TINY = os.environ.get("HF_SARA_TINY") == "1"  # the tests' offline switch: a tiny untrained MoE
MODEL = save_tiny_model(tempfile.mkdtemp()) if TINY else "ibm-granite/granite-3.1-1b-a400m-instruct"
MAX_STEPS = 3 if TINY else 300
OUTPUT_DIR = tempfile.mkdtemp() if TINY else "granite-sara"
use_gpu = torch.cuda.is_available()
print(MODEL, "on", "GPU" if use_gpu else "CPU")"""

LOAD = """\
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float16 if use_gpu else torch.float32)
tokenizer = AutoTokenizer.from_pretrained(MODEL)
tokenizer.padding_side = "right"
model = patch_model(model.to("cuda" if use_gpu else "cpu"))
print(len(find_routers(model)), "MoE layers; router weights:", router_weight_names(model))"""

DATA = """\
# A paired dataset: each low-resource example with its English anchor. Here, hf_sara's embedded demo pairs
# (Swahili, Hindi, Bengali, Spanish); use your own in the same format.
pairs = load_demo_pairs()
train_pairs, test_pairs = split_by_item(pairs)
print(train_pairs)
print(train_pairs[0])"""

BEFORE = """\
before = analyze_routing(model, tokenizer, test_pairs)
print(markdown_table(divergence_table({"before": before})))"""

TRAIN = """\
from peft import LoraConfig

peft_config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                         target_parameters=router_weight_names(model))
args = SARAConfig(output_dir=OUTPUT_DIR, max_steps=MAX_STEPS, learning_rate=2e-4, per_device_train_batch_size=8,
                  logging_steps=1, report_to="none", fp16=use_gpu, bf16=False, max_length=256)
trainer = SARATrainer(model=model, args=args, train_dataset=train_pairs, processing_class=tokenizer,
                      peft_config=peft_config)"""

MONITOR = """\
from hf_sara import RoutingDivergenceCallback

# Logs routing/js_<language> (and per layer) through the trainer's own logging at the start, every few steps and at
# the end; the same three lines work with TRL's plain SFTTrainer or DPOTrainer.
trainer.add_callback(RoutingDivergenceCallback(trainer, test_pairs, steps=max(1, MAX_STEPS // 2)))
trainer.train()
print([{k: round(v, 4) for k, v in entry.items() if k.startswith("routing/js_") and "layer" not in k}
       for entry in trainer.state.log_history if any(k.startswith("routing/") for k in entry)])"""

AFTER = """\
after = analyze_routing(trainer.model, tokenizer, test_pairs)
print(markdown_table(divergence_table({"before": before, "after SARA": after})))"""

QUICKSTART = [
    (
        "markdown",
        "# hf_sara quick start\n\nSARA fine-tuning of a small MoE (IBM Granite 3.1 1B-A400M) on "
        "low-resource-language pairs, on a free Colab T4: see how far each language's expert routing is from its "
        "English anchors, train with the three-line change to an SFT script, and measure again.",
    ),
    ("code", INSTALL),
    ("code", SETUP),
    ("code", LOAD),
    ("code", DATA),
    ("markdown", "## Routing divergence before training"),
    ("code", BEFORE),
    ("markdown", "## SARA fine-tuning with LoRA on attention and routers"),
    ("code", TRAIN + "\ntrainer.train()"),
    ("markdown", "## Routing divergence after training"),
    ("code", AFTER),
]

SAVE_ANALYZE_PUSH = [
    (
        "code",
        """\
trainer.save_model()  # the adapter (safetensors) and a model card with the SARA settings
print(open(os.path.join(OUTPUT_DIR, "README.md")).read()[-600:])""",
    ),
    (
        "code",
        """\
from IPython.display import Image, display
from peft import PeftModel

from hf_sara.tools.analysis import write_report

base = patch_model(AutoModelForCausalLM.from_pretrained(MODEL).to(trainer.model.device))
adapted = patch_model(PeftModel.from_pretrained(base, OUTPUT_DIR))
with adapted.disable_adapter():  # the base model, without the adapter
    reports = {"base": analyze_routing(adapted, tokenizer, test_pairs)}
reports["adapter"] = analyze_routing(adapted, tokenizer, test_pairs)
paths = write_report(reports, os.path.join(OUTPUT_DIR, "analysis"))
print(open(paths["markdown"]).read())
display(Image(paths["layers"]))""",
    ),
    (
        "markdown",
        "## Accuracy per language\n\n`hf-sara eval` runs lm-evaluation-harness on the base model and then with the "
        "adapter: Global-MMLU Lite and BELEBELE in Swahili here, a table and a bar chart. (The offline test run uses "
        "the small sample files shipped with hf_sara instead.) Drop `--limit` for the full test sets.",
    ),
    (
        "code",
        """\
from hf_sara.cli import main as hf_sara

EVAL_DIR = os.path.join(OUTPUT_DIR, "eval")
tasks = [] if TINY else ["--tasks", "mmlu_sw=global_mmlu_sw", "belebele_sw=belebele_swh_Latn", "--limit", "100"]
assert hf_sara(["eval", "--model", MODEL, "--adapter", OUTPUT_DIR, "--output-dir", EVAL_DIR, *tasks]) == 0
display(Image(os.path.join(EVAL_DIR, "accuracy.png")))""",
    ),
    (
        "markdown",
        "## Merge for serving\n\n`hf-sara merge` folds the adapter (LoRA on attention and routers) into the base "
        "model and saves a plain model folder that loads without PEFT, e.g. for vLLM or TGI.",
    ),
    (
        "code",
        """\
MERGED_DIR = os.path.join(OUTPUT_DIR, "merged")
assert hf_sara(["merge", "--model", MODEL, "--adapter", OUTPUT_DIR, "--output-dir", MERGED_DIR, "--overwrite"]) == 0
merged = AutoModelForCausalLM.from_pretrained(MERGED_DIR).to(trainer.model.device)
prompt = tokenizer(test_pairs[0]["prompt"], return_tensors="pt").to(merged.device)
print(tokenizer.decode(merged.generate(**prompt, max_new_tokens=20)[0], skip_special_tokens=True))""",
    ),
    (
        "markdown",
        "## Push the adapter to the Hub\n\nLog in first (`from huggingface_hub import notebook_login; "
        "notebook_login()`) and choose a repository name.",
    ),
    (
        "code",
        """\
HUB_REPO = "your-username/granite-1b-a400m-sara"  # change me
if TINY:
    print("Offline test run: not pushing", OUTPUT_DIR)
else:
    trainer.args.hub_model_id = HUB_REPO
    trainer.push_to_hub()  # Trainer's own path: adapter, tokenizer, and the model card tagged `sara`""",
    ),
]

TRAIN_ANALYZE_PUSH = [
    (
        "markdown",
        "# Train, analyze, merge, push\n\nSARA fine-tuning with LoRA and the routing divergence logged during "
        "training, a before/after routing analysis of the saved adapter with figures, accuracy per language with "
        "lm-evaluation-harness, the adapter merged into a plain model for serving, and the adapter pushed to the "
        "Hub with a model card that records the SARA settings.",
    ),
    ("code", INSTALL),
    ("code", SETUP),
    ("code", LOAD),
    ("code", DATA),
    ("code", BEFORE),
    ("markdown", "## SARA fine-tuning, with the routing divergence logged as it trains"),
    ("code", TRAIN),
    ("code", MONITOR),
    *SAVE_ANALYZE_PUSH,
]


def write(cells, name: str) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["accelerator"] = "GPU"
    notebook.metadata["colab"] = {"provenance": [], "gpuType": "T4"}
    for kind, source in cells:
        cell = nbformat.v4.new_code_cell(source) if kind == "code" else nbformat.v4.new_markdown_cell(source)
        notebook.cells.append(cell)
    OUTPUT.mkdir(parents=True, exist_ok=True)
    nbformat.write(notebook, OUTPUT / name)
    print("wrote", OUTPUT / name)


if __name__ == "__main__":
    write(QUICKSTART, "quickstart.ipynb")
    write(TRAIN_ANALYZE_PUSH, "train_analyze_push.ipynb")
