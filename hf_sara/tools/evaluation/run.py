"""Running an evaluation: a loaded model through lm-evaluation-harness, and a model (with its adapter) loaded,
evaluated and reported."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import inf
from typing import Any

from ..loading import load_tokenizer, parse_dtype
from ..reporting import write_into
from .report import write_eval_report
from .scores import LanguageScore, scores_from_results
from .sources import EvalSource
from .tasks import check_task_names, require_lm_eval, task_manager_for, write_local_tasks


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

    def __post_init__(self):
        def number(value, *, minimum, integer) -> bool:
            kinds = (int,) if integer else (int, float)
            return isinstance(value, kinds) and not isinstance(value, bool) and value >= minimum

        problems = []
        if self.num_fewshot is not None and not number(self.num_fewshot, minimum=0, integer=True):
            problems.append(f"num_fewshot must be an int >= 0 or None, not {self.num_fewshot!r}")
        if self.batch_size != "auto" and not number(self.batch_size, minimum=1, integer=True):
            problems.append(f"batch_size must be an int >= 1 or 'auto', not {self.batch_size!r}")
        if self.limit is not None and not (number(self.limit, minimum=0, integer=False) and 0 < self.limit < inf):
            problems.append(f"limit must be a number of items (>= 1) or a fraction (0 to 1), not {self.limit!r}")
        if self.max_length is not None and not number(self.max_length, minimum=1, integer=True):
            problems.append(f"max_length must be an int >= 1 or None, not {self.max_length!r}")
        if problems:
            raise ValueError(f"EvalSettings: {'; '.join(problems)}.")


def evaluate_and_report(
    model_name: str,
    adapter: str | None,
    sources: Sequence[EvalSource],
    output_dir: str,
    settings: EvalSettings,
    log: Callable[[str], None] = print,
    allow_base_name_mismatch: bool = False,
) -> tuple[dict[str, dict[str, LanguageScore]], dict[str, str]]:
    """
    Evaluates a model, or a base model and its PEFT adapter, on `sources` and writes the report into `output_dir`.

    An adapter not made for the base is refused before any weight loads ([`check_adapter_fits_base`]: its recorded
    base, class, modules and shapes; `allow_base_name_mismatch` accepts a base named otherwise). Task names are
    checked before the model is loaded; local files are validated and written as harness tasks into
    `<output_dir>/harness_tasks` (so `lm_eval --include_path` reproduces the run); nothing is left in `output_dir`
    when the evaluation fails and `output_dir` did not exist before.

    Returns:
        `tuple`: the scores per model (`"model"`, or `"base"` and `"adapter"`) and language, and the report's paths.
    """
    if adapter is not None:
        from ..merge import check_adapter_fits_base

        check_adapter_fits_base(
            model_name, adapter, allow_base_name_mismatch, settings.trust_remote_code, lora_only=False
        )
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

    if write_local_tasks(sources, tasks_dir, settings.num_fewshot):  # validated row by row before anything is written
        task_manager = task_manager_for(tasks_dir)
    limit = settings.limit
    limit = int(limit) if limit is not None and limit >= 1 else limit
    # The harness's cache is keyed by request only: what changes the answers to the same requests goes in its name.
    fingerprint_settings = (
        f"dtype={settings.dtype};max_length={settings.max_length};chat_template={settings.apply_chat_template}"
    )
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(settings.dtype)
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
        from ...compat import load_peft_adapter

        adapted = load_peft_adapter(model, adapter).eval()
        scores["adapter"], summaries["adapter"] = evaluate("adapter", adapted, model_name, adapter)
    paths = write_into(output_dir, lambda staging: write_eval_report(scores, staging, summaries))
    return scores, paths
