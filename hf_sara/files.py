"""Files: reading record files, atomic writes (a temporary file renamed into place once complete), one writer per
output folder, and which checkpoint a run can resume from."""

from __future__ import annotations

import contextlib
import csv
import glob
import io
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)


def _temporary_pattern(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.*.tmp")


def _temporary_name(path: str, attempt: int) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{attempt}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str) -> None:
    """
    Removes the temporary files (and staged folders) that writers of `path` killed before they finished (kill -9, out
    of memory) left behind: those whose writing process no longer runs on this machine.
    """
    for temporary in glob.glob(_temporary_pattern(path)):
        parts = os.path.basename(temporary).rsplit(".", 3)  # [".name", "<pid>", "<n>", "tmp"]
        if len(parts) == 4 and parts[1].isdigit() and not _pid_alive(int(parts[1])):
            if os.path.isdir(temporary) and not os.path.islink(temporary):  # a folder staged by `atomic_directory`
                shutil.rmtree(temporary, ignore_errors=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)


def new_temporary(path: str) -> str:
    """Creates an empty temporary file for `path`, in its directory (so the final rename stays on one file system)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temporaries(path)
    for attempt in range(1000):
        temporary = _temporary_name(path, attempt)
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        except PermissionError:
            raise PermissionError(f"Cannot write {path}: {os.path.dirname(path)} is not writable.") from None
        return temporary
    raise FileExistsError(f"Could not create a temporary file next to {path}.")


def commit_temporary(temporary: str, path: str) -> None:
    """Flushes `temporary` to disk and renames it to `path` in one step."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """
    Yields a temporary path to write `path`'s content to; when the block ends without an error, the file is renamed
    to `path`, else it is removed. A reader never sees a half-written `path`, and a kill leaves at most a temporary
    file that the next write of `path` removes. The file gets the permissions the umask gives new files.
    """
    path = os.path.abspath(os.fspath(path))
    temporary = new_temporary(path)
    try:
        yield temporary
        commit_temporary(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def check_output_directory(path: str | os.PathLike, overwrite: bool = False) -> None:
    """
    Refuses an output folder that [`atomic_directory`] would not replace: a path that is not a folder, or a folder
    that is not empty when `overwrite` is not set.

    Raises:
        `FileExistsError`: naming the path and the fix.
    """
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a folder: choose another output folder.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(
            f"{path} is not empty: choose a new or empty output folder, or pass `overwrite=True` (`--overwrite`) to "
            "replace it (its content is deleted once the new one is complete)."
        )


def _remove_tree(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """
    Yields an empty temporary folder, next to `path`, to write a whole folder's content in; when the block ends
    without an error, the folder is renamed to `path` in one step, else it is removed. A reader never sees a
    half-written `path`, and a kill leaves at most a hidden temporary folder that the next write of `path` removes.

    Args:
        path (`str` or `os.PathLike`):
            The folder to write. It must not exist or be empty, unless `overwrite`.
        overwrite (`bool`, *optional*, defaults to `False`):
            Replace a non-empty `path`: the old folder is moved aside, the new one renamed into place, and only then
            the old one deleted (it is put back if the rename fails).

    Raises:
        `FileExistsError`: from [`check_output_directory`], before the block runs and again before the rename.
    """
    path = os.path.abspath(os.fspath(path))
    check_output_directory(path, overwrite)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temporaries(path)
    for attempt in range(1000):
        temporary = _temporary_name(path, attempt)
        try:
            os.mkdir(temporary)
        except FileExistsError:
            continue
        break
    else:
        raise FileExistsError(f"Could not create a temporary folder next to {path}.")
    try:
        yield temporary
        for folder, _, files in os.walk(temporary):
            for name in files:
                with open(os.path.join(folder, name), "rb") as handle:
                    os.fsync(handle.fileno())
        check_output_directory(path, overwrite)  # it may have been filled meanwhile
        if os.path.isdir(path) and os.listdir(path):
            aside = next(name for n in range(1000) if not os.path.lexists(name := _temporary_name(path, n)))
            os.rename(path, aside)
            try:
                os.replace(temporary, path)
            except BaseException:
                os.rename(aside, path)
                raise
            _remove_tree(aside)
        else:
            os.replace(temporary, path)  # onto a missing or empty folder: one rename
    except BaseException:
        _remove_tree(temporary)
        raise


LOCK_FILE_NAME = ".hf_sara.lock"
_HELD_LOCKS: set[str] = set()  # the lock files this process holds


class OutputDirectoryLockedError(RuntimeError):
    """Another training holds the output directory (or its lock file is unreadable)."""


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike) -> Iterator[None]:
    """
    Holds `directory` for one writer: two trainings with the same `output_dir` would otherwise both run and leave a
    mix of the two (checkpoints, anchors, model card). A lock left by a process killed on this machine is taken over;
    one from another machine is reported, since only its owner can tell whether that run is over.

    Raises:
        `OutputDirectoryLockedError`: naming the running process and the fix, when another one holds the directory.
    """
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, LOCK_FILE_NAME)
    host = socket.gethostname()
    owner = f"{host} {os.getpid()}"
    for _ in range(2):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            try:
                with open(path, encoding="utf-8") as handle:
                    holder_host, _, holder_pid = handle.read().strip().partition(" ")
            except FileNotFoundError:
                continue  # released meanwhile
            except (OSError, UnicodeDecodeError) as error:
                raise OutputDirectoryLockedError(
                    f"{path} is not a lock hf_sara wrote ({error}): remove it if no training uses {directory}."
                ) from None
            # Its owner was killed: a process of this machine that no longer runs, or this very process id (a
            # container restarted after a kill runs its entrypoint under the same id), or a lock left empty (killed
            # between creating and writing it) for more than a few seconds.
            stale = (
                holder_host == host
                and holder_pid.isdigit()
                and ((int(holder_pid) == os.getpid() and path not in _HELD_LOCKS) or not _pid_alive(int(holder_pid)))
            )
            with contextlib.suppress(OSError):
                stale |= not holder_host and time.time() - os.path.getmtime(path) > 10
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                continue
            raise OutputDirectoryLockedError(
                f"Another training is writing to {directory} (process {holder_pid or '?'} on {holder_host or '?'}, "
                f"see {path}). Two runs in one output_dir would mix their checkpoints and anchors: choose another "
                "`output_dir`, or wait for that run to end. If it is not running any more (it was on another "
                "machine), delete the lock file."
            ) from None
        break
    else:
        raise OutputDirectoryLockedError(f"Could not lock {directory}: {path} keeps changing; remove it.")
    _HELD_LOCKS.add(path)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(owner)
        yield
    finally:
        _HELD_LOCKS.discard(path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _checkpoint_is_complete(path: str) -> bool:
    # Trainer writes trainer_state.json last (after the model, optimizer, scheduler and RNG states), not atomically.
    try:
        with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, ValueError):
        return False
    return True


def _check_within_max_steps(path: str, max_steps: int) -> None:
    with open(os.path.join(path, "trainer_state.json"), encoding="utf-8") as handle:
        step = json.load(handle).get("global_step", 0)
    if max_steps > 0 and step > max_steps:
        raise ValueError(
            f"{path} is at step {step}, beyond this run's max_steps={max_steps}: it belongs to another (longer) run "
            "in this output_dir. Resume from a checkpoint of this run by path, or train in a new output_dir."
        )


def complete_checkpoint(
    resume_from_checkpoint: str | bool | None, output_dir: str, max_steps: int = -1, required: bool = True
) -> str | None:
    """
    Resolves `Trainer.train`'s `resume_from_checkpoint` to a checkpoint that was saved to the end. transformers writes
    checkpoints in place, so a run killed while saving leaves a `checkpoint-N` without (or with half) its
    `trainer_state.json`, which `resume_from_checkpoint=True` would pick and fail on: the last complete one is taken
    instead, with a warning. An explicit path to an incomplete checkpoint is refused.

    Raises:
        `ValueError`: for an incomplete checkpoint given by path, or when `True` finds no complete one (unless
        `required=False`: then `None`, to start from the beginning).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() == "true":
        resume_from_checkpoint = True  # as the command line spells it
    if resume_from_checkpoint is True:
        pattern = re.compile(r"^checkpoint-(\d+)$")
        found = sorted(
            (int(match.group(1)), name)
            for name in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
            if (match := pattern.match(name)) and os.path.isdir(os.path.join(output_dir, name))
        )
        incomplete = []
        for _, name in reversed(found):
            path = os.path.join(output_dir, name)
            if _checkpoint_is_complete(path):
                _check_within_max_steps(path, max_steps)
                if incomplete:
                    logger.warning(
                        f"hf_sara: skipping incomplete checkpoint(s) {incomplete} (a run was stopped while saving "
                        f"them); resuming from {name}."
                    )
                return path
            incomplete.append(name)
        if not required:
            return None
        raise ValueError(
            f"No complete checkpoint in {output_dir} to resume from"
            + (f" ({', '.join(incomplete)} were cut short while saving)" if incomplete else "")
            + ": train from the start (`resume_from_checkpoint=None`)."
        )
    path = os.fspath(resume_from_checkpoint)
    if os.path.isdir(path) and _checkpoint_is_complete(path):
        _check_within_max_steps(path, max_steps)
    if os.path.isdir(path) and not _checkpoint_is_complete(path):
        raise ValueError(
            f"The checkpoint {path} is incomplete: its trainer_state.json is missing or cut short (the run was "
            "stopped while saving it). Resume from an earlier checkpoint, or pass `resume_from_checkpoint=True` to "
            "take the last complete one."
        )
    return path


