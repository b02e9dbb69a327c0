"""`hf-sara eval`: local evaluation files, lm-evaluation-harness scoring checked against a direct computation."""

import csv
import json
import os
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sara.cli import main
from hf_sara.testing import save_tiny_model, tiny_config
from hf_sara.tools.evaluation.local_files import GLOBAL_MMLU, M3KE, EvalFileError, load_eval_file, sample_eval_files
from hf_sara.tools.evaluation.run import EvalSettings, evaluate_model
from hf_sara.tools.evaluation.scores import scores_from_results
from hf_sara.tools.evaluation.sources import EvalSource, language_of_task, parse_sources
from hf_sara.tools.evaluation.tasks import write_local_tasks

LETTERS = ("A", "B", "C", "D")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-moe")), seed=3)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sample_sources():
    return parse_sources(files=[f"{language}={path}" for language, path in sample_eval_files().items()])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def _direct_accuracy(model, tokenizer, path):
    """Log-likelihood of " A".." D" after the Global-MMLU prompt, computed without the harness."""
    schema, rows = load_eval_file(path)
    correct = []
    for row in rows:
        options = "\n".join(f"{letter}. {row[column]}" for letter, column in zip(LETTERS, schema.options, strict=True))
        context = f"{row['question'].strip()}\n{options}\nAnswer:"
        context_ids = tokenizer(context)["input_ids"]
        scores = []
        for letter in LETTERS:
            full_ids = tokenizer(context + " " + letter)["input_ids"]
            assert full_ids[: len(context_ids)] == context_ids
            with torch.no_grad():
                logits = model(torch.tensor([full_ids])).logits[0].float()
            log_probs = logits[len(context_ids) - 1 : -1].log_softmax(-1)
            targets = torch.tensor(full_ids[len(context_ids) :])
            scores.append(log_probs.gather(-1, targets[:, None]).sum().item())
        correct.append(float(LETTERS[max(range(4), key=scores.__getitem__)] == row["answer"]))
    return sum(correct) / len(correct)


class TestEvalFiles:
    def test_sample_files(self):
        files = sample_eval_files()
        assert load_eval_file(files["sw"])[0] is GLOBAL_MMLU
        assert load_eval_file(files["zh"])[0] is M3KE
        assert all(len(load_eval_file(path)[1]) == 8 for path in files.values())

    def test_missing_option_names_the_row(self, tmp_path):
        rows = [dict(question="q", option_a="a", option_b="b", option_c="c", option_d="d", answer="A")] * 3
        rows = [*rows[:2], {key: value for key, value in rows[2].items() if key != "option_c"}]
        with pytest.raises(EvalFileError, match=r"row 3: missing column 'option_c'"):
            load_eval_file(_write_jsonl(tmp_path / "sw.jsonl", rows))

    def test_answer_outside_a_to_d_names_the_row(self, tmp_path):
        rows = [dict(question="q", A="a", B="b", C="c", D="d", answer=answer) for answer in ("A", " b ", "E")]
        with pytest.raises(EvalFileError, match=r"row 2: answer ' b ' is not one of A, B, C, D"):
            load_eval_file(_write_jsonl(tmp_path / "zh.jsonl", rows))
        with pytest.raises(EvalFileError, match=r"row 3: answer 'E'"):
            load_eval_file(_write_jsonl(tmp_path / "zh.jsonl", [rows[0], rows[0], rows[2]]))

    def test_csv_without_option_column(self, tmp_path):
        path = tmp_path / "hi.csv"
        path.write_text("question,option_a,option_b,option_d,answer\nq,a,b,d,A\n", encoding="utf-8")
        with pytest.raises(EvalFileError, match=r"row 1: missing column 'option_c'"):
            load_eval_file(str(path))

    def test_unknown_schema(self, tmp_path):
        with pytest.raises(EvalFileError, match="no option columns found"):
            load_eval_file(_write_jsonl(tmp_path / "x.jsonl", [dict(question="q", answer="A")]))

    def test_nothing_written_when_a_file_is_malformed(self, tmp_path):
        bad = _write_jsonl(tmp_path / "bad.jsonl", [dict(question="q", A="a", B="b", C="c", D="d", answer=4)])
        sources = parse_sources(files=[sample_eval_files()["sw"], f"xx={bad}"])
        with pytest.raises(EvalFileError, match="row 1"):
            write_local_tasks(sources, str(tmp_path / "tasks"))
        assert not (tmp_path / "tasks").exists()


class TestSources:
    @pytest.mark.parametrize(
        "task, language",
        [("global_mmlu_full_sw", "sw"), ("mgsm_direct_sw", "sw"), ("belebele_swh_Latn", "swh_Latn"), ("m3ke", "m3ke")],
    )
    def test_language_of_task(self, task, language):
        assert language_of_task(task) == language

    def test_explicit_languages_and_file_stems(self):
        sources = parse_sources(["swahili=belebele_swh_Latn"], ["data/global_mmlu_hi.jsonl", "yo=data/test.csv"])
        assert [(s.language, s.task, s.path) for s in sources] == [
            ("swahili", "belebele_swh_Latn", None),
            ("hi", "hf_sara_hi", "data/global_mmlu_hi.jsonl"),
            ("yo", "hf_sara_yo", "data/test.csv"),
        ]

    def test_duplicate_language_refused(self):
        with pytest.raises(ValueError, match="language 'sw' is given twice"):
            parse_sources(["global_mmlu_full_sw"], ["a/global_mmlu_sw.jsonl"])


