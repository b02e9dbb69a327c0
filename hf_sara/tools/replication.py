"""The published comparison, end to end: full fine-tuning with plain SFT, SARA on the middle band and SARA on all
layers (the ablation), from the same base, data, seed and budget; each arm and the base model evaluated per language,
one table beside the paper's numbers, and the routing analysis. Every finished step is kept: a rerun skips it."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from ..files.atomic import atomic_directory, atomic_write
from ..files.checkpoints import complete_checkpoint
from ..routing.layers import DEFAULT_LAYERS, resolve_layers
from ..routing.patching import patch_model
from ..testing import load_demo_pairs, save_tiny_model
from ..training.arguments import convert_training_arguments
from ..training.config import SARAConfig
from ..training.paired_data import anchored_subset, detect_paired_format, examples_only, plain_texts
from ..training.trainer import SARATrainer
from .analysis import RoutingReport, analyze_routing, write_report
from .evaluation.local_files import load_eval_file, sample_eval_files
from .evaluation.run import EvalSettings, evaluate_and_report
from .evaluation.sources import parse_sources
from .evaluation.tasks import check_few_shot
from .pairs import split_by_item
from .reporting import markdown_table, write_csv

BASE = "base"
# The trained arms: plain SFT (TRL's SFTTrainer, no alignment), SARA on the published band, SARA on every layer.
ARMS: dict[str, dict[str, Any] | None] = {
    "full_ft": None,
    "sara": {"sara_layers": DEFAULT_LAYERS},
    "sara_all_layers": {"sara_layers": "all"},
}
PUBLISHED_LANGUAGES = ("hi", "ne", "bn", "te", "sw")
_FLORES = {"hi": "hin_Deva", "ne": "npi_Deva", "bn": "ben_Beng", "te": "tel_Telu", "sw": "swh_Latn"}
_MGSM_LANGUAGES = ("bn", "te", "sw")  # MGSM has no Hindi or Nepali
# Qwen3-30B-A3B, mean accuracy (%) over hi, ne, bn, te, sw, as published (the all-layers ablation: Global-MMLU only).
PAPER_RESULTS: dict[str, dict[str, float]] = {
    "global_mmlu": {"full_ft": 70.73, "sara": 71.53, "sara_all_layers": 67.40},
    "belebele": {"full_ft": 82.95, "sara": 83.09},
    "mgsm": {"full_ft": 87.20, "sara": 87.40},
}
# The training settings an arm's weights depend on (besides the base model, the data and the arm's own settings):
# SARAConfig's own (but the anchors' path) and these of SFTConfig. Logging, saving, workers and memory savers are left
# out, so that a rerun changing them reuses the arms.
TRAINING_SETTINGS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "seed", "data_seed", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_ratio", "warmup_steps", "weight_decay",
    "optim", "optim_args", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "bf16", "fp16", "max_length",
    "packing", "packing_strategy", "padding_free", "completion_only_loss", "assistant_only_loss", "dataset_text_field",
    "chat_template_path", "loss_type", "label_smoothing_factor", "eos_token", "pad_token", "neftune_noise_alpha",
    "full_determinism", "train_sampling_strategy", "model_init_kwargs",
    "sara_weight", "sara_layers", "sara_loss_reduction", "sara_anchor_mode", "sara_warmup_ratio", "sara_pooling",
    "anchor_prefix", "anchor_sft_weight",
)  # fmt: skip
COMPLETE_FILE_NAME = "arm_complete.json"
SETTINGS_FILE_NAME = "arm_settings.json"
SCORES_FILE_NAME = "scores.json"
ANALYSED_FILE_NAME = "analysed.json"


def published_benchmarks(languages: Sequence[str] = PUBLISHED_LANGUAGES) -> dict[str, list[str]]:
    """The paper's harness tasks per benchmark, as `LANG=TASK`: Global-MMLU (full), BELEBELE and MGSM (direct)."""
    return {
        "global_mmlu": [f"{language}=global_mmlu_full_{language}" for language in languages],
        "belebele": [f"{language}=belebele_{_FLORES[language]}" for language in languages if language in _FLORES],
        "mgsm": [f"{language}=mgsm_direct_{language}" for language in languages if language in _MGSM_LANGUAGES],
    }


