"""`hf-sara replicate` in tiny mode, offline: three arms, evaluation, table, figures, and resuming."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig, SFTConfig, SFTTrainer

from hf_sara.cli import main
from hf_sara.files.checkpoints import complete_checkpoint
from hf_sara.testing import load_demo_pairs
from hf_sara.tools.pairs import split_by_item
from hf_sara.tools.replication import ARMS, PAPER_RESULTS, parse_benchmarks, published_benchmarks

pytest.importorskip("lm_eval")


def _mtimes(root, arm):
    folder = root / arm / "model"
    return {name: os.stat(folder / name).st_mtime_ns for name in os.listdir(folder)}


@pytest.fixture(scope="module")
def replication(tmp_path_factory):
    """An interrupted tiny replication (the SFT arm trained only); its root, command and the SFT arm's files."""
    root = tmp_path_factory.mktemp("replication")
    # The tiny default benchmark: the shipped Swahili and English sample questions, one harness run per model.
    command = ["replicate", "--tiny", "--output_dir", str(root)]
    assert main([*command, "--stage", "train", "--arms", "full_ft"]) == 0
    assert (root / "full_ft" / "arm_complete.json").is_file() and not (root / "sara").exists()
    sft_files = _mtimes(root, "full_ft")
    return root, command, sft_files


def test_tiny_replication_trains_evaluates_reports_and_resumes(replication, capsys):
    root, command, sft_files = replication
    # The whole run: the finished arm is kept, the others are trained, everything is evaluated and reported.
    capsys.readouterr()
    assert main(command) == 0
    output = capsys.readouterr().out
    assert "full_ft: trained already" in output
    assert _mtimes(root, "full_ft") == sft_files
    for arm in ARMS:
        record = json.loads((root / arm / "arm_complete.json").read_text())
        assert record["settings"] == ARMS[arm] and record["steps"] == 4
    table = (root / "replication.md").read_text()
    assert "| global_mmlu | en,sw |" in table
    assert f"{PAPER_RESULTS['global_mmlu']['sara']:.2f}" in table
    for name in ("layer_divergence.png", "expert_usage_base.png", "expert_usage_sara_all_layers.png"):
        assert (root / "analysis" / name).is_file()
    # The table's numbers are the evaluated accuracies, averaged over the languages, in percent.
    last_row = table.strip().splitlines()[-1]
    for arm in ("base", *ARMS):
        scores = json.loads((root / "eval" / arm / "global_mmlu" / "scores.json").read_text())["scores"]
        assert scores.keys() == {"en", "sw"}
        assert f"{100 * (scores['en'] + scores['sw']) / 2:.2f}" in last_row

    # Nothing finished is redone.
    scores_time = os.stat(root / "eval" / "sara" / "global_mmlu" / "scores.json").st_mtime_ns
    figure_time = os.stat(root / "analysis" / "layer_divergence.png").st_mtime_ns
    models = {arm: _mtimes(root, arm) for arm in ARMS}
    assert main(command) == 0
    assert {arm: _mtimes(root, arm) for arm in ARMS} == models
    assert os.stat(root / "eval" / "sara" / "global_mmlu" / "scores.json").st_mtime_ns == scores_time
    assert os.stat(root / "analysis" / "layer_divergence.png").st_mtime_ns == figure_time
    assert (root / "replication.md").read_text() == table

    # Scores kept under other settings are not reused: only that one evaluation runs again.
    kept_path = root / "eval" / "base" / "global_mmlu" / "scores.json"
    kept = json.loads(kept_path.read_text())
    kept["depends_on"]["settings"]["limit"] = 2
    kept_path.write_text(json.dumps(kept))
    other_time = os.stat(root / "eval" / "sara" / "global_mmlu" / "scores.json").st_mtime_ns
    assert main(command) == 0
    assert "base: evaluating global_mmlu" in capsys.readouterr().out
    assert json.loads(kept_path.read_text())["depends_on"]["settings"]["limit"] is None
    assert os.stat(root / "eval" / "sara" / "global_mmlu" / "scores.json").st_mtime_ns == other_time


