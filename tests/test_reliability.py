"""Bad input, stale state and faults: each gets one clear error naming the problem and the fix, or the right result."""

import glob
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset

from hf_sara import SARATrainer, patch_model, sara_alignment_loss
from hf_sara.cli import main
from hf_sara.files.atomic import atomic_write
from hf_sara.testing import save_tiny_model
from hf_sara.training.anchors import ANCHORS_FILE_NAME, ANCHORS_FORMAT
from hf_sara.training.anchors.file import AnchorFileWriter

from .test_cli import _assert_one_line_error
from .testing_utils import (
    load_pairs,
    pairs_in_format,
    pairs_model,
    pairs_tokenizer,
    read_anchor_file,
    sara_config,
    write_anchor_file,
)


def _trainer(tmp_path, dataset=None, eval_dataset=None, model=None, **overrides):
    return SARATrainer(
        model=model if model is not None else pairs_model(),
        args=sara_config(tmp_path, **{"max_steps": 1, **overrides}),
        train_dataset=load_pairs() if dataset is None else dataset,
        eval_dataset=eval_dataset,
        processing_class=pairs_tokenizer(),
    )


def _without_anchors(rows: list[dict]) -> list[dict]:
    return [{**row, "anchor_prompt": None, "anchor_completion": None} for row in rows]


class TestSettings:
    @pytest.mark.parametrize("name", ["sara_weight", "anchor_sft_weight", "sara_warmup_ratio"])
    @pytest.mark.parametrize("value", [math.nan, math.inf])
    def test_non_finite_numbers_are_refused(self, tmp_path, name, value):
        with pytest.raises(ValueError, match=f"`{name}` must be a finite number"):
            sara_config(tmp_path, **{name: value})

    def test_a_users_partial_patch_is_refused_not_replaced(self, tmp_path):
        model = patch_model(pairs_model(), layers=[1, 2])
        with pytest.raises(ValueError, match=r"capturing MoE layers \[1, 2\] of 4.*set `sara_layers` \(e.g. '1,2'\)"):
            _trainer(tmp_path, model=model)


class TestAlignmentLossInputs:
    def _inputs(self):
        distributions = torch.softmax(torch.randn(3, 4, 8), dim=-1)
        return distributions, torch.softmax(torch.randn(3, 4, 8), dim=-1)

    def test_negative_anchor_entries_are_refused(self):
        distributions, anchors = self._inputs()
        anchors[1, 2, 3] = -0.2
        with pytest.raises(ValueError, match=r"`anchor_distributions` must hold routing distributions.*negative"):
            sara_alignment_loss(distributions, anchors, layers="all")

    def test_anchors_that_do_not_sum_to_one_are_refused(self):
        distributions, anchors = self._inputs()
        with pytest.raises(ValueError, match=r"row\(s\) \[0, 1, 2\] do not: row 0 has distributions that sum to 3"):
            sara_alignment_loss(distributions, anchors * 3, layers="all")
        with pytest.raises(ValueError, match="negative entry"):
            sara_alignment_loss(distributions, anchors.log(), layers="all")  # log-probabilities
        anchors[0] = math.nan
        with pytest.raises(ValueError, match="non-finite"):
            sara_alignment_loss(distributions, anchors, layers="all")

    def test_rows_without_an_anchor_may_hold_anything(self):
        distributions, anchors = self._inputs()
        anchors[1] = -5.0
        loss, _ = sara_alignment_loss(distributions, anchors, torch.tensor([True, False, True]), layers="all")
        assert torch.isfinite(loss)


class TestDatasets:
    def test_an_empty_dataset_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match="The train dataset is empty"):
            _trainer(tmp_path, dataset=load_pairs().select([]))
        with pytest.raises(ValueError, match="The sw dataset is empty"):
            _trainer(tmp_path, eval_dataset={"sw": load_pairs().select([])})

    def test_no_anchor_with_zero_weight_trains_like_sft(self, tmp_path):
        trainer = _trainer(
            tmp_path, dataset=Dataset.from_list(_without_anchors(load_pairs().to_list())), sara_weight=0
        )
        trainer.train()
        assert "sara/js" not in trainer.state.log_history[0]  # nothing to measure, and no crash

    def test_an_eval_set_without_anchors_evaluates(self, tmp_path):
        evaluation = Dataset.from_list(_without_anchors(load_pairs().to_list()[:4]))
        trainer = _trainer(tmp_path, eval_dataset=evaluation)
        trainer.train()
        assert "eval_loss" in trainer.evaluate()

    def test_eval_dataset_names_with_a_dot(self, tmp_path):
        trainer = _trainer(tmp_path, eval_dataset={"sw.dev": load_pairs().select(range(4))})
        trainer.train()
        metrics = trainer.evaluate()
        # Its SARA metrics under its own prefix, like its loss (they all went to eval_sara/js before).
        assert "eval_sw.dev_loss" in metrics and metrics["eval_sw.dev_sara/js"] > 0