def parse_benchmarks(specs: Sequence[str]) -> dict[str, list[str]]:
    """`BENCHMARK:LANG=TASK_OR_FILE` specifications, grouped by benchmark (a local file is told by its existence)."""
    benchmarks: dict[str, list[str]] = {}
    for spec in specs:
        benchmark, separator, source = spec.partition(":")
        if not separator or not benchmark or "=" not in source:
            raise ValueError(
                f"Cannot read the benchmark {spec!r}: write BENCHMARK:LANG=TASK or BENCHMARK:LANG=FILE, e.g. "
                "global_mmlu:sw=global_mmlu_full_sw or belebele:sw=my_belebele_sw.jsonl."
            )
        benchmarks.setdefault(benchmark, []).append(source)
    return benchmarks


class Replication:
    """
    The published comparison in `output_dir`: `<arm>/model` (the trained model and tokenizer), `<arm>/run`
    (checkpoints), `eval/<model>/<benchmark>/` (the harness's report and `scores.json`), `analysis/` (routing figures)
    and `replication.md` / `.csv`.

    Args:
        output_dir (`str`): the root folder.
        model_name (`str`): the base model (name or path), loaded afresh for every arm.
        train_dataset ([`~datasets.Dataset`]): the paired training data; the SFT arm trains on its examples only.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): the base model's tokenizer.
        training_args ([`SARAConfig`]): the shared training settings (the published ones: see the recipe).
        benchmarks (`dict[str, list[str]]`): per benchmark, `LANG=TASK` or `LANG=FILE` sources for `hf-sara eval`.
        eval_settings ([`EvalSettings`]): how the models are evaluated.
        analysis_pairs ([`~datasets.Dataset`], *optional*): plain-text pairs for the routing analysis.
        model_kwargs (`dict`, *optional*): passed to `from_pretrained` when an arm loads the base model.
        log (`Callable[[str], None]`, *optional*): where progress goes.
    """

    def __init__(
        self,
        output_dir: str,
        model_name: str,
        train_dataset: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        training_args: SARAConfig,
        benchmarks: Mapping[str, list[str]],
        eval_settings: EvalSettings,
        analysis_pairs: Dataset | None = None,
        model_kwargs: dict[str, Any] | None = None,
        log: Callable[[str], None] = print,
    ):
        self.paired_format = detect_paired_format(
            train_dataset.column_names, training_args.anchor_prefix, training_args.dataset_text_field
        )
        self.sources = {}
        for benchmark, specs in benchmarks.items():
            if not specs:
                raise ValueError(f"The benchmark {benchmark!r} has no source.")
            self.sources[benchmark] = parse_sources(
                [spec for spec in specs if not _is_file(spec)], [spec for spec in specs if _is_file(spec)]
            )
            for source in self.sources[benchmark]:
                if source.path is not None:  # missing, malformed or too short files refused now, not after training
                    check_few_shot(source.path, len(load_eval_file(source.path)[1]), eval_settings.num_fewshot)
        if analysis_pairs is not None:  # checked now, not after hours of training
            paired_format = detect_paired_format(analysis_pairs.column_names, training_args.anchor_prefix)
            plain_texts(anchored_subset(analysis_pairs, paired_format).select([0]), paired_format)
        self.output_dir = output_dir
        self.model_name = model_name
        self.train_dataset = train_dataset
        self.tokenizer = tokenizer
        self.training_args = training_args
        self.benchmarks = dict(benchmarks)
        self.eval_settings = eval_settings
        self.analysis_pairs = analysis_pairs
        self._pairs_digest = None
        if analysis_pairs is not None:
            rows = json.dumps(analysis_pairs.to_dict(), sort_keys=True, default=str)
            self._pairs_digest = hashlib.sha256(rows.encode()).hexdigest()
        self.model_kwargs = model_kwargs or {}
        self.log = log
        self._data_digest = None

    def arm_identity(self, arm: str) -> dict[str, Any]:
        """What a trained arm's weights depend on: the base model, its loading, the data and the training settings."""
        if self._data_digest is None:
            digest = hashlib.sha256()
            for batch in self.train_dataset.iter(batch_size=1000):
                digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
            self._data_digest = digest.hexdigest()
        settings = {name: getattr(self.training_args, name, None) for name in TRAINING_SETTINGS}
        model = self.model_name  # a local folder by its real path, however it is written
        identity = {
            "model": os.path.realpath(model) if os.path.isdir(model) else model,
            "model_kwargs": self.model_kwargs,
            "data": self._data_digest,
            "arm": ARMS[arm],
            "training": settings,
        }
        return json.loads(json.dumps(identity, sort_keys=True, default=str))

    def _check_arm(self, arm: str) -> None:
        """Refuses an arm folder trained (or begun) from another base, data or settings than this run's."""
        path = os.path.join(self.output_dir, arm, SETTINGS_FILE_NAME)
        if not os.path.isfile(path):
            return  # not begun, or by an hf_sara that did not record it
        recorded, current = _read_json(path), self.arm_identity(arm)
        if recorded == current:
            return
        changed = [
            f"{key}: {recorded.get(key)!r} there, {current[key]!r} now"
            for key in ("model", "model_kwargs", "data", "arm")
            if recorded.get(key) != current[key]
        ]
        old_training = recorded.get("training", {})
        changed += [
            f"{name}: {old_training.get(name)!r} there, {value!r} now"
            for name, value in current["training"].items()
            if old_training.get(name) != value
        ]
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        folder = os.path.join(self.output_dir, arm)
        raise ValueError(
            f"The arm {arm} in {folder} was trained from other settings than this run's ({shown}): its results would "
            "mix with this run's. Use another --output_dir for these settings, or rerun with the settings it was "
            f"trained with (or delete {folder}, which hf-sara replicate wrote, to train it again)."
        )

    def check_trained_arms(self) -> None:
        """Refuses, before anything runs, any arm in `output_dir` begun from another base, data or settings."""
        for arm in ARMS:
            self._check_arm(arm)

    # Training ---------------------------------------------------------------------------------------------------

    def model_dir(self, arm: str) -> str:
        return self.model_name if arm == BASE else os.path.join(self.output_dir, arm, "model")

    def _record_path(self, arm: str) -> str:
        return os.path.join(self.output_dir, arm, COMPLETE_FILE_NAME)

    def is_trained(self, arm: str) -> bool:
        return os.path.isfile(self._record_path(arm))

    def _identity(self, arm: str) -> dict[str, Any]:
        """What a model's results depend on: the base model's name, or the trained arm's record."""
        if arm == BASE:
            return {"model": self.model_name, "revision": self.model_kwargs.get("revision")}
        return _read_json(self._record_path(arm))

    def train(self, arm: str) -> None:
        """Trains one arm from the base model and saves it, unless a finished run of it is there already."""
        if arm not in ARMS:
            raise ValueError(f"Unknown arm {arm!r}: choose from {', '.join(ARMS)}.")
        self._check_arm(arm)
        if self.is_trained(arm):
            self.log(f"{arm}: trained already ({os.path.join(self.output_dir, arm)}), skipped")
            return
        settings_path = os.path.join(self.output_dir, arm, SETTINGS_FILE_NAME)
        if not os.path.isfile(settings_path) and PartialState().is_main_process:
            os.makedirs(os.path.dirname(settings_path), exist_ok=True)
            _write_json(settings_path, self.arm_identity(arm))  # before training: a resumed run is checked too
        run_dir = os.path.join(self.output_dir, arm, "run")
        args = dataclasses.replace(self.training_args, output_dir=run_dir, **(ARMS[arm] or {}))
        model = AutoModelForCausalLM.from_pretrained(self.model_name, **self.model_kwargs)
        if ARMS[arm] is None:
            trainer = SFTTrainer(
                model=model,
                args=convert_training_arguments(args, SFTConfig),
                train_dataset=examples_only(self.train_dataset, self.paired_format),
                processing_class=self.tokenizer,
            )
        else:
            trainer = SARATrainer(
                model=patch_model(model), args=args, train_dataset=self.train_dataset, processing_class=self.tokenizer
            )
        # An interrupted arm resumes from its last complete checkpoint (one cut short while saving is skipped).
        resume = complete_checkpoint(True, run_dir, args.max_steps, required=False)
        self.log(f"{arm}: training" + (f", resumed from {resume}" if resume else ""))
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(self.model_dir(arm))
        if trainer.is_world_process_zero():
            self.tokenizer.save_pretrained(self.model_dir(arm))
            record = {"arm": arm, "settings": ARMS[arm], "steps": result.global_step, "loss": result.training_loss}
            _write_json(self._record_path(arm), record)
        trainer.accelerator.wait_for_everyone()

    # Evaluation -------------------------------------------------------------------------------------------------

    def evaluate(self, arm: str) -> dict[str, dict[str, float]]:
        """
        Accuracy per benchmark and language of one model (`"base"` or a trained arm). Kept beside what it depends on
        (the model, the sources, the evaluation settings) and reused only while they are the same.
        """
        if arm != BASE and not self.is_trained(arm):
            raise ValueError(f"The arm {arm!r} is not trained yet: run its training first.")
        results = {}
        for benchmark, sources in self.sources.items():
            folder = os.path.join(self.output_dir, "eval", arm, benchmark)
            scores_path = os.path.join(folder, SCORES_FILE_NAME)
            depends_on = {
                "model": self._identity(arm),
                "sources": [dataclasses.asdict(source) for source in sources],
                "settings": dataclasses.asdict(self.eval_settings),
            }
            kept = _read_json(scores_path) if os.path.isfile(scores_path) else None
            if kept is not None and kept.get("depends_on") == json.loads(json.dumps(depends_on)):
                results[benchmark] = kept["scores"]
                continue
            self.log(f"{arm}: evaluating {benchmark}")
            scores, _ = evaluate_and_report(self.model_dir(arm), None, sources, folder, self.eval_settings, self.log)
            results[benchmark] = {language: score.score for language, score in scores["model"].items()}
            _write_json(scores_path, {"depends_on": depends_on, "scores": results[benchmark]})
        return results

    # Routing analysis -------------------------------------------------------------------------------------------

    def analyze(self, arms: Sequence[str]) -> dict[str, str]:
        """Routing divergence to the anchors per language and layer, for the base and the given arms: figures."""
        if self.analysis_pairs is None:
            return {}
        folder = os.path.join(self.output_dir, "analysis")
        done_path = os.path.join(folder, ANALYSED_FILE_NAME)
        depends_on = {
            "models": {arm: self._identity(arm) for arm in (BASE, *arms)},
            "pairs": self._pairs_digest,
        }
        if os.path.isfile(done_path) and _read_json(done_path).get("depends_on") == depends_on:
            return _read_json(done_path)["paths"]
        tokenizer = copy.deepcopy(self.tokenizer)  # right padding, a pad token: as `hf-sara analyze` sets them
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        settings = self.eval_settings
        placement = {"device_map": settings.device_map} if settings.device_map else {}
        reports: dict[str, RoutingReport] = {}
        for arm in (BASE, *arms):
            model = AutoModelForCausalLM.from_pretrained(self.model_dir(arm), **self.model_kwargs, **placement)
            if not placement:
                model = model.to(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
            reports[arm] = analyze_routing(patch_model(model), tokenizer, self.analysis_pairs)
            del model  # one model in memory at a time
        num_layers = len(next(iter(reports[BASE].divergence.values())))
        paths = write_report(reports, folder, resolve_layers(DEFAULT_LAYERS, num_layers))
        _write_json(done_path, {"depends_on": depends_on, "paths": paths})
        return paths

    # Report -----------------------------------------------------------------------------------------------------

    def report(self, results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> tuple[list[dict[str, object]], dict]:
        """The table (one row per benchmark, accuracy % averaged over its languages) and where it was written."""
        rows = replication_table(results, self.benchmarks)
        paths = {
            "markdown": os.path.join(self.output_dir, "replication.md"),
            "csv": os.path.join(self.output_dir, "replication.csv"),
        }
        with atomic_write(paths["markdown"]) as path, open(path, "w", encoding="utf-8") as handle:
            handle.write(
                "Accuracy (%) averaged over each benchmark's languages, beside the published Qwen3-30B-A3B numbers "
                f"(mean of {', '.join(PUBLISHED_LANGUAGES)}):\n\n{markdown_table(rows, '.2f')}\n"
            )
        with atomic_write(paths["csv"]) as path:
            write_csv(path, rows)
        return rows, paths

    def run(self, arms: Sequence[str] = tuple(ARMS), with_evaluation: bool = True) -> dict[str, Any]:
        """
        Trains the arms (skipping finished ones), then, with `with_evaluation`, evaluates the base and every trained
        arm, writes the table, and analyses their routing.
        """
        for arm in arms:
            self.train(arm)
        if not with_evaluation:
            return {}
        trained = [arm for arm in ARMS if self.is_trained(arm)]
        for arm in trained:
            self._check_arm(arm)
        results = {arm: self.evaluate(arm) for arm in (BASE, *trained)}
        rows, table_paths = self.report(results)  # before the analysis: the table does not wait for it
        analysis_paths = {f"analysis_{kind}": path for kind, path in self.analyze(trained).items()}
        return {"results": results, "rows": rows, "paths": {**table_paths, **analysis_paths}}


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _write_json(path: str, value: Any) -> None:
    with atomic_write(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)


_EVAL_FILE_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _is_file(spec: str) -> bool:
    """Whether a `LANG=SOURCE` names a local file: one that exists, or a path (harness task names are neither)."""
    source = spec.partition("=")[2] or spec
    return (
        os.path.isfile(source) or os.sep in source or "/" in source or source.lower().endswith(_EVAL_FILE_EXTENSIONS)
    )


def replication_table(
    results: Mapping[str, Mapping[str, Mapping[str, float]]], benchmarks: Mapping[str, Sequence[str]]
) -> list[dict[str, object]]:
    """One row per benchmark: its languages, each model's mean accuracy (%) over them, and the paper's numbers."""
    rows = []
    for benchmark in benchmarks:
        languages = sorted({language for scores in results.values() for language in scores.get(benchmark, {})})
        row: dict[str, object] = {"benchmark": benchmark, "languages": ",".join(languages)}
        for model in (BASE, *ARMS):
            scores = results.get(model, {}).get(benchmark)
            row[model] = 100 * sum(scores.values()) / len(scores) if scores else "-"
        for arm in ARMS:
            published = PAPER_RESULTS.get(benchmark, {}).get(arm)
            row[f"paper {arm}"] = published if published is not None else "-"
        rows.append(row)
    return rows


def tiny_setup(output_dir: str, training_args: SARAConfig) -> tuple[str, Dataset, Dataset, SARAConfig, list[str]]:
    """
    The tiny offline replication: a tiny untrained Qwen3-MoE saved in `output_dir/tiny-model`, the embedded pairs split
    by item, a 4-step budget (fp32, on the device the arguments chose), and the shipped Swahili and English sample
    questions as one benchmark.

    Returns:
        `tuple`: the model folder, the training and analysis pairs, the training arguments and the benchmarks.
    """
    model_dir = os.path.join(output_dir, "tiny-model")
    if not os.path.isdir(model_dir):
        with atomic_directory(model_dir) as staging:  # a killed run leaves no half-saved model
            save_tiny_model(staging)
    train, test = split_by_item(load_demo_pairs())
    budget = dict(max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=1)
    budget.update(bf16=False, gradient_checkpointing=False, max_length=64, logging_steps=1, report_to=[])
    samples = sample_eval_files()
    benchmarks = [f"global_mmlu:{language}={samples[language]}" for language in ("sw", "en")]
    return model_dir, train, test, dataclasses.replace(training_args, **budget), benchmarks