def checkpoint_weight_names(checkpoint: str) -> set[str] | None:
    """The tensor names a checkpoint folder's safetensors weights hold (single file or sharded), or `None`."""
    single = os.path.join(checkpoint, "model.safetensors")
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as handle:
            return set(handle.keys())
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as handle:
            return set(json.load(handle)["weight_map"])
    return None


def package_data_path(*parts: str) -> str:
    """The path of a file shipped inside the `hf_sara` package (e.g. `package_data_path("data", "x.jsonl")`)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), *parts)


def read_text(path: str, newline: str | None = None) -> str:
    """Reads a UTF-8 text file, dropping a leading byte-order mark (spreadsheets write one)."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}). Convert it to UTF-8 first."
        ) from None


def read_records(path: str) -> list[dict[str, Any]]:
    """
    Reads a file of records into a list of dicts: JSON lines (`.jsonl`, or `.json` not starting with `[`), a JSON
    list of objects (`.json`), or a table with a header (`.csv`, `.tsv`).

    Raises:
        `ValueError`: naming the file and the line or item, for an unknown extension, invalid JSON, or a record that
        is not an object with named columns.
    """
    extension = path.rsplit(".", 1)[-1].lower()
    if extension in ("csv", "tsv"):
        text = read_text(path, newline="")
        return list(csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if extension == "tsv" else ","))
    if extension not in ("jsonl", "json"):
        raise ValueError(f"Cannot read {path}: expected a .jsonl, .json, .csv or .tsv file.")
    text = read_text(path)
    if extension == "json" and text.lstrip().startswith("["):
        try:
            numbered = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
    else:
        numbered = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    numbered.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
    for number, record in numbered:
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}, item {number}: expected a JSON object with named columns, got {type(record).__name__}."
            )
    return [record for _, record in numbered]
