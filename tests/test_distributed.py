"""
Two-process runs on CPU (gloo) under `accelerate launch`, as a user launches them: DDP, DeepSpeed ZeRO-2 and ZeRO-3
(`DS_ACCELERATOR=cpu`), and FSDP2 (accelerate keeps FSDP off on CPU processes; the script opens that one gate and the
sharding runs unmodified). Full fine-tuning of one saved tiny MoE, loaded by path after the training arguments (so
ZeRO-3 partitions it at load), compared with one process over the same micro-batches: 2 ranks x 2 rows against
1 process x 2 rows x 2 accumulation steps, so even the per-micro-batch load-balancing loss is the same.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_sara import SARATrainer, patch_model
from hf_sara.compat import is_older_than
from hf_sara.routing.patching import get_routing_state
from hf_sara.training.anchors import ANCHORS_FILE_NAME

from .testing_utils import PAIRS_FILE, distributed_config, load_pairs, pairs_model, pairs_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "distributed_train.py")
ZERO3_CONFIG = os.path.join(ROOT, "tests", "data", "deepspeed_zero3.json")
ENGINES = {
    # `--multi_gpu` selects accelerate's torchrun launcher; with `use_cpu=True` each process trains on the CPU (gloo).
    "ddp": ["--multi_gpu"],
    "zero2": ["--use_deepspeed", "--zero_stage", "2"],
    # Every parameter partitioned (persistence threshold 0): a tiny model's would otherwise all stay whole, as no
    # large model's do.
    "zero3": ["--use_deepspeed", "--deepspeed_config_file", ZERO3_CONFIG, "--zero3_init_flag", "true"],
    "fsdp2": [
        "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "SHARDED_STATE_DICT",
        "--fsdp_cpu_ram_efficient_loading", "true", "--fsdp_sync_module_states", "true",  # as accelerate/fsdp.yaml
    ],
}  # fmt: skip
DISTRIBUTED_TYPES = {
    "ddp": "MULTI_CPU",
    "zero2": "DEEPSPEED",
    "zero3": "DEEPSPEED",
    "fsdp2": "FSDP",
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(engine: str, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    # A port of its own: two launches on accelerate's default port (another test run, a training job) would share
    # the rendezvous and DeepSpeed's CPU shared-memory segments, which are named after it.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *ENGINES[engine], "--num_processes", "2",
        "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", *arguments,
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900, cwd=ROOT)
    if check:
        assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return completed


def train_on_two_ranks(engine: str, output_dir, model_dir, anchors: str, *extra: str) -> list[dict]:
    launch(engine, SCRIPT, str(output_dir), str(model_dir), anchors, *extra)
    ranks = [json.loads((output_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["distributed_type"].endswith(DISTRIBUTED_TYPES[engine])
    if engine == "fsdp2":
        assert ranks[0]["sharded"] == "DTensor"
    return ranks


def router_weights(model) -> dict[str, torch.Tensor]:
    state = get_routing_state(model)
    return {site.name: model.get_submodule(site.name).weight.detach().clone() for site in state.captured_sites}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    pairs_model().save_pretrained(path)
    pairs_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory):
    """One process, the same micro-batches: offline SARA, online SARA and plain SFT (weight 0) runs."""
    runs = {}
    for name, overrides in {
        "offline": dict(sara_anchor_mode="offline"),
        "online": dict(sara_anchor_mode="online"),
        "sft": dict(sara_anchor_mode="online", sara_weight=0.0),
    }.items():
        output_dir = tmp_path_factory.mktemp(f"one_process_{name}")
        args = distributed_config(
            output_dir, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2, **overrides
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        trainer = SARATrainer(
            model=patch_model(model), args=args, train_dataset=load_pairs(), processing_class=pairs_tokenizer()
        )
        before = router_weights(trainer.model)
        trainer.train()
        logged = [entry for entry in trainer.state.log_history if "sara/js" in entry]
        runs[name] = {
            "logged": logged,
            "before": before,
            "after": router_weights(trainer.model),
            "anchors": output_dir / ANCHORS_FILE_NAME,
        }
    return runs


def assert_matches_one_process(ranks: list[dict], reference: dict, sft: dict) -> None:
    """Both ranks logged the same; it matches one process; the routers moved by the same SARA update."""
    assert ranks[0]["logged"] == ranks[1]["logged"]  # metrics are gathered across ranks
    logged = ranks[0]["logged"]
    assert [entry["sara/js"] for entry in logged] == pytest.approx(
        [entry["sara/js"] for entry in reference["logged"]], rel=1e-2
    )
    assert [entry["loss"] for entry in logged] == pytest.approx(
        [entry["loss"] for entry in reference["logged"]], rel=1e-2
    )
    for name, expected in reference["after"].items():
        moved = torch.tensor(ranks[0]["router_weights"][name])
        assert torch.equal(moved, torch.tensor(ranks[1]["router_weights"][name]))
        sara_update = expected - sft["after"][name]  # what the alignment loss adds to the router's SGD update
        assert sara_update.norm() > 1e-4, "the alignment loss must move the routers for this test to mean anything"
        error = (moved - expected).norm()
        assert error < 1e-2 * sara_update.norm(), f"{name}: off by {error:.2e}, SARA update {sara_update.norm():.2e}"


def assert_same_anchors(path, reference_path) -> None:
    computed, expected = load_file(str(path)), load_file(str(reference_path))
    assert computed.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(computed[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "engine, eval_batch_size",
    # 16 rows in batches of 4 are 2 forwards per rank; in batches of 8, one: ZeRO-3 once failed after an odd count.
    [("zero3", 4), ("zero3", 8), ("fsdp2", 4), ("zero2", 4), ("ddp", 4)],
)
def test_offline_anchors_computed_by_the_trainer(engine, eval_batch_size, model_dir, one_process, tmp_path):
    extra = ["--eval-batch-size", str(eval_batch_size)]
    ranks = train_on_two_ranks(engine, tmp_path, model_dir, "trainer", *extra)
    assert [rank["anchor_rows_computed"] for rank in ranks] == [8, 8]  # 16 rows, 4 batches, 2 per rank
    assert_same_anchors(tmp_path / ANCHORS_FILE_NAME, one_process["offline"]["anchors"])
    assert_matches_one_process(ranks, one_process["offline"], one_process["sft"])


@pytest.mark.parametrize("engine", ["zero3", "fsdp2", "zero2"])
def test_precomputed_offline_anchors_are_accepted(engine, model_dir, one_process, tmp_path):
    # The checksum of the sharded run's routers (gathered) equals that of one process's: the anchors are accepted.
    ranks = train_on_two_ranks(engine, tmp_path, model_dir, str(one_process["offline"]["anchors"]))
    assert [rank["anchor_rows_computed"] for rank in ranks] == [0, 0]
    assert_matches_one_process(ranks, one_process["offline"], one_process["sft"])


@pytest.mark.parametrize("engine", ["zero3", "fsdp2", "zero2", "ddp"])
def test_online_anchors(engine, model_dir, one_process, tmp_path):
    extra = ["--gradient-checkpointing"] if engine == "fsdp2" else []
    ranks = train_on_two_ranks(engine, tmp_path, model_dir, "online", *extra)
    assert_matches_one_process(ranks, one_process["online"], one_process["sft"])


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_resume_on_two_ranks_reproduces_the_uninterrupted_run(engine, model_dir, tmp_path):
    uninterrupted = train_on_two_ranks(engine, tmp_path / "full", model_dir, "trainer", "--max-steps", "3")
    partial = tmp_path / "partial"
    train_on_two_ranks(engine, partial, model_dir, "trainer", "--max-steps", "3", "--save-steps", "1")
    shutil.rmtree(partial / "checkpoint-3")
    shutil.rmtree(partial / "checkpoint-2")
    for rank in (0, 1):
        (partial / f"rank{rank}.json").unlink()
    resumed = train_on_two_ranks(engine, partial, model_dir, "trainer", "--max-steps", "3", "--resume")
    assert [entry["step"] for entry in resumed[0]["logged"]] == [1, 2, 3]  # step 1 from checkpoint-1's history
    assert [entry["sara/js"] for entry in resumed[0]["logged"]] == pytest.approx(
        [entry["sara/js"] for entry in uninterrupted[0]["logged"]], rel=1e-4
    )
    for name, weights in uninterrupted[0]["router_weights"].items():
        torch.testing.assert_close(
            torch.tensor(resumed[0]["router_weights"][name]), torch.tensor(weights), rtol=0, atol=1e-6, msg=name
        )


def test_anchors_of_other_router_weights_are_refused_under_zero3(model_dir, tmp_path):
    # Anchors computed in one process for the model at `path`; then the routers at `path` change (a first training
    # stage, say). Under ZeRO-3 the routers are partitioned placeholders: the checksum must gather them to notice.
    path = tmp_path / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(path)
    args = distributed_config(tmp_path / "anchors", per_device_train_batch_size=2)
    trainer = SARATrainer(
        model=patch_model(AutoModelForCausalLM.from_pretrained(path)),
        args=args,
        train_dataset=load_pairs(),
        processing_class=pairs_tokenizer(),
    )
    anchors = trainer.prepare_offline_anchors().path
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight.mul_(1.01)
    model.save_pretrained(path)
    completed = launch("zero3", SCRIPT, str(tmp_path / "run"), str(path), anchors, check=False)
    assert completed.returncode != 0
    assert "were computed with other router weights" in completed.stderr, completed.stderr[-3000:]


def test_hf_sara_anchors_splits_the_rows_across_ranks(model_dir, one_process, tmp_path):
    completed = launch(
        "zero3", "-m", "hf_sara.cli", "anchors",
        "--model_name_or_path", str(model_dir), "--dataset_name", PAIRS_FILE, "--output_dir", str(tmp_path),
        "--use_cpu", "False", "--ddp_backend", "gloo", "--per_device_eval_batch_size", "4", "--max_length", "64",
        "--report_to", "none",
    )  # fmt: skip
    assert "rows computed per rank: 8, 8" in completed.stdout, completed.stdout[-2000:]
    assert_same_anchors(tmp_path / ANCHORS_FILE_NAME, one_process["offline"]["anchors"])


# LoRA on attention and routers with gradient checkpointing: under ZeRO-3, TRL forces reentrant checkpointing for PEFT
# (the alignment gradient is added where the backward recomputes each router); under FSDP2 it is transformers' default,
# non-reentrant. Compared with one process without checkpointing over the same micro-batches.


@pytest.fixture(scope="module")
def lora_adapter(model_dir, tmp_path_factory):
    """A saved LoRA adapter (attention and routers) whose B matrices are not zero, so every adapter weight trains."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.gate.weight"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    path = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_process_lora(model_dir, lora_adapter, tmp_path_factory):
    """One process without checkpointing, the same micro-batches: offline SARA and plain SFT (weight 0) with LoRA."""
    runs = {}
    for name, weight in {"offline": 1.5, "sft": 0.0}.items():
        output_dir = tmp_path_factory.mktemp(f"one_process_lora_{name}")
        launch_one_process(output_dir, model_dir, "--lora", str(lora_adapter), "--sara-weight", str(weight))
        ranks = json.loads((output_dir / "rank0.json").read_text())
        runs[name] = {"logged": ranks["logged"], "after": ranks["router_weights"]}
    return runs


