"""lm-evaluation-harness tasks: importing the harness, local files written as harness tasks, the task manager, and
task names checked before a model is loaded."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from ...files.package_data import package_data_path
from ...training.paired_data import LANGUAGE_COLUMN
from .local_files import EvalFileError, load_eval_file
from .sources import EvalSource

TASK_TEMPLATES_DIR = package_data_path("eval_tasks")


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


def check_few_shot(path: str, questions: int, num_fewshot: int | None) -> None:
    """Refuses more few-shot examples than a local file has other questions (the harness draws them from it)."""
    if num_fewshot is not None and num_fewshot > questions - 1:
        raise EvalFileError(
            f"{path} has {questions} questions, too few for {num_fewshot} few-shot examples (they are other questions "
            f"of the same file): use at most {questions - 1}, or a larger file"
        )


def write_local_tasks(sources: Sequence[EvalSource], directory: str, num_fewshot: int | None = None) -> list[str]:
    """
    Validates each local file and writes, into `directory`, its rows as JSONL and a harness task YAML that includes
    the packaged template of its schema. Returns the written task files. Nothing is written if a file is malformed,
    or has too few questions for `num_fewshot` (its few-shot examples are its other questions).
    """
    local = [(source, *load_eval_file(source.path)) for source in sources if source.path is not None]
    for source, _, rows in local:
        check_few_shot(source.path, len(rows), num_fewshot)
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