def test_arms_trained_from_other_settings_or_another_base_are_not_reused(replication, tmp_path, capsys):
    """Were: "trained already, skipped", and a table mixing the new base's scores with arms of the old one."""
    root, command, sft_files = replication
    assert json.loads((root / "full_ft" / "arm_settings.json").read_text())["training"]["learning_rate"] == 2e-5
    capsys.readouterr()
    assert main([*command, "--stage", "train", "--arms", "full_ft", "--learning_rate", "0.5"]) == 2
    error = capsys.readouterr().err
    assert "The arm full_ft in" in error and "learning_rate: 2e-05 there, 0.5 now" in error
    assert _mtimes(root, "full_ft") == sft_files  # kept as it was

    from hf_sara import SARAConfig
    from hf_sara.tools.evaluation.run import EvalSettings
    from hf_sara.tools.loading import model_init_kwargs
    from hf_sara.tools.replication import Replication, tiny_setup

    model_dir, train, _, args, _ = tiny_setup(str(root), SARAConfig(output_dir=str(root)))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model_kwargs = model_init_kwargs(ModelConfig(), args)  # as the command line's defaults give them
    for model_name in (str(root / "tiny-model"), str(tmp_path / "another-base")):
        replication_run = Replication(
            str(root), model_name, train, tokenizer, args, {}, EvalSettings(), model_kwargs=model_kwargs
        )
        if model_name.endswith("tiny-model"):
            replication_run.check_trained_arms()  # the same base and settings: reused
        else:
            with pytest.raises(ValueError, match="trained from other settings .*model: '.*tiny-model' there"):
                replication_run.check_trained_arms()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--harness_num_fewshot", "-1"], "argument --harness_num_fewshot: must be 0 or more"),  # was: run, -1 shots
        (["--harness_batch_size", "0"], "argument --harness_batch_size: must be a positive integer"),  # traceback
        (["--harness_batch_size", "eight"], "argument --harness_batch_size: a positive integer or 'auto'"),
        (["--harness_limit", "0"], "argument --harness_limit: must be a positive number"),  # "did not find any docs"
        (["--harness_limit", "-3"], "argument --harness_limit: must be a positive number"),
        # A missing file was taken for a harness task name ("no task or group '/path/missing.jsonl'").
        (["--benchmarks", "global_mmlu:sw=/path/missing.jsonl"], "evaluation file /path/missing.jsonl not found"),
        (["--harness_num_fewshot", "20"], "has 8 questions, too few for 20 few-shot examples"),  # was: after training
    ],
)
def test_bad_evaluation_options_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    root = tmp_path / "replication"
    assert main(["replicate", "--tiny", "--output_dir", str(root), *flags]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not root.exists()  # no tiny-model/ left behind


def test_a_dataset_without_test_split_says_there_is_no_analysis(tmp_path, capsys, monkeypatch):
    from hf_sara.testing import save_tiny_model

    model = save_tiny_model(str(tmp_path / "model"))
    data = tmp_path / "pairs.jsonl"
    load_demo_pairs().select(range(16)).to_json(str(data))

    def stop(self, arms, with_evaluation):
        raise RuntimeError("stopped before running")

    monkeypatch.setattr("hf_sara.tools.replication.Replication.run", stop)
    arguments = ["--model_name_or_path", model, "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(RuntimeError, match="stopped before running"):
        main(["replicate", *arguments, "--benchmarks", "global_mmlu:sw=global_mmlu_full_sw", "--use_cpu", "true"])
    assert "No routing analysis: the dataset has no split 'test'" in capsys.readouterr().out


def test_an_interrupted_arm_resumes_from_its_last_complete_checkpoint(tmp_path):
    for step, complete in ((2, True), (4, False)):  # checkpoint-4 was cut short while saving
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert complete_checkpoint(True, str(tmp_path), max_steps=8, required=False) == str(tmp_path / "checkpoint-2")
    assert complete_checkpoint(True, str(tmp_path / "empty"), required=False) is None


def test_the_sft_arm_is_plain_sft_trainer_on_the_examples(replication, tmp_path):
    root = replication[0]
    train, _ = split_by_item(load_demo_pairs())
    examples = train.remove_columns(["anchor_prompt", "anchor_completion"])
    base = root / "tiny-model"
    settings = dict(max_steps=4, per_device_train_batch_size=8, bf16=False, max_length=64)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(base),
        args=SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], gradient_checkpointing=False, **settings),
        train_dataset=examples,
        processing_class=AutoTokenizer.from_pretrained(base),
    )
    trainer.train()
    replicated = AutoModelForCausalLM.from_pretrained(root / "full_ft" / "model").state_dict()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(replicated[name], value, rtol=0, atol=1e-6, msg=name)


def test_benchmark_specifications():
    assert parse_benchmarks(["mgsm:sw=mgsm_direct_sw", "mgsm:te=mgsm_direct_te"]) == {
        "mgsm": ["sw=mgsm_direct_sw", "te=mgsm_direct_te"]
    }
    with pytest.raises(ValueError, match="BENCHMARK:LANG=TASK"):
        parse_benchmarks(["global_mmlu_full_sw"])
    published = published_benchmarks()
    assert published["belebele"][0] == "hi=belebele_hin_Deva" and len(published["global_mmlu"]) == 5
    assert [spec.split("=")[0] for spec in published["mgsm"]] == ["bn", "te", "sw"]  # MGSM has no hi, ne


def test_peft_and_unknown_arms_are_refused(tmp_path, capsys):
    assert main(["replicate", "--tiny", "--output_dir", str(tmp_path), "--use_peft", "true"]) == 2
    assert "full fine-tuning" in capsys.readouterr().err
    assert main(["replicate", "--tiny", "--output_dir", str(tmp_path), "--arms", "lora"]) == 2
    assert "unknown arm(s) ['lora']" in capsys.readouterr().err


def test_one_arm_per_launch_on_two_processes(tmp_path):
    from .test_distributed import launch

    root = tmp_path / "replication"
    command = ["-m", "hf_sara.cli", "replicate", "--tiny", "--output_dir", str(root), "--use_cpu", "true"]
    launch("ddp", *command, "--stage", "train", "--arms", "sara")
    record = json.loads((root / "sara" / "arm_complete.json").read_text())
    assert record["steps"] == 4 and (root / "sara" / "model" / "model.safetensors").is_file()
    # The evaluation runs in one process: asking for it under `accelerate launch` is refused, with the way to do it.
    refused = launch("ddp", *command, check=False)
    assert refused.returncode != 0 and "one arm per launch" in refused.stdout + refused.stderr


def test_analysis_pairs_without_plain_text_are_refused_before_training(tmp_path):
    from datasets import Dataset

    from hf_sara import SARAConfig
    from hf_sara.tools.evaluation.run import EvalSettings
    from hf_sara.tools.replication import Replication

    train, _ = split_by_item(load_demo_pairs())
    chat = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": "x"}]], "anchor_messages": [[{"role": "user", "content": "y"}]]}
    )
    with pytest.raises(ValueError, match="plain-text pairs"):
        Replication(
            str(tmp_path), "unused", train, None, SARAConfig(output_dir=str(tmp_path)), published_benchmarks(),
            EvalSettings(), analysis_pairs=chat,
        )  # fmt: skip
    assert not os.listdir(tmp_path)  # nothing trained or written