class TestScores:
    def test_groups_filters_and_categories(self):
        """Group members are pooled per language; of several filters only the first counts (as in mgsm)."""
        doc = {"subject_category": "STEM"}
        results = {
            "group_subtasks": {
                "global_mmlu_full_sw": ["global_mmlu_full_sw_stem"],
                "global_mmlu_full_sw_stem": ["a", "b"],
            },
            "samples": {
                "a": [{"acc": 1.0, "doc": doc, "filter": "none"}, {"acc": 0.0, "doc": doc, "filter": "none"}],
                "b": [{"acc": 1.0, "doc": {"subject_category": "Other"}, "filter": "none"}],
                "mgsm_direct_sw": [
                    {"exact_match": 1.0, "doc": {}, "filter": "strict-match"},
                    {"exact_match": 0.0, "doc": {}, "filter": "strict-match"},
                    {"exact_match": 1.0, "doc": {}, "filter": "flexible-extract"},
                    {"exact_match": 1.0, "doc": {}, "filter": "flexible-extract"},
                ],
            },
        }
        sources = [EvalSource("sw", "global_mmlu_full_sw"), EvalSource("sw-math", "mgsm_direct_sw")]
        scores = scores_from_results(results, sources)
        assert (scores["sw"].metric, scores["sw"].items, scores["sw"].score) == ("acc", 3, 2 / 3)
        assert scores["sw"].categories == {"Other": (1, 1.0), "STEM": (2, 0.5)}
        assert (scores["sw-math"].metric, scores["sw-math"].items, scores["sw-math"].score) == ("exact_match", 2, 0.5)

    def test_empty_task_refused(self):
        with pytest.raises(ValueError, match="no scored items for 'x'"):
            scores_from_results({"samples": {}}, [EvalSource("sw", "x")])


class TestHarness:
    def test_accuracy_equals_direct_loglikelihood(self, tiny, sample_sources, tmp_path):
        model, tokenizer = tiny
        write_local_tasks(sample_sources, str(tmp_path))
        scores, summary = evaluate_model(model, tokenizer, sample_sources, tasks_dir=str(tmp_path), batch_size=4)
        direct = {source.language: _direct_accuracy(model, tokenizer, source.path) for source in sample_sources}
        assert {language: score.score for language, score in scores.items()} == pytest.approx(direct, abs=1e-9)
        assert {language: score.items for language, score in scores.items()} == {"en": 8, "sw": 8, "zh": 8}
        assert len(set(direct.values())) > 1  # the model is not blind to the questions
        assert summary["results"]["hf_sara_sw"]["acc,none"] == pytest.approx(scores["sw"].score)
        assert set(scores["sw"].categories) == {"STEM", "Social Sciences", "Humanities", "Other"}
        assert scores["zh"].categories == {}

    def test_few_shot_uses_other_questions_of_the_file(self, tiny, sample_sources, tmp_path):
        model, tokenizer = tiny
        write_local_tasks(sample_sources[1:2], str(tmp_path))
        scores, summary = evaluate_model(
            model, tokenizer, sample_sources[1:2], tasks_dir=str(tmp_path), num_fewshot=2, keep_samples=True
        )
        assert summary["n-shot"]["hf_sara_sw"] == 2 and scores["sw"].items == 8
        samples = summary["samples"]["hf_sara_sw"]
        assert len(samples) == 8
        for sample in samples:
            context, continuation = sample["arguments"][0]
            question = sample["doc"]["question"]
            assert continuation == " A" and context.count("\nAnswer:") == 3  # two solved examples, then the question
            assert context.count(question) == 1 and context.split("\n\n")[-1].startswith(question)
            assert context.split("\n\n")[0].split("\nAnswer: ")[1] in "ABCD"

    def test_cache_resumes_without_the_model(self, tiny, sample_sources, tmp_path):
        model, tokenizer = tiny
        write_local_tasks(sample_sources, str(tmp_path / "tasks"))
        options = dict(tasks_dir=str(tmp_path / "tasks"), cache_path=str(tmp_path / "cache" / "tiny"), batch_size=4)
        first, _ = evaluate_model(model, tokenizer, sample_sources[:2], **options)

        def broken_forward(*args, **kwargs):
            raise AssertionError("the cached evaluation ran the model")

        model.forward, original = broken_forward, model.forward
        try:
            again, _ = evaluate_model(model, tokenizer, sample_sources[:2], **options)
        finally:
            model.forward = original
        assert {k: v.score for k, v in again.items()} == {k: v.score for k, v in first.items()}