class TestPoolingAndPacking:
    def test_prompt_pooling_without_prompt_tokens_is_refused(self, tmp_path):
        with pytest.raises(ValueError, match=r"sara_pooling='prompt'.*row\(s\) \[0, 1, 2.*no prompt .* token"):
            _trainer(tmp_path, dataset=pairs_in_format("text"), sara_pooling="prompt", sara_anchor_mode="online")

    def test_bfd_split_keeps_every_token_like_sft_trainer(self, tmp_path):
        from trl import SFTTrainer

        from .testing_utils import sft_config

        packing = dict(packing=True, packing_strategy="bfd_split", max_length=40)
        sara = _trainer(tmp_path / "sara", **packing).train_dataset
        sft = SFTTrainer(
            model=pairs_model(),
            args=sft_config(tmp_path / "sft", max_steps=1, **packing),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        ).train_dataset

        def loss_tokens(dataset):
            return sum(sum(label != -100 for label in labels) for labels in dataset["labels"])

        assert sorted(map(len, sara["input_ids"])) == sorted(map(len, sft["input_ids"]))
        assert loss_tokens(sara) == loss_tokens(sft) > 0
        # Each example's tokens, split over packs, keep its row id.
        assert sum(map(len, sara["sara_token_rows"])) == sum(map(len, sara["input_ids"]))

    def test_packed_rows_that_would_vanish_are_refused(self):
        model = patch_model(pairs_model()).eval()
        input_ids = torch.randint(3, 100, (3, 6))
        attention_mask = torch.ones(3, 6, dtype=torch.long)
        attention_mask[1] = 0  # a row of padding only
        position_ids = torch.arange(6).repeat(3, 1)
        from hf_sara import routing_distributions

        with pytest.raises(ValueError, match=r"row\(s\) \[1\] hold only padding, so fewer distributions"):
            routing_distributions(model, input_ids, attention_mask, position_ids=position_ids)
        assert routing_distributions(model, input_ids[[0, 2]], position_ids=position_ids[:2]).shape[0] == 2

    def test_an_empty_sequence_is_refused_before_the_model_runs(self):
        from hf_sara import routing_distributions

        with pytest.raises(ValueError, match="no token to route"):
            routing_distributions(patch_model(pairs_model()), torch.zeros(2, 0, dtype=torch.long))

    def test_generate_inside_a_capture_is_named(self):
        from hf_sara import capture_routing

        model = patch_model(pairs_model()).eval()
        input_ids = torch.randint(3, 100, (1, 5))
        with pytest.raises(RuntimeError, match="`generate\\(\\)` or a `torch.no_grad\\(\\)` block inside"):
            with capture_routing(model, input_ids.shape):
                model.generate(input_ids, max_new_tokens=2, do_sample=False)


class TestOutputDirectory:
    def test_a_second_training_in_the_same_output_dir_is_refused(self, tmp_path):
        from hf_sara.files.lock import LOCK_FILE_NAME, directory_lock

        with directory_lock(tmp_path):
            with pytest.raises(RuntimeError, match=r"Another training is writing to .*choose another"):
                _trainer(tmp_path).train()
        assert not (tmp_path / LOCK_FILE_NAME).exists()
        _trainer(tmp_path).train()  # free again
        assert not (tmp_path / LOCK_FILE_NAME).exists()

    def test_the_lock_of_a_killed_run_is_taken_over(self, tmp_path):
        import socket

        from hf_sara.files.lock import LOCK_FILE_NAME

        (tmp_path / LOCK_FILE_NAME).write_text(f"{socket.gethostname()} {2**22 + 12345}")
        _trainer(tmp_path).train()
        assert not (tmp_path / LOCK_FILE_NAME).exists()