def launch_one_process(output_dir, model_dir, *extra: str, anchors: str = "trainer") -> None:
    """The script on one process, by default 2 rows x 2 accumulation steps: the micro-batches of 2 ranks x 2 rows."""
    command = [sys.executable, SCRIPT, str(output_dir), str(model_dir), anchors, "--gradient-accumulation-steps", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [*command, *extra], capture_output=True, text=True, env=environment, timeout=900, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]


# PEFT before 0.21.0 reads the shape of a ZeRO-3-partitioned parameter (empty) when it puts LoRA on it
# (`target_parameters`, here the routers): `IndexError: tuple index out of range` in `ParamWrapper`.
ZERO3_PARAMETER_LORA = pytest.mark.skipif(
    is_older_than("peft", "0.21.0"), reason="LoRA on parameters (the routers) under ZeRO-3 needs peft>=0.21.0"
)


@pytest.mark.parametrize(
    "engine, reentrant", [pytest.param("zero3", True, marks=ZERO3_PARAMETER_LORA), ("fsdp2", False)]
)
def test_lora_with_gradient_checkpointing(engine, reentrant, model_dir, lora_adapter, one_process_lora, tmp_path):
    ranks = train_on_two_ranks(
        engine, tmp_path, model_dir, "trainer", "--lora", str(lora_adapter), "--gradient-checkpointing"
    )
    # TRL forces reentrant checkpointing for PEFT under ZeRO-3; transformers' default elsewhere is non-reentrant.
    modes = [(rank["gradient_checkpointing_kwargs"] or {}).get("use_reentrant", False) for rank in ranks]
    assert modes == [reentrant, reentrant]
    assert ranks[0]["logged"] == ranks[1]["logged"]
    reference, sft = one_process_lora["offline"], one_process_lora["sft"]
    assert [entry["sara/js"] for entry in ranks[0]["logged"]] == pytest.approx(
        [entry["sara/js"] for entry in reference["logged"]], rel=1e-2
    )
    for name, expected in reference["after"].items():
        moved, expected = torch.tensor(ranks[0]["router_weights"][name]), torch.tensor(expected)
        assert torch.equal(moved, torch.tensor(ranks[1]["router_weights"][name]))
        sara_update = expected - torch.tensor(sft["after"][name])
        assert sara_update.norm() > 1e-5, f"{name}: the alignment loss must move the adapter for this test to mean it"
        error = (moved - expected).norm()
        assert error < 1e-2 * sara_update.norm(), f"{name}: off by {error:.2e}, SARA update {sara_update.norm():.2e}"
