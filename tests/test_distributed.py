"""A two-process DDP run on CPU (gloo), launched with `accelerate launch` as a user would."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "ddp_train.py")


@pytest.mark.parametrize("anchor_mode", ["offline", "online"])
def test_ddp_trains_and_logs_the_same_js_on_both_ranks(tmp_path, anchor_mode):
    # `--multi_gpu` selects accelerate's torchrun launcher; the script's `use_cpu=True` makes each process train on
    # the CPU with the gloo backend (`--cpu` alone would start a single process, multi-CPU needing mpirun).
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT, str(tmp_path), anchor_mode,
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert len(ranks[0]["logged"]) == 2
    assert ranks[0]["logged"] == ranks[1]["logged"]  # metrics are gathered across ranks
    assert all(entry["sara/js"] > 0 for entry in ranks[0]["logged"])
    assert ranks[0]["checksum"] == pytest.approx(ranks[1]["checksum"], abs=1e-6)  # DDP kept the replicas in sync