class TestStaleAnchors:
    """The offline anchors file is reused only for the model, tokens and datasets it was computed with."""

    def _computed(self, tmp_path, **overrides):
        trainer = _trainer(tmp_path, **overrides)
        trainer.prepare_offline_anchors()
        return trainer

    def test_another_max_length_is_refused(self, tmp_path):
        tokenizer = pairs_tokenizer()
        short_prompts = load_pairs().filter(lambda row: len(tokenizer(row["prompt"]).input_ids) < 16)
        self._computed(tmp_path, dataset=short_prompts)
        with pytest.raises(ValueError, match="other anchor tokens.*max_length"):
            _trainer(tmp_path, dataset=short_prompts, max_length=20).train()  # cuts the anchors (16-29 tokens)

    def test_another_chat_template_is_refused(self, tmp_path):
        dataset = pairs_in_format("messages")
        _trainer(tmp_path, dataset=dataset).prepare_offline_anchors()
        tokenizer = pairs_tokenizer()
        template = tokenizer.chat_template
        try:
            tokenizer.chat_template = template.replace("<|end|>", "<|end|><|end|>")
            with pytest.raises(ValueError, match="other anchor tokens.*chat template"):
                _trainer(tmp_path, dataset=dataset).train()
        finally:
            tokenizer.chat_template = template

    def test_other_non_router_weights_are_refused(self, tmp_path):
        self._computed(tmp_path)
        model = pairs_model()
        with torch.no_grad():
            model.model.layers[0].post_attention_layernorm.weight.mul_(1.5)  # e.g. after a first training stage
        with pytest.raises(ValueError, match="do not belong to this model: recomputing 4 rows.*Remove the file"):
            _trainer(tmp_path, model=model).train()

    def test_the_same_in_memory_dataset_reuses_the_anchors(self, tmp_path):
        first = self._computed(tmp_path, dataset=Dataset.from_list(load_pairs().to_list()))
        mtime = os.path.getmtime(first.offline_anchors.path)
        second = _trainer(tmp_path, dataset=Dataset.from_list(load_pairs().to_list()))
        second.train()
        assert os.path.getmtime(second.offline_anchors.path) == mtime

    def test_a_new_eval_set_after_training_is_refused_before_training_computed(self, tmp_path):
        trainer = _trainer(tmp_path)
        trainer.train()
        new_eval = load_pairs().select(range(3))
        with pytest.raises(ValueError, match="holds no anchors for the eval dataset.*before `train\\(\\)`"):
            trainer.evaluate(new_eval)
        untrained = _trainer(tmp_path / "untrained")
        untrained.prepare_offline_anchors()
        metrics = untrained.evaluate(new_eval)  # recomputes the file with the eval anchors, model still untrained
        assert metrics["eval_sara/js"] >= 0
        assert sorted(json.loads(untrained.offline_anchors.file.metadata["datasets"])) == ["eval", "train"]


class TestAnchorFiles:
    def test_anchors_that_are_not_distributions_are_refused_where_they_are_read(self, tmp_path):
        _trainer(tmp_path).train()
        path = tmp_path / ANCHORS_FILE_NAME
        tensors, metadata = read_anchor_file(path)
        tensors["train.distributions"][5] *= -1
        write_anchor_file(path, tensors, metadata)
        with pytest.raises(ValueError, match=r"The train anchors in .* row\(s\) \[5\] do not.*negative.*remove it"):
            _trainer(tmp_path, per_device_train_batch_size=16).train()

    def test_a_killed_writer_leaves_a_temporary_file_that_the_next_write_removes(self, tmp_path):
        path = tmp_path / ANCHORS_FILE_NAME
        dead_pid = 2**22 + 12345  # above the default pid_max: no such process
        left_over = tmp_path / f".{ANCHORS_FILE_NAME}.{dead_pid}.0.tmp"
        left_over.write_bytes(b"half a file")
        running = tmp_path / f".{ANCHORS_FILE_NAME}.{os.getppid()}.0.tmp"  # a live writer's file stays
        running.write_bytes(b"being written")
        with AnchorFileWriter(path, {"a.distributions": ((1, 1, 1), torch.float32)}, {"format": ANCHORS_FORMAT}) as w:
            w.commit()
        assert sorted(os.listdir(tmp_path)) == sorted([ANCHORS_FILE_NAME, running.name])

    def test_atomic_write_follows_the_umask(self, tmp_path):
        umask = os.umask(0o027)
        try:
            with atomic_write(tmp_path / "file.jsonl") as temporary, open(temporary, "w") as handle:
                handle.write("{}\n")
        finally:
            os.umask(umask)
        assert stat.S_IMODE(os.stat(tmp_path / "file.jsonl").st_mode) == 0o640


