"""What is evaluated: one source (a harness task or a local file) per language, from `LANG=TASK` / `LANG=FILE`
specifications."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from ...files.names import safe_file_name

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
        sources.append(EvalSource(language, f"hf_sara_{safe_file_name(language)}", path))
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
