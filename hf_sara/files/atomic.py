"""Atomic writes: a file or folder is written under a temporary name next to it and renamed into place once complete,
so a reader never sees it half-written and a killed writer leaves only a temporary that the next write removes."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
from collections.abc import Callable, Iterator


def _temporary_pattern(path: str) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.*.tmp")


def _temporary_name(path: str, attempt: int) -> str:
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.{attempt}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether the process `pid` of this machine still runs."""
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
        if len(parts) == 4 and parts[1].isdigit() and not pid_alive(int(parts[1])):
            if os.path.isdir(temporary) and not os.path.islink(temporary):  # a folder staged by `temporary_directory`
                shutil.rmtree(temporary, ignore_errors=True)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)


def _create_file(name: str) -> None:
    os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


def _create_temporary(path: str, create: Callable[[str], None], what: str) -> str:
    """
    The one way every writer here names its temporaries: creates, with `create` (which raises `FileExistsError` when
    the name is taken), the first free temporary name of `path`, in its folder (so the final rename stays on one file
    system), after removing what killed writers of `path` left there. The name holds this process's id, which tells
    [`remove_stale_temporaries`] a killed writer's temporary from a running one's.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    remove_stale_temporaries(path)
    for attempt in range(1000):
        temporary = _temporary_name(path, attempt)
        try:
            create(temporary)
        except FileExistsError:
            continue
        except PermissionError:
            raise PermissionError(f"Cannot write {path}: {os.path.dirname(path)} is not writable.") from None
        return temporary
    raise FileExistsError(f"Could not create a temporary {what} next to {path}.")


def new_temporary(path: str) -> str:
    """Creates an empty temporary file for `path`, in its directory (so the final rename stays on one file system)."""
    return _create_temporary(os.path.abspath(path), _create_file, "file")


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
def temporary_directory(path: str | os.PathLike) -> Iterator[str]:
    """
    Yields an empty temporary folder next to `path` (on its file system, so that what is staged there can be renamed
    into place) and removes it, with whatever is left in it, when the block ends. A kill leaves it behind, hidden, for
    the next write of `path` to remove.
    """
    path = os.path.abspath(os.fspath(path))
    temporary = _create_temporary(path, os.mkdir, "folder")
    try:
        yield temporary
    finally:
        _remove_tree(temporary)


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
    with temporary_directory(path) as temporary:
        yield temporary
        for folder, _, files in os.walk(temporary):
            for name in files:
                with open(os.path.join(folder, name), "rb") as handle:
                    os.fsync(handle.fileno())
        check_output_directory(path, overwrite)  # it may have been filled meanwhile
        if os.path.isdir(path) and os.listdir(path):
            aside = _create_temporary(path, os.mkdir, "folder")  # an empty folder, which the rename replaces
            os.rename(path, aside)
            try:
                os.replace(temporary, path)
            except BaseException:
                os.rename(aside, path)
                raise
            _remove_tree(aside)
        else:
            os.replace(temporary, path)  # onto a missing or empty folder: one rename