class TestCommandLine:
    @pytest.fixture(scope="class")
    def model_dir(self, tmp_path_factory):
        return save_tiny_model(str(tmp_path_factory.mktemp("tiny-moe")))

    @pytest.mark.parametrize(
        "content, expected",
        [
            ('{"a": 1}\n{bad json\n', "data.jsonl, line 2: not valid JSON"),  # was: pyarrow's 0-based "row 1"
            ("", "is empty: there is no row to read"),
            ("[1, 2]\n[3, 4]\n", "each row must be one object"),
        ],
        ids=["malformed", "empty", "lists"],
    )
    def test_unreadable_datasets(self, tmp_path, capsys, model_dir, content, expected):
        data = tmp_path / "data.jsonl"
        data.write_text(content)
        code = main(["train", "--model_name_or_path", model_dir, "--dataset_name", str(data), "--output_dir", "o"])
        _assert_one_line_error(capsys, code, expected)

    def test_yaml_syntax_error(self, tmp_path, capsys):
        config = tmp_path / "recipe.yaml"
        config.write_text("model_name_or_path: [unclosed\n")
        _assert_one_line_error(capsys, main(["train", "--config", str(config)]), "not valid YAML")

    def test_analyze_arguments_are_checked_before_the_analysis(self, tmp_path, capsys, model_dir):
        pairs = os.path.join(os.path.dirname(__file__), "data", "pairs.jsonl")
        output = tmp_path / "out"
        with pytest.raises(SystemExit) as exit_info:
            main(["analyze", "--model", model_dir, "--output-dir", str(output), "--batch-size", "0"])
        assert exit_info.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
        code = main(["analyze", "--model", model_dir, "--data", pairs, "--split", "test", "--output-dir", str(output)])
        _assert_one_line_error(capsys, code, "has no split 'test' (it has train)")
        start = time.perf_counter()
        code = main(["analyze", "--model", model_dir, "--output-dir", str(output), "--layers", "9"])
        _assert_one_line_error(capsys, code, "Layer 9 in the layer selection '9' is out of range")
        assert time.perf_counter() - start < 30 and not output.exists()

    def test_pairs_refuses_empty_and_non_utf8_input(self, tmp_path, capsys):
        (tmp_path / "a.txt").write_text("")
        (tmp_path / "b.txt").write_text("")
        arguments = ["pairs", "--language", "sw", "--output", str(tmp_path / "p.jsonl"), "--aligned"]
        _assert_one_line_error(capsys, main([*arguments, str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]), "empty")
        (tmp_path / "a.txt").write_bytes(b"\xff\xfe caf\xe9\n")
        (tmp_path / "b.txt").write_text("cafe\n")
        code = main([*arguments, str(tmp_path / "a.txt"), str(tmp_path / "b.txt")])
        _assert_one_line_error(capsys, code, f"{tmp_path / 'a.txt'} is not UTF-8 text")
        (tmp_path / "m.jsonl").write_text("[1]\n")
        code = main(["pairs", "--multilingual", str(tmp_path / "m.jsonl"), "--output", str(tmp_path / "p.jsonl")])
        _assert_one_line_error(capsys, code, "item 1: expected a JSON object")
        assert not (tmp_path / "p.jsonl").exists()


