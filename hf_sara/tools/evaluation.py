"""Per-language accuracy through lm-evaluation-harness: harness tasks and local Global-MMLU / M3KE files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..files.package_data import package_data_path
from ..training.paired_data import LANGUAGE_COLUMN
from .eval_files import load_eval_file
from .loading import load_tokenizer
from .reporting import markdown_table, new_figure, write_csv, write_into

TASK_TEMPLATES_DIR = package_data_path("eval_tasks")
PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "f1")
_FLORES_CODE = re.compile(r"[a-z]{3}_[A-Z][a-z]{3}$")


@dataclass(frozen=True)
class EvalSource:
    """
    What is evaluated for one language.

    Args:
        language (`str`): the language code the accuracy is reported under.
        task (`str`): a harness task or group name (e.g. `global_mmlu_full_sw`), or the name `hf-sara eval` gives to
            the task of a local file.
        path (`str`, *optional*): the local file, for local-file sources.
    """

    language: str
    task: str
    path: str | None = None


@dataclass
class LanguageScore:
    """Accuracy of one model on one language: overall and per subject category (when the items have one)."""

    metric: str
    items: int
    score: float
    categories: dict[str, tuple[int, float]] = field(default_factory=dict)


def require_lm_eval():
    """Imports lm-evaluation-harness, or explains how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ImportError(
            "`hf-sara eval` runs lm-evaluation-harness, which is not installed: `pip install 'hf_sara[eval]'` "
            "(or `pip install 'lm_eval[hf]'`)."
        ) from None
    return lm_eval


def language_of_task(task: str) -> str:
    """
    The language a harness task name ends with: `global_mmlu_full_sw` -> `sw`, `mgsm_direct_sw` -> `sw`,
    `belebele_swh_Latn` -> `swh_Latn`.
    """
    match = _FLORES_CODE.search(task)
    return match.group(0) if match else task.rsplit("_", 1)[-1]


def _split_language(spec: str) -> tuple[str | None, str]:
    language, separator, value = spec.partition("=")
    return (language, value) if separator and language and "/" not in language else (None, spec)


def parse_sources(tasks: Sequence[str] = (), files: Sequence[str] = ()) -> list[EvalSource]:
    """
    Sources from `LANG=TASK` / `TASK` and `LANG=FILE` / `FILE` specifications. Without `LANG=`, a task's language
    is read from its name (`language_of_task`) and a file's from its name's last `_`-separated part
    (`global_mmlu_sw.jsonl` -> `sw`). Languages must be unique.
    """
    sources = []
    for spec in tasks:
        language, task = _split_language(spec)
        sources.append(EvalSource(language or language_of_task(task), task))
    for spec in files:
        language, path = _split_language(spec)
        stem = os.path.splitext(os.path.basename(path))[0]
        language = language or stem.rsplit("_", 1)[-1]
        sources.append(EvalSource(language, f"hf_sara_{re.sub(r'[^0-9A-Za-z_]', '_', language)}", path))
    seen: dict[str, str] = {}
    tasks: dict[str, str] = {}
    for source in sources:
        if source.language in seen:
            raise ValueError(
                f"language {source.language!r} is given twice; name each source's language with LANG=TASK or LANG=FILE"
            )
        seen[source.language] = source.task
        if source.task in tasks:
            raise ValueError(
                f"languages {tasks[source.task]!r} and {source.language!r} both become the harness task "
                f"{source.task!r} (task names keep letters, digits and '_' only); give them names that differ there"
            )
        tasks[source.task] = source.language
    return sources


def write_local_tasks(sources: Sequence[EvalSource], directory: str) -> list[str]:
    """
    Validates each local file and writes, into `directory`, its rows as JSONL and a harness task YAML that includes
    the packaged template of its schema. Returns the written task files. Nothing is written if a file is malformed.
    """
    local = [(source, *load_eval_file(source.path)) for source in sources if source.path is not None]
    if local:
        os.makedirs(directory, exist_ok=True)
    written = []
    for source, schema, rows in local:
        data_path = os.path.join(directory, f"{source.task}.jsonl")
        with open(data_path, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps({**row, LANGUAGE_COLUMN: source.language}, ensure_ascii=False) + "\n")
        task_path = os.path.join(directory, f"{source.task}.yaml")
        with open(task_path, "w", encoding="utf-8") as handle:
            handle.write(f"# {source.language}: {os.path.abspath(source.path)} ({schema.name} schema)\n")
            handle.write(f"include: {json.dumps(os.path.join(TASK_TEMPLATES_DIR, schema.name + '.yaml'))}\n")
            handle.write(f"task: {source.task}\n")
            handle.write(f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(os.path.abspath(data_path))}\n")
        written.append(task_path)
    return written


