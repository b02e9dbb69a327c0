"""The output-folder lock: one writer per output folder, a lock left by a killed process taken over."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

from .atomic import pid_alive

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
                and ((int(holder_pid) == os.getpid() and path not in _HELD_LOCKS) or not pid_alive(int(holder_pid)))
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