class TestKilledWrites:
    """SIGKILL in the middle of each file hf_sara writes, then a rerun or a resume: nothing half-written is used."""

    SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "killed_run.py")

    def _run(self, output_dir, kill_at, *extra):
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, self.SCRIPT, str(output_dir), kill_at, *extra]
        return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)

    @pytest.fixture(scope="class")
    def uninterrupted(self, tmp_path_factory):
        output_dir = tmp_path_factory.mktemp("uninterrupted")
        completed = self._run(output_dir, "none")
        assert completed.returncode == 0, completed.stderr[-3000:]
        return json.loads((output_dir / "done.json").read_text())["losses"]

    def test_killed_while_writing_the_anchors(self, tmp_path, uninterrupted):
        killed = self._run(tmp_path, "anchors")
        assert killed.returncode == -signal.SIGKILL
        assert not (tmp_path / ANCHORS_FILE_NAME).exists()
        assert len(glob.glob(str(tmp_path / f".{ANCHORS_FILE_NAME}.*.tmp"))) == 1  # what the kill left
        rerun = self._run(tmp_path, "none")
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert glob.glob(str(tmp_path / "*.tmp")) + glob.glob(str(tmp_path / ".*.tmp")) == []
        assert json.loads((tmp_path / "done.json").read_text())["losses"] == pytest.approx(uninterrupted, abs=1e-6)

    def test_killed_while_saving_a_checkpoint(self, tmp_path, uninterrupted):
        killed = self._run(tmp_path, "checkpoint")
        assert killed.returncode == -signal.SIGKILL
        assert (tmp_path / "checkpoint-4").is_dir() and (tmp_path / ".hf_sara.lock").exists()  # as the kill left them
        resumed = self._run(tmp_path, "none", "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "skipping incomplete checkpoint(s) ['checkpoint-4']" in resumed.stderr, resumed.stderr[-3000:]
        losses = json.loads((tmp_path / "done.json").read_text())["losses"]
        assert sorted(losses) == ["1", "2", "3", "4", "5", "6"]  # steps 1-2 from checkpoint-2's history
        assert [losses[step] for step in "3456"] == pytest.approx([uninterrupted[step] for step in "3456"], abs=1e-6)

    def test_resume_restores_every_weight_including_fused_experts(self, tmp_path):
        # transformers saves the experts one tensor per expert and its Trainer loads them back without converting:
        # the fused `experts.gate_up_proj` of a resumed plain SFTTrainer keep their initial weights.
        trainer = _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2, optim="sgd", learning_rate=0.5)
        trainer.train()
        trained = {name: value.clone() for name, value in trainer.model.state_dict().items()}
        resumed = _trainer(tmp_path / "resumed")
        resumed._load_from_checkpoint(str(tmp_path / "checkpoint-2"))
        for name, value in resumed.model.state_dict().items():
            torch.testing.assert_close(value, trained[name], rtol=0, atol=0, msg=name)

    def test_an_incomplete_checkpoint_given_by_path_is_refused(self, tmp_path):
        (tmp_path / "checkpoint-4").mkdir()
        (tmp_path / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "log_hist')
        with pytest.raises(ValueError, match="checkpoint-4 is incomplete.*resume_from_checkpoint=True"):
            _trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
        with pytest.raises(ValueError, match=r"No complete checkpoint .*checkpoint-4 were cut short"):
            _trainer(tmp_path).train(resume_from_checkpoint=True)

    def test_killed_while_writing_pairs(self, tmp_path):
        killed = self._run(tmp_path, "pairs")
        assert killed.returncode == -signal.SIGKILL
        assert not (tmp_path / "pairs.jsonl").exists()
        assert len(glob.glob(str(tmp_path / ".pairs.jsonl.*.tmp"))) == 1
        from hf_sara.tools.pairs import write_jsonl

        write_jsonl([{"text": "a", "anchor_text": "b"}], str(tmp_path / "pairs.jsonl"))
        assert os.listdir(tmp_path) == ["pairs.jsonl"]


class TestAdversarialFindings:
    """Cases an adversarial review of the library and CLI found, each with its clear error or right result."""

    def test_another_anchor_prefix_is_refused(self, tmp_path):
        rows = [{**row, "fr_prompt": row["prompt"], "fr_completion": row["completion"]} for row in load_pairs()]
        dataset = Dataset.from_list(rows)
        _trainer(tmp_path, dataset=dataset, anchor_prefix="anchor_").prepare_offline_anchors()
        with pytest.raises(ValueError, match="other anchor tokens"):
            _trainer(tmp_path, dataset=dataset, anchor_prefix="fr_").train()

    def test_sft_config_arguments_keep_their_token_fields(self, tmp_path):
        from .testing_utils import sft_config

        trainer = SARATrainer(
            model=pairs_model(),
            args=sft_config(tmp_path, max_steps=1),
            train_dataset=load_pairs(),
            processing_class=pairs_tokenizer(),
        )
        trainer.train()
        assert trainer.args.eos_token is None and trainer.args.max_length == 64

    def test_integer_languages_reach_the_model_card(self, tmp_path):
        rows = [{**row, "language": index % 3} for index, row in enumerate(load_pairs())]
        trainer = _trainer(tmp_path, dataset=Dataset.from_list(rows))
        trainer.train()
        trainer.save_model()
        assert "| languages | 0, 1, 2 |" in (tmp_path / "README.md").read_text()

    def test_reserved_columns_are_refused(self, tmp_path):
        prepared = _trainer(tmp_path / "first").train_dataset
        with pytest.raises(ValueError, match=r"\['sara_row'\], which hf_sara reserves"):
            _trainer(tmp_path, dataset=load_pairs().add_column("sara_row", list(range(16))))
        with pytest.raises(ValueError, match="reserves"):
            _trainer(tmp_path, dataset=prepared)

    def test_an_example_without_text_is_refused(self, tmp_path):
        rows = load_pairs().to_list()
        rows[4]["completion"] = None
        with pytest.raises(ValueError, match=r"Row 4: the example's 'completion' is None, not a text"):
            _trainer(tmp_path, dataset=Dataset.from_list(rows))

    def test_an_empty_anchor_prompt_is_a_valid_anchor(self, tmp_path):
        rows = load_pairs().to_list()
        rows[2]["anchor_prompt"] = ""
        _trainer(tmp_path, dataset=Dataset.from_list(rows))

    def test_output_router_logits_of_a_model_given_by_name_is_kept(self, tmp_path):
        model = pairs_model()
        model.config.output_router_logits = True
        model.save_pretrained(tmp_path / "model")
        pairs_tokenizer().save_pretrained(tmp_path / "model")
        trainer = _trainer(tmp_path / "run", model=str(tmp_path / "model"))
        trainer.train()
        assert trainer.model.config.output_router_logits is True

    def test_analysis_reads_only_the_formats_anchor_columns(self):
        from hf_sara.tools.analysis import analyze_routing

        dataset = load_pairs().add_column("anchor_id", [0] * 16)  # an unrelated column with a falsy value
        report = analyze_routing(patch_model(pairs_model()), pairs_tokenizer(), dataset, batch_size=8)
        assert sum(report.counts.values()) == 16

    def test_eval_task_names_that_collide_are_refused(self):
        from hf_sara.tools.evaluation.sources import parse_sources

        with pytest.raises(ValueError, match="'zh-Hans' and 'zh_Hans' both become the harness task"):
            parse_sources(files=["zh-Hans=a/m3ke_zh.jsonl", "zh_Hans=b/global_mmlu_sw.jsonl"])

    @pytest.mark.parametrize(
        "flags, message",
        [
            (["--dtype", "foo"], "invalid choice"),
            (["--device", "bogus"], "is not a torch device"),
            (["--limit", "0"], "must be a positive number"),
            (["--batch-size", "abc"], "invalid batch_size value"),
            (["--device", "cuda"], "no CUDA GPU"),  # was: "Torch not compiled with CUDA enabled", a traceback
            (["--device", "meta"], "'meta' holds no weights"),
            (["--device", "mps"], "no Apple MPS device"),
        ],
    )
    def test_eval_arguments_are_checked_before_anything_is_written(
        self, tmp_path, capsys, monkeypatch, flags, message
    ):
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # as on a machine without CUDA
        monkeypatch.setattr("torch.backends.mps.is_available", lambda: False)
        output = tmp_path / "eval"
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--model", "unused", "--output-dir", str(output), *flags])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert not output.exists()

    def test_eval_cache_is_not_shared_across_max_lengths(self, tmp_path, capsys):
        from hf_sara.tools.evaluation.local_files import sample_eval_files

        model = save_tiny_model(str(tmp_path / "model"))
        arguments = ["eval", "--model", model, "--files", f"sw={sample_eval_files()['sw']}", "--batch-size", "4"]
        output = str(tmp_path / "eval")
        assert main([*arguments, "--output-dir", output, "--max-length", "6"]) == 0
        assert main([*arguments, "--output-dir", output]) == 0
        assert main([*arguments, "--output-dir", str(tmp_path / "fresh")]) == 0
        reused, fresh = ((tmp_path / folder / "accuracy.csv").read_text() for folder in ("eval", "fresh"))
        assert reused == fresh
        assert len(os.listdir(tmp_path / "eval" / "lm_eval_cache")) == 2

    def test_pairs_reads_every_column_refuses_self_anchors_mixed_formats_and_overwriting(self, tmp_path, capsys):
        from hf_sara.tools.pairs import pairs_from_multilingual

        path = tmp_path / "items.jsonl"
        path.write_text('{"en": "Hello", "sw": "Habari"}\n{"en": "Bye", "sw": "Kwaheri", "yo": "O dabo"}\n')
        assert [row["language"] for row in pairs_from_multilingual(str(path))] == ["sw", "sw", "yo"]
        with pytest.raises(ValueError, match="includes the anchor language 'en'"):
            pairs_from_multilingual(str(path), languages=["en", "sw"])
        mixed = [
            {"en": "Hello", "sw": "Habari"},
            {"en": {"prompt": "a", "completion": "b"}, "sw": {"prompt": "c", "completion": "d"}},
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in mixed))
        with pytest.raises(ValueError, match=r"mixes texts and prompt/completion objects \(pair 2"):
            pairs_from_multilingual(str(path))
        path.write_text('{"en": {"prompt": "a", "completion": null}, "sw": {"prompt": "c", "completion": "d"}}\n')
        with pytest.raises(ValueError, match="row 1: the sw item has prompt/completion but the en anchor does not"):
            pairs_from_multilingual(str(path))
        (tmp_path / "sw.txt").write_bytes("\ufeffHabari\n".encode())
        (tmp_path / "en.txt").write_bytes("\ufeffHello\n".encode())
        arguments = ["pairs", "--aligned", str(tmp_path / "sw.txt"), str(tmp_path / "en.txt"), "--language", "sw"]
        assert main([*arguments, "--output", str(tmp_path / "pairs.jsonl")]) == 0
        assert json.loads((tmp_path / "pairs.jsonl").read_text())["text"] == "Habari"  # no byte-order mark
        _assert_one_line_error(capsys, main([*arguments, "--output", str(tmp_path / "sw.txt")]), "is one of the input")
        assert (tmp_path / "sw.txt").read_bytes() == "\ufeffHabari\n".encode()

    def test_demo_arguments_are_checked_before_the_base_training(self, tmp_path, capsys):
        for flags, message in [
            (["--sara-weight", "-1"], "--sara-weight must be a finite number >= 0"),
            (["--sara-layers", "9"], "Layer 9"),
            (["--steps", "0"], "must be at least 1"),
        ]:
            code = main(["demo", "--output-dir", str(tmp_path / "demo"), *flags])
            _assert_one_line_error(capsys, code, message)
            assert not (tmp_path / "demo").exists()

    def test_alignment_loss_and_capture_arguments(self):
        distributions = torch.softmax(torch.randn(3, 4, 8), dim=-1)
        loss, _ = sara_alignment_loss(distributions, distributions.clone(), [True, False, True], layers="all")
        assert loss.item() == pytest.approx(0.0, abs=1e-7)
        from hf_sara import routing_distributions

        input_ids = torch.randint(3, 100, (2, 5))
        with pytest.raises(ValueError, match=r"`token_mask` has shape \(2, 4\) but the batch is \(2, 5\)"):
            routing_distributions(patch_model(pairs_model()), input_ids, token_mask=torch.ones(2, 4))