def task_manager_for(tasks_dir: str | None = None):
    """The harness's `TaskManager`, with the tasks `write_local_tasks` wrote to `tasks_dir` registered."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir) if tasks_dir else TaskManager()


def check_task_names(sources: Sequence[EvalSource], task_manager) -> None:
    """Refuses, before any model is loaded, task names the harness does not know, suggesting close ones."""
    import difflib

    known = task_manager.all_tasks
    for source in sources:
        if source.path is None and source.task not in known:
            close = difflib.get_close_matches(source.task, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (`lm_eval ls tasks` lists them)"
            raise ValueError(f"lm-evaluation-harness has no task or group {source.task!r}{hint}")


def model_fingerprint(*references: str | None) -> str:
    """
    A short hash naming a model (and adapter) for the harness's response cache, whose keys are the requests only:
    local folders contribute their config and the size and time of their weight files, Hub names contribute the name.
    """
    digest = hashlib.sha256()
    for reference in references:
        if reference is None:
            continue
        digest.update(reference.encode())
        if os.path.isdir(reference):
            for name in sorted(os.listdir(reference)):
                path = os.path.join(reference, name)
                if name.endswith((".json", ".safetensors", ".bin")) and os.path.isfile(path):
                    stat = os.stat(path)
                    digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _leaf_tasks(task: str, group_subtasks: Mapping[str, list[str]]) -> list[str]:
    if task not in group_subtasks:
        return [task]
    return [leaf for child in group_subtasks[task] for leaf in _leaf_tasks(child, group_subtasks)]


def _primary_metric(sample: Mapping[str, Any]) -> str:
    for metric in PRIMARY_METRICS:
        if metric in sample:
            return metric
    metrics = sample.get("metrics") or []
    if metrics:
        return metrics[0]
    raise ValueError(f"no metric found in the harness's samples (keys: {sorted(sample)})")


def _category(doc: Mapping[str, Any]) -> str | None:
    for column in ("subject_category", "subject"):
        value = doc.get(column)
        if isinstance(value, str) and value:
            return value
    return None


def scores_from_results(results: Mapping[str, Any], sources: Sequence[EvalSource]) -> dict[str, LanguageScore]:
    """
    Accuracy per language from the per-item samples of `lm_eval.simple_evaluate(..., log_samples=True)`: the mean of
    the primary metric (`acc` for multiple choice, `exact_match` for generation) over every item of the source's
    leaf tasks, with the first filter of a task when it has several; per subject category as well.
    """
    group_subtasks = results.get("group_subtasks", {})
    scores = {}
    for source in sources:
        values: list[float] = []
        by_category: dict[str, list[float]] = defaultdict(list)
        metric = None
        for leaf in _leaf_tasks(source.task, group_subtasks):
            samples = results["samples"].get(leaf, [])
            if not samples:
                continue
            first_filter = samples[0].get("filter")
            for sample in samples:
                if sample.get("filter") != first_filter:
                    continue
                metric = metric or _primary_metric(sample)
                value = float(sample[metric])
                values.append(value)
                category = _category(sample.get("doc", {}))
                if category is not None:
                    by_category[category].append(value)
        if not values:
            raise ValueError(f"the harness returned no scored items for {source.task!r} ({source.language})")
        scores[source.language] = LanguageScore(
            metric=metric,
            items=len(values),
            score=sum(values) / len(values),
            categories={name: (len(v), sum(v) / len(v)) for name, v in sorted(by_category.items())},
        )
    return scores


def evaluate_model(
    model,
    tokenizer,
    sources: Sequence[EvalSource],
    *,
    tasks_dir: str | None = None,
    task_manager=None,
    num_fewshot: int | None = None,
    batch_size: int | str = 8,
    limit: int | float | None = None,
    cache_path: str | None = None,
    apply_chat_template: bool = False,
    max_length: int | None = None,
    keep_samples: bool = False,
) -> tuple[dict[str, LanguageScore], dict[str, Any]]:
    """
    Evaluates a loaded model (a `PreTrainedModel` or a `PeftModel`) with `lm_eval.simple_evaluate` and its
    Hugging Face model class, and returns the scores per language and the harness's results (without the per-item
    samples unless `keep_samples`).

    Args:
        model, tokenizer: the model to evaluate and its tokenizer.
        sources (`Sequence[EvalSource]`): what to evaluate, one source per language.
        tasks_dir (`str`, *optional*): the folder holding the task YAMLs written by `write_local_tasks`; required
            when a source is a local file.
        task_manager (`lm_eval.tasks.TaskManager`, *optional*): reuse one (indexing the harness's tasks takes
            seconds); by default one is made for `tasks_dir`.
        num_fewshot (`int`, *optional*): few-shot examples per question (the tasks' own default when `None`).
        batch_size (`int` or `"auto"`): the harness's batch size.
        limit (`int` or `float`, *optional*): evaluate only the first items of each task (for quick checks).
        cache_path (`str`, *optional*): the harness's response cache (an SQLite file per rank): an interrupted
            evaluation with the same cache resumes where it stopped. It is keyed by the requests only, so give each
            model its own path (see `model_fingerprint`).
        apply_chat_template (`bool`): format the prompts with the tokenizer's chat template.
        max_length (`int`, *optional*): the longest input; the model config's by default.
        keep_samples (`bool`): also return the harness's per-item samples (prompts, answers, scores) under
            `"samples"`.
    """
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if any(source.path is not None for source in sources) and tasks_dir is None and task_manager is None:
        raise ValueError("local evaluation files need `tasks_dir`, the folder `write_local_tasks` wrote them to")
    if cache_path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    results = simple_evaluate(
        model=harness_model,
        tasks=[source.task for source in sources],
        task_manager=task_manager or task_manager_for(tasks_dir),
        num_fewshot=num_fewshot,
        limit=limit,
        use_cache=cache_path,
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=apply_chat_template,
    )
    scores = scores_from_results(results, sources)
    summary = {key: value for key, value in results.items() if keep_samples or key != "samples"}
    return scores, summary


def accuracy_table(scores: Mapping[str, Mapping[str, LanguageScore]]) -> list[dict[str, object]]:
    """One row per language: its item count and each model's score, plus `delta` (last minus first) for two models."""
    names = list(scores)
    first = scores[names[0]]
    rows = []
    for language, score in first.items():
        row: dict[str, object] = {LANGUAGE_COLUMN: language, "metric": score.metric, "items": score.items}
        for name in names:
            row[name] = scores[name][language].score
        if len(names) == 2:
            row["delta"] = scores[names[1]][language].score - scores[names[0]][language].score
        rows.append(row)
    return rows


def category_table(scores: Mapping[str, Mapping[str, LanguageScore]]) -> list[dict[str, object]]:
    """One row per language and subject category, for the sources whose items name a category."""
    names = list(scores)
    rows = []
    for language, score in scores[names[0]].items():
        for category, (items, _) in score.categories.items():
            row: dict[str, object] = {LANGUAGE_COLUMN: language, "category": category, "items": items}
            for name in names:
                row[name] = scores[name][language].categories[category][1]
            rows.append(row)
    return rows


def plot_accuracy(scores: Mapping[str, Mapping[str, LanguageScore]], path: str) -> None:
    """Grouped bar chart: per language, one bar per model."""
    names = list(scores)
    languages = list(scores[names[0]])
    width = 0.8 / len(names)
    figure = new_figure(figsize=(1.2 + 1.1 * len(languages) * max(1, len(names) / 2), 3.6))
    axis = figure.subplots()
    for index, name in enumerate(names):
        positions = [position + (index - (len(names) - 1) / 2) * width for position in range(len(languages))]
        values = [scores[name][language].score for language in languages]
        bars = axis.bar(positions, values, width=width, label=name)
        axis.bar_label(bars, labels=[f"{value:.2f}" for value in values], fontsize="x-small", padding=2)
    axis.set_xticks(range(len(languages)), languages)
    axis.set_ylim(0, 1.08)
    axis.set_ylabel(scores[names[0]][languages[0]].metric)
    axis.set_title("Accuracy per language")
    axis.grid(axis="y", alpha=0.3)
    if len(names) > 1:
        axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def write_eval_report(
    scores: Mapping[str, Mapping[str, LanguageScore]], output_dir: str, summaries: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """
    Writes `accuracy.md` and `accuracy.csv` (per language; per category too when the items have one),
    `accuracy_by_category.csv`, `accuracy.png` and, when given, the harness's results per model as
    `lm_eval_results_<model>.json` into `output_dir`. Returns the paths by kind.
    """
    os.makedirs(output_dir, exist_ok=True)
    rows = accuracy_table(scores)
    categories = category_table(scores)
    paths = {
        "markdown": os.path.join(output_dir, "accuracy.md"),
        "csv": os.path.join(output_dir, "accuracy.csv"),
        "chart": os.path.join(output_dir, "accuracy.png"),
    }
    with open(paths["markdown"], "w", encoding="utf-8") as handle:
        handle.write("Accuracy per language (lm-evaluation-harness):\n\n" + markdown_table(rows) + "\n")
        if categories:
            handle.write("\nPer subject category:\n\n" + markdown_table(categories) + "\n")
    write_csv(paths["csv"], rows)
    if categories:
        paths["categories"] = os.path.join(output_dir, "accuracy_by_category.csv")
        write_csv(paths["categories"], categories)
    plot_accuracy(scores, paths["chart"])
    for name, summary in (summaries or {}).items():
        key = "results_" + re.sub(r"[^0-9A-Za-z]", "_", name)
        paths[key] = os.path.join(output_dir, f"lm_eval_{key}.json")
        with open(paths[key], "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, default=str)
    return paths


@dataclass(frozen=True)
class EvalSettings:
    """
    How [`evaluate_and_report`] loads and evaluates the models.

    Args:
        num_fewshot (`int`, *optional*): few-shot examples (default: the task's own).
        batch_size (`int` or `"auto"`): the harness's batch size.
        limit (`float`, *optional*): only the first N items (or a fraction < 1) per task.
        max_length (`int`, *optional*): longest input (default: the model's).
        device (`str`, *optional*): default: cuda when available, else cpu.
        dtype (`str`): `"auto"`, `"bfloat16"`, `"float16"` or `"float32"`.
        apply_chat_template (`bool`): format prompts with the chat template.
        use_cache (`bool`): keep the harness's response cache under `<output_dir>/lm_eval_cache`.
        trust_remote_code (`bool`): passed to `from_pretrained`.
        device_map (`str`, *optional*): passed to `from_pretrained` (e.g. `"auto"` to spread a model that does not
            fit one GPU over all of them); `device` is then ignored.
    """

    num_fewshot: int | None = None
    batch_size: int | str = 8
    limit: float | None = None
    max_length: int | None = None
    device: str | None = None
    dtype: str = "auto"
    apply_chat_template: bool = False
    use_cache: bool = True
    trust_remote_code: bool = False
    device_map: str | None = None


def evaluate_and_report(
    model_name: str,
    adapter: str | None,
    sources: Sequence[EvalSource],
    output_dir: str,
    settings: EvalSettings,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, dict[str, LanguageScore]], dict[str, str]]:
    """
    Evaluates a model, or a base model and its PEFT adapter, on `sources` and writes the report into `output_dir`.

    Task names are checked before the model is loaded; local files are validated and written as harness tasks into
    `<output_dir>/harness_tasks` (so `lm_eval --include_path` reproduces the run); nothing is left in `output_dir`
    when the evaluation fails and `output_dir` did not exist before.

    Returns:
        `tuple`: the scores per model (`"model"`, or `"base"` and `"adapter"`) and language, and the report's paths.
    """
    tasks_dir = os.path.join(output_dir, "harness_tasks")
    task_manager = task_manager_for()
    check_task_names(sources, task_manager)  # before loading the model, which can take minutes
    created = [path for path in (output_dir, tasks_dir) if not os.path.exists(path)]
    try:
        return _evaluate_and_report(model_name, adapter, sources, output_dir, tasks_dir, task_manager, settings, log)
    except BaseException:
        for path in created:  # leave no partial output behind
            shutil.rmtree(path, ignore_errors=True)
        raise


def _evaluate_and_report(model_name, adapter, sources, output_dir, tasks_dir, task_manager, settings, log):
    import torch
    from transformers import AutoModelForCausalLM

    if write_local_tasks(sources, tasks_dir):  # validated row by row before anything is written
        task_manager = task_manager_for(tasks_dir)
    limit = settings.limit
    limit = int(limit) if limit is not None and limit >= 1 else limit
    # The harness's cache is keyed by request only: what changes the answers to the same requests goes in its name.
    fingerprint_settings = (
        f"dtype={settings.dtype};max_length={settings.max_length};chat_template={settings.apply_chat_template}"
    )
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = settings.dtype if settings.dtype == "auto" else getattr(torch, settings.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        model_name, dtype=dtype, trust_remote_code=settings.trust_remote_code, device_map=settings.device_map
    )
    if settings.device_map is None:
        model = model.to(device)
    model.eval()
    tokenizer = load_tokenizer(model_name, adapter, trust_remote_code=settings.trust_remote_code)

    def evaluate(label: str, evaluated, *references: str | None):
        cache = None
        if settings.use_cache:
            cache = os.path.join(output_dir, "lm_eval_cache", model_fingerprint(*references, fingerprint_settings))
        log(f"Evaluating the {label} on {', '.join(source.language for source in sources)}")
        return evaluate_model(
            evaluated,
            tokenizer,
            sources,
            tasks_dir=tasks_dir,
            task_manager=task_manager,
            num_fewshot=settings.num_fewshot,
            batch_size=settings.batch_size,
            limit=limit,
            cache_path=cache,
            apply_chat_template=settings.apply_chat_template,
            max_length=settings.max_length,
        )

    scores, summaries = {}, {}
    label = "base" if adapter else "model"
    scores[label], summaries[label] = evaluate(label, model, model_name)
    if adapter:
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(model, adapter).eval()
        scores["adapter"], summaries["adapter"] = evaluate("adapter", adapted, model_name, adapter)
    paths = write_into(output_dir, lambda staging: write_eval_report(scores, staging, summaries))
    return scores, paths
