"""The `hf-sara` command line, end to end on tiny local data."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from trl import ModelConfig

from hf_sara import SARAConfig
from hf_sara.cli import main
from hf_sara.testing import demo_data_path, load_demo_pairs, save_tiny_model

TRAIN_FLAGS = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--report_to", "none", "--bf16", "false",
    "--gradient_checkpointing", "false", "--save_strategy", "no", "--use_cpu", "true", "--logging_steps", "1",
    "--disable_tqdm", "true",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-moe")))


@pytest.fixture(scope="module")
def small_pairs(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    load_demo_pairs().select(range(0, 272, 17)).to_json(str(path), force_ascii=False)
    return str(path)


def _assert_one_line_error(capsys, code, pattern):
    captured = capsys.readouterr()
    assert code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], captured.err  # one line, the last (progress bars aside)
    assert pattern in errors[0], errors[0]
    assert "Traceback" not in captured.err


def _assert_real_png(path):
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.05  # not a blank canvas


class TestPairs:
    def test_aligned_files(self, tmp_path, capsys):
        (tmp_path / "sw.txt").write_text("Jua huchomoza mashariki.\nNyuki hutengeneza asali.\n", encoding="utf-8")
        (tmp_path / "en.txt").write_text("The sun rises in the east.\n\n", encoding="utf-8")
        output = tmp_path / "pairs.jsonl"
        args = ["pairs", "--aligned", str(tmp_path / "sw.txt"), str(tmp_path / "en.txt"), "--language", "sw"]
        assert main([*args, "--output", str(output)]) == 0
        rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
        assert rows == [
            {"language": "sw", "text": "Jua huchomoza mashariki.", "anchor_text": "The sun rises in the east."},
            {"language": "sw", "text": "Nyuki hutengeneza asali.", "anchor_text": None},
        ]
        assert "Wrote 2 pairs (1 with an anchor)" in capsys.readouterr().out

    def test_multilingual_tsv_and_translated_instructions(self, tmp_path):
        tsv = tmp_path / "corpus.tsv"
        tsv.write_text("en\tsw\thi\nWater\tMaji\tपानी\nFire\tMoto\t\n", encoding="utf-8")
        output = tmp_path / "tsv.jsonl"
        assert main(["pairs", "--multilingual", str(tsv), "--output", str(output)]) == 0
        rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
        assert [(row["language"], row["text"], row["anchor_text"]) for row in rows] == [
            ("sw", "Maji", "Water"),
            ("hi", "पानी", "Water"),
            ("sw", "Moto", "Fire"),
        ]
        instructions = tmp_path / "instructions.jsonl"
        item = {
            "en": {"prompt": "What do bees make?", "completion": " Honey."},
            "sw": {"prompt": "Nyuki hutengeneza nini?", "completion": " Asali."},
        }
        instructions.write_text(json.dumps(item) + "\n", encoding="utf-8")
        output = tmp_path / "instructions_pairs.jsonl"
        assert main(["pairs", "--multilingual", str(instructions), "--output", str(output)]) == 0
        (row,) = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
        assert row == {
            "language": "sw",
            "prompt": "Nyuki hutengeneza nini?",
            "completion": " Asali.",
            "anchor_prompt": "What do bees make?",
            "anchor_completion": " Honey.",
        }

    def test_bad_arguments_fail_with_one_line_and_no_output(self, tmp_path, capsys):
        tsv = tmp_path / "corpus.tsv"
        tsv.write_text("sw\thi\nMaji\tपानी\n", encoding="utf-8")
        output = tmp_path / "out.jsonl"
        code = main(["pairs", "--multilingual", str(tsv), "--output", str(output)])
        _assert_one_line_error(capsys, code, "no column for the anchor language 'en'")
        code = main(["pairs", "--multilingual", str(tmp_path / "missing.tsv"), "--output", str(output)])
        _assert_one_line_error(capsys, code, "No such file or directory")
        (tmp_path / "a.txt").write_text("one\ntwo\n", encoding="utf-8")
        (tmp_path / "b.txt").write_text("one\n", encoding="utf-8")
        code = main(["pairs", "--aligned", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--language", "sw",
                     "--output", str(output)])  # fmt: skip
        _assert_one_line_error(capsys, code, "has 2 lines but")
        assert not output.exists()
        assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]

    def test_a_json_table_is_read_as_json(self, tmp_path):
        # Was: "line 1: not valid JSON" for one valid JSON object over several lines.
        table = tmp_path / "table.json"
        table.write_text(json.dumps({"en": ["Water", "Fire"], "sw": ["Maji", "Moto"]}, indent=2), encoding="utf-8")
        listed = tmp_path / "listed.json"
        listed.write_text(json.dumps([{"en": "Water", "sw": "Maji"}], indent=2), encoding="utf-8")
        for path, expected in ((table, [("Maji", "Water"), ("Moto", "Fire")]), (listed, [("Maji", "Water")])):
            output = tmp_path / f"{path.stem}.jsonl"
            assert main(["pairs", "--multilingual", str(path), "--output", str(output)]) == 0
            rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
            assert [(row["text"], row["anchor_text"]) for row in rows] == expected

    def test_self_anchors_and_repeated_columns_are_refused(self, tmp_path, capsys):
        (tmp_path / "en.txt").write_text("Water\nFire\n", encoding="utf-8")
        output = tmp_path / "out.jsonl"
        english = str(tmp_path / "en.txt")
        # Were: English anchored to itself; the first `sw` column dropped without a word.
        code = main(["pairs", "--aligned", english, english, "--language", "en", "--output", str(output)])
        _assert_one_line_error(capsys, code, "--language en is the anchor language")
        code = main(["pairs", "--aligned", english, english, "--language", "sw", "--output", str(output)])
        _assert_one_line_error(capsys, code, "SOURCE and ANCHOR are the same file")
        tsv = tmp_path / "corpus.tsv"
        tsv.write_text("en\tsw\tsw\nWater\tMaji\tMaji!\n", encoding="utf-8")
        code = main(["pairs", "--multilingual", str(tsv), "--output", str(output)])
        _assert_one_line_error(capsys, code, "names the column(s) ['sw'] more than once")
        jsonl = tmp_path / "corpus.jsonl"
        jsonl.write_text('{"en": "Water", "sw": "Maji", "sw": "Maji!"}\n', encoding="utf-8")
        code = main(["pairs", "--multilingual", str(jsonl), "--output", str(output)])
        _assert_one_line_error(capsys, code, "line 1: an object names the key(s) ['sw'] more than once")
        assert not output.exists()


class TestTrainAnchorsAnalyze:
    def test_train_then_analyze_the_adapter(self, tmp_path, tiny_model_dir, small_pairs, capsys):
        output_dir = tmp_path / "run"
        code = main(
            [
                "train", "--model_name_or_path", tiny_model_dir, "--dataset_name", small_pairs,
                "--output_dir", str(output_dir), "--use_peft", "--lora_target_modules", "q_proj", "v_proj",
                "--lora_target_parameters", "mlp.gate.weight", "--lora_dropout", "0", "--sara_layers", "all",
                *TRAIN_FLAGS,
            ]
        )  # fmt: skip
        assert code == 0
        assert (output_dir / "adapter_model.safetensors").exists()
        assert (output_dir / "sara_anchors.safetensors").exists()
        assert "## SARA settings" in (output_dir / "README.md").read_text()

        analysis = tmp_path / "analysis"
        args = ["analyze", "--model", tiny_model_dir, "--adapter", str(output_dir), "--data", small_pairs]
        assert main([*args, "--output-dir", str(analysis), "--layers", "all"]) == 0
        out = capsys.readouterr().out
        assert "| language | pairs | base | adapter |" in out
        files = sorted(os.listdir(analysis))
        assert files == [
            "expert_usage_adapter.png",
            "expert_usage_base.png",
            "layer_divergence.png",
            "routing_divergence.csv",
            "routing_divergence.md",
        ]
        for name in files:
            if name.endswith(".png"):
                _assert_real_png(analysis / name)
        header = (analysis / "routing_divergence.csv").read_text().splitlines()[0]
        assert header == "language,pairs,base,adapter"

    def test_anchors(self, tmp_path, tiny_model_dir, small_pairs, capsys):
        args = ["anchors", "--model_name_or_path", tiny_model_dir, "--dataset_name", small_pairs]
        assert main([*args, "--output_dir", str(tmp_path), *TRAIN_FLAGS]) == 0
        assert (tmp_path / "sara_anchors.safetensors").exists()
        assert "Saved anchors of 16 rows x 4 MoE layers" in capsys.readouterr().out

    def test_bad_model_and_files_fail_with_one_line_and_no_output(self, tmp_path, small_pairs, capsys):
        unknown = tmp_path / "unknown-model"
        unknown.mkdir()
        (unknown / "config.json").write_text(json.dumps({"model_type": "not-a-model-type"}))
        output_dir = tmp_path / "out"
        for model, dataset, message in [
            (str(unknown), small_pairs, "not-a-model-type"),
            (str(tmp_path / "missing-model"), small_pairs, "model"),
            (str(unknown), str(tmp_path / "missing.jsonl"), "dataset"),
        ]:
            code = main(
                ["train", "--model_name_or_path", model, "--dataset_name", dataset, "--output_dir", str(output_dir),
                 *TRAIN_FLAGS]
            )  # fmt: skip
            _assert_one_line_error(capsys, code, message)
            assert not output_dir.exists()
        code = main(["analyze", "--model", str(tmp_path / "missing"), "--output-dir", str(output_dir)])
        _assert_one_line_error(capsys, code, "not found")
        assert not output_dir.exists()
        # A name that is no model (was: "The model nomodel has a tokenizer: save the tokenizer ...").
        code = main(["analyze", "--model", "nomodel", "--output-dir", str(output_dir)])
        _assert_one_line_error(capsys, code, "The model nomodel was not found")
        assert not output_dir.exists()

    def test_a_bad_layer_selection_is_refused_before_anything_is_prepared(self, tmp_path, tiny_model_dir, capsys,
                                                                          monkeypatch):  # fmt: skip
        # Was: refused after the datasets were prepared, leaving an empty output folder.
        from hf_sara.tools import loading

        read = []
        monkeypatch.setattr(loading, "load_dataset_dict", lambda *args, **kwargs: read.append(args) or 1 / 0)
        output_dir = tmp_path / "out"
        for layers, message in (("seven", "Cannot read 'seven'"), ("5-2", "ends before it starts")):
            code = main(["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", "unused.jsonl",
                         "--output_dir", str(output_dir), "--sara_layers", layers, *TRAIN_FLAGS])  # fmt: skip
            _assert_one_line_error(capsys, code, message)
        assert read == [] and not output_dir.exists()
        monkeypatch.undo()
        pairs = os.path.join(os.path.dirname(__file__), "data", "pairs.jsonl")
        code = main(["train", "--model_name_or_path", tiny_model_dir, "--dataset_name", pairs, "--output_dir",
                     str(output_dir), "--sara_layers", "9", *TRAIN_FLAGS])  # fmt: skip
        _assert_one_line_error(capsys, code, "Layer 9 in the layer selection '9' is out of range")
        assert not output_dir.exists()

    def test_analyze_refuses_an_adapter_of_another_base(self, tmp_path, tiny_model_dir, capsys):
        # Was: measured without a word (the same shapes); the check of `hf-sara merge` and `eval`.
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        other = save_tiny_model(str(tmp_path / "other"), seed=5)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(other), lora).save_pretrained(str(tmp_path / "adapter"))
        output_dir = tmp_path / "out"
        code = main(["analyze", "--model", tiny_model_dir, "--adapter", str(tmp_path / "adapter"), "--output-dir",
                     str(output_dir)])  # fmt: skip
        _assert_one_line_error(capsys, code, f"was trained on '{other}'")
        assert not output_dir.exists()

    def test_dense_model_is_refused(self, tmp_path, small_pairs, capsys):
        from transformers import LlamaConfig, LlamaForCausalLM

        from hf_sara.testing import pair_texts, train_tokenizer

        dense = tmp_path / "dense"
        tokenizer = train_tokenizer(pair_texts(load_demo_pairs()), vocab_size=300)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4)  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(dense)
        tokenizer.save_pretrained(dense)
        code = main(["train", "--model_name_or_path", str(dense), "--dataset_name", small_pairs, "--output_dir",
                     str(tmp_path / "out"), *TRAIN_FLAGS])  # fmt: skip
        _assert_one_line_error(capsys, code, "LlamaForCausalLM has no Mixture-of-Experts router")


class TestHelp:
    def test_train_help_lists_every_option(self):
        completed = subprocess.run(
            [sys.executable, "-m", "hf_sara.cli", "train", "--help"], capture_output=True, text=True, timeout=300
        )
        assert completed.returncode == 0
        for dataclass in (SARAConfig, ModelConfig):
            for field in dataclasses.fields(dataclass):
                if field.init and not field.name.startswith("_"):
                    assert f"--{field.name}" in completed.stdout, field.name

    @pytest.mark.parametrize("command", ["analyze", "pairs", "demo"])
    def test_other_commands_have_help(self, command, capsys):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert "--output" in capsys.readouterr().out

    def test_unknown_command(self, capsys):
        _assert_one_line_error(capsys, main(["fly"]), "unknown command 'fly'")


def test_demo_end_to_end(tmp_path, capsys):
    """The demo with fewer steps: SARA's divergence to the anchors ends below SFT's in every language."""
    output_dir = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(output_dir), "--base-steps", "120", "--steps", "60"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and "language" not in line]
    assert len(table) == 4
    for line in table:
        language, pairs, base, sft, sara = [cell.strip() for cell in line.strip("|").split("|")]
        assert float(sara) < float(sft), line
    for name in ("layer_divergence.png", "expert_usage_SARA.png", "expert_usage_SFT.png", "expert_usage_base.png"):
        _assert_real_png(output_dir / "analysis" / name)
    assert (output_dir / "sara-adapter" / "adapter_model.safetensors").exists()
    assert "tags:" in (output_dir / "sara-adapter" / "README.md").read_text()
    assert demo_data_path().endswith("parallel_instructions.jsonl")