def test_resuming_with_another_pooling_says_to_restore_it(tmp_path):
    _trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=1).train()
    with pytest.raises(ValueError, match="pooling is 'all' there but 'completion' here.*restore the settings"):
        _trainer(tmp_path, max_steps=2, sara_pooling="completion").train(resume_from_checkpoint=True)


def test_eval_files_saved_with_a_byte_order_mark(tmp_path):
    from hf_sara.tools.evaluation.local_files import load_eval_file

    path = tmp_path / "exam.csv"
    path.write_bytes("\ufeffquestion,option_a,option_b,option_c,option_d,answer\nQ?,a,b,c,d,B\n".encode())
    assert load_eval_file(str(path))[1][0]["question"] == "Q?"


def test_hf_sara_anchors_writes_a_new_sara_anchor_path_and_typos_are_named(tmp_path, capsys):
    from .test_cli import TRAIN_FLAGS

    model = save_tiny_model(str(tmp_path / "model"))
    pairs = os.path.join(os.path.dirname(__file__), "data", "pairs.jsonl")
    target = tmp_path / "shared" / "anchors.safetensors"
    arguments = ["anchors", "--model_name_or_path", model, "--output_dir", str(tmp_path / "out"), *TRAIN_FLAGS]
    assert main([*arguments, "--dataset_name", pairs, "--sara_anchor_path", str(target)]) == 0
    assert target.exists() and f"to {target}" in capsys.readouterr().out
    _assert_one_line_error(capsys, main([*arguments, "--dataset_name", "pairz.jsonl"]), "pairz.jsonl not found")