class TestCommand:
    def test_base_and_adapter(self, tiny_model_dir, tmp_path, capsys):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(str(tmp_path / "adapter"))
        output = tmp_path / "eval"
        args = ["eval", "--model", tiny_model_dir, "--adapter", str(tmp_path / "adapter"), "--batch-size", "4"]
        assert main([*args, "--output-dir", str(output)]) == 0
        printed = capsys.readouterr().out
        assert "| language | metric | items | base | adapter | delta |" in printed
        with open(output / "accuracy.csv", encoding="utf-8") as handle:
            rows = {row["language"]: row for row in csv.DictReader(handle)}
        assert set(rows) == {"en", "sw", "zh"}
        for row in rows.values():
            assert float(row["delta"]) == pytest.approx(float(row["adapter"]) - float(row["base"]))
        base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
        assert float(rows["sw"]["base"]) == pytest.approx(
            _direct_accuracy(base_model, tokenizer, sample_eval_files()["sw"])
        )
        for name in ("accuracy.md", "accuracy_by_category.csv", "lm_eval_results_adapter.json"):
            assert (output / name).is_file()
        assert len(os.listdir(output / "lm_eval_cache")) == 2  # one cache per model
        import matplotlib.image

        assert matplotlib.image.imread(str(output / "accuracy.png"))[..., :3].std() > 0.05

    def test_adapter_of_another_base_is_refused_before_loading(self, tiny_model_dir, tmp_path, capsys):
        """The check `hf-sara merge` makes. Was: the same shapes evaluated without a word, other shapes a state-dict
        traceback."""
        other = save_tiny_model(str(tmp_path / "other"), seed=5)  # another base of the same shapes
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(AutoModelForCausalLM.from_pretrained(other), lora).save_pretrained(str(tmp_path / "adapter"))
        output = tmp_path / "eval"
        args = ["eval", "--model", tiny_model_dir, "--adapter", str(tmp_path / "adapter"), "--output-dir", str(output)]
        code = main(args)
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and f"was trained on '{other}'" in errors[0], errors
        assert "--allow-base-name-mismatch" in errors[0] and not output.exists()
        smaller = tiny_config("qwen3_moe")  # hidden size 32, not 64
        AutoModelForCausalLM.from_config(smaller).save_pretrained(tmp_path / "smaller")
        code = main([*args[:2], str(tmp_path / "smaller"), *args[3:], "--allow-base-name-mismatch"])
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and "was not made for" in errors[0], errors
        assert not output.exists()

    def test_more_few_shot_examples_than_the_file_has(self, tmp_path, capsys):
        # Was: "Sample larger than population or is negative" from the harness, after loading the model.
        output = tmp_path / "out"
        sw = sample_eval_files()["sw"]
        code = main(
            ["eval", "--model", "unused", "--files", f"sw={sw}", "--num-fewshot", "20", "--output-dir", str(output)]
        )
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and "has 8 questions, too few for 20 few-shot examples" in errors[0]
        assert "use at most 7" in errors[0] and not output.exists()

    @pytest.mark.parametrize(
        "settings, match",
        [
            (dict(num_fewshot=-1), "num_fewshot must be an int >= 0"),
            (dict(batch_size=0), "batch_size must be an int >= 1 or 'auto'"),
            (dict(batch_size="eight"), "batch_size must be"),
            (dict(limit=0), "limit must be"),
            (dict(limit=-3.0), "limit must be"),
            (dict(max_length=0), "max_length must be"),
        ],
    )
    def test_settings_are_checked(self, settings, match):
        with pytest.raises(ValueError, match=match):
            EvalSettings(**settings)

    def test_malformed_file_is_one_line_error(self, tiny_model_dir, tmp_path, capsys):
        bad = _write_jsonl(tmp_path / "sw.jsonl", [dict(question="q", option_a="a", option_b="b", answer="A")])
        code = main(["eval", "--model", tiny_model_dir, "--files", bad, "--output-dir", str(tmp_path / "out")])
        assert code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "row 1: missing column 'option_c'" in error and "Traceback" not in error
        assert not (tmp_path / "out").exists()

    def test_unknown_harness_task_is_refused_before_loading(self, tmp_path, capsys):
        output = tmp_path / "out"
        # The model is checked for existence only: the task names are refused before it would be loaded.
        code = main(["eval", "--model", str(tmp_path), "--tasks", "belebele_swh_Latm", "--output-dir", str(output)])
        assert code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "no task or group 'belebele_swh_Latm'; did you mean belebele_swh_Latn" in error
        assert not output.exists()

    def test_missing_harness_is_explained(self, tiny_model_dir, tmp_path, capsys, monkeypatch):
        monkeypatch.setitem(sys.modules, "lm_eval", None)
        assert main(["eval", "--model", tiny_model_dir, "--output-dir", str(tmp_path / "out")]) == 2
        assert "pip install 'hf_sara[eval]'" in capsys.readouterr().err