class TestSecondAdversarialReview:
    """Cases a second adversarial review (of the anchor file, locks, resume and distributed code) found."""

    def test_a_non_positive_eval_batch_size_is_refused(self, tmp_path):
        for size in (0, -1):  # it is the offline anchors' batch size: -1 computed nothing and trained plain SFT
            with pytest.raises(ValueError, match="`per_device_eval_batch_size` must be >= 1"):
                sara_config(tmp_path, per_device_eval_batch_size=size)

    def test_resume_refuses_a_longer_runs_checkpoint(self, tmp_path):
        _trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=1).train()
        shutil.rmtree(tmp_path / "checkpoint-2")
        with pytest.raises(ValueError, match="checkpoint-4 is at step 4, beyond this run's max_steps=3"):
            _trainer(tmp_path, max_steps=3).train(resume_from_checkpoint=True)
        with pytest.raises(ValueError, match="beyond"):  # "true", as the command line spells it, means the same
            _trainer(tmp_path, max_steps=3).train(resume_from_checkpoint="true")
        _trainer(tmp_path, max_steps=3).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))  # by path

    def test_an_anchors_file_rewritten_during_training_is_refused(self, tmp_path):
        trainer = _trainer(tmp_path, max_steps=2)
        anchors = trainer.prepare_offline_anchors()
        other = tmp_path / "other"
        _trainer(other, model=pairs_model(seed=1)).prepare_offline_anchors()
        shutil.copyfile(other / ANCHORS_FILE_NAME, anchors.path)  # in place, as `cp` does
        with pytest.raises(ValueError, match="was replaced or rewritten since it was opened"):
            trainer.train()

    def test_locks_of_a_restarted_container_an_empty_lock_and_a_bad_lock(self, tmp_path, capsys):
        import socket

        from hf_sara.files.lock import LOCK_FILE_NAME, OutputDirectoryLockedError, directory_lock

        lock = tmp_path / LOCK_FILE_NAME
        lock.write_text(f"{socket.gethostname()} {os.getpid()}")  # a killed run whose process id is ours now
        with directory_lock(tmp_path):
            pass
        lock.write_text("")
        os.utime(lock, (time.time() - 60, time.time() - 60))  # killed between creating and writing it
        with directory_lock(tmp_path):
            pass
        lock.mkdir()
        with pytest.raises(OutputDirectoryLockedError, match="is not a lock hf_sara wrote"):
            with directory_lock(tmp_path):
                pass
        lock.rmdir()
        lock.write_text("another-host 1")
        model = save_tiny_model(str(tmp_path / "model"))
        pairs = os.path.join(os.path.dirname(__file__), "data", "pairs.jsonl")
        code = main(["anchors", "--model_name_or_path", model, "--dataset_name", pairs, "--output_dir", str(tmp_path)])
        _assert_one_line_error(capsys, code, "Another training is writing to")

    def test_anchors_survive_removed_or_reordered_eval_sets_and_another_model_path(self, tmp_path):
        first, second = load_pairs().select(range(4)), load_pairs().select(range(4, 8))
        _trainer(tmp_path, eval_dataset={"a": first, "b": second}).prepare_offline_anchors()
        _trainer(tmp_path, eval_dataset={"b": second}).train()
        _trainer(tmp_path, eval_dataset={"b": second, "a": first}).train()
        model = pairs_model()
        model.config._name_or_path = "./a/relative/spelling"
        _trainer(tmp_path, model=model, eval_dataset={"a": first, "b": second}).train()

    def test_damaged_flags_shapes_offsets_and_metadata_are_refused(self, tmp_path):
        _trainer(tmp_path).prepare_offline_anchors()
        path = tmp_path / ANCHORS_FILE_NAME
        original = path.read_bytes()
        tensors, metadata = read_anchor_file(path)
        damaged = {**tensors, "train.has_anchor": torch.zeros_like(tensors["train.has_anchor"])}
        write_anchor_file(path, damaged, metadata)
        with pytest.raises(ValueError, match="marks other rows of the train dataset as anchored"):
            _trainer(tmp_path).train()
        transposed = {**tensors, "train.distributions": tensors["train.distributions"].transpose(1, 2).contiguous()}
        write_anchor_file(path, transposed, metadata)
        with pytest.raises(ValueError, match=r"holds train anchors of shape \[16, 8, 4\], not \[rows, 4 MoE layers"):
            _trainer(tmp_path).train()
        write_anchor_file(path, tensors, {**metadata, "datasets": '{"train": 5}'})
        with pytest.raises(ValueError, match="has unreadable metadata"):
            _trainer(tmp_path).train()
        header_size = int.from_bytes(original[:8], "little")
        header = json.loads(original[8 : 8 + header_size])
        header["train.has_anchor"]["data_offsets"] = [-16, 0]
        encoded = json.dumps(header).encode()
        path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + original[8 + header_size :])
        with pytest.raises(ValueError, match="negative offsets"):
            _trainer(tmp_path).train()

    def test_resuming_into_another_architecture_is_named(self, tmp_path):
        _trainer(tmp_path, max_steps=1, save_strategy="steps", save_steps=1).train()
        bigger = pairs_model(num_hidden_layers=5)
        with pytest.raises(ValueError, match="checkpoint-1 does not fit this model"):
            _trainer(tmp_path / "other", model=bigger, max_steps=2).train(
                resume_from_checkpoint=str(tmp_path / "checkpoint-1")
            )

    def test_the_token_digest_hashes_the_selected_rows(self):
        from hf_sara.training.anchors import anchor_tokens_digest
        from hf_sara.training.paired_data import ROW_COLUMN

        table = Dataset.from_dict({"input_ids": [[1], [2], [3], [4]], ROW_COLUMN: [0, 1, 2, 3]})
        assert anchor_tokens_digest(table.select([0, 2]), "all") != anchor_tokens_digest(table.select([1, 3]), "all")
        shifted = Dataset.from_dict({"input_ids": [[1], [2]], ROW_COLUMN: [10, 11]})
        assert anchor_tokens_digest(shifted, "all", offset=10) == anchor_tokens_digest(table.select([0, 1]), "all")


def test_a_non_numeric_sara_weight_and_a_negative_few_shot_count_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="`sara_weight` must be a finite number, got '1.5'"):
        sara_config(tmp_path, sara_weight="1.5")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "unused", "--output-dir", str(tmp_path / "eval"), "--num-fewshot", "-1"])
    assert exit_info.value.code == 2 and "must be 0 or more" in capsys.readouterr().err
