"""The offline anchors' file: safetensors, written row by row without holding the table, read memory-mapped."""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

from ...files.atomic import commit_temporary, new_temporary

# safetensors dtype names of the tensors an anchors file holds.
_DTYPES = {"F32": np.float32, "BOOL": np.bool_}
_DTYPE_NAMES = {torch.float32: "F32", torch.bool: "BOOL"}
_HEADER_SIZE_BYTES = 8  # little-endian u64, then the JSON header, then the data buffer


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor lies in a safetensors file: its dtype name, shape and byte range in the data buffer."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _file_error(path: str, problem: str) -> ValueError:
    # Whether hf_sara wrote it cannot be told: removing it is advised only for an anchors file hf_sara wrote.
    return ValueError(
        f"{path} is not a readable hf_sara anchors file: {problem}. If it is an anchors file hf_sara wrote (cut short "
        "or overwritten), remove it to recompute the anchors; otherwise point `sara_anchor_path` at an anchors file "
        "(or an intact copy)."
    )


def read_header(path: str) -> tuple[dict[str, TensorLayout], dict[str, str], int]:
    """
    Reads a safetensors file's header without loading its data.

    Returns:
        `tuple`: the layout of every tensor, the `__metadata__` strings, and the byte offset of the data buffer.

    Raises:
        `ValueError`: naming the file, when it is not a complete safetensors file (missing, a directory, cut short, or
        not safetensors at all).
    """
    if os.path.isdir(path):  # a folder that may hold the model and the data: never to be removed
        raise ValueError(
            f"{path} is a folder, not an anchors file: point `sara_anchor_path` at a file (e.g. "
            f"{os.path.join(path, 'sara_anchors.safetensors')}, which `hf-sara anchors` writes), or leave it unset to "
            "cache the anchors in output_dir."
        )
    if not os.path.isfile(path):
        raise ValueError(
            f"{path} does not exist: point `sara_anchor_path` at an anchors file, or compute one with "
            "`hf-sara anchors`."
        )
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(_HEADER_SIZE_BYTES)
        if len(prefix) < _HEADER_SIZE_BYTES:
            raise _file_error(path, f"it holds {size} bytes, fewer than a header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > size - _HEADER_SIZE_BYTES:
            raise _file_error(path, "its header is longer than the file")
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _file_error(path, f"its header is not JSON ({error})") from None
    if not isinstance(header, dict):
        raise _file_error(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = _HEADER_SIZE_BYTES + header_size
    layouts = {}
    for name, entry in header.items():
        try:
            layout = TensorLayout(entry["dtype"], tuple(entry["shape"]), *entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _file_error(path, f"its header entry {name!r} is malformed") from None
        if layout.begin < 0 or layout.end < layout.begin or any(int(size) < 0 for size in layout.shape):
            raise _file_error(path, f"its header entry {name!r} has negative offsets or sizes")
        if layout.dtype not in _DTYPES:
            raise _file_error(path, f"tensor {name!r} has dtype {layout.dtype}, not one of {sorted(_DTYPES)}")
        expected = int(np.prod(layout.shape, dtype=np.int64)) * np.dtype(_DTYPES[layout.dtype]).itemsize
        if layout.end - layout.begin != expected or data_start + layout.end > size:
            raise _file_error(path, f"tensor {name!r} does not fit its shape {list(layout.shape)} or the file")
        layouts[name] = layout
    return layouts, metadata, data_start


def _identity(status: os.stat_result) -> tuple[int, int, int, int]:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


class MappedAnchorFile:
    """
    A safetensors file opened memory-mapped: rows are read from disk when indexed, so a process holds only the rows
    it asks for, whatever the file's size (the operating system's page cache is shared by every process on a node).

    Args:
        path (`str`):
            The file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.layouts, self.metadata, data_start = read_header(self.path)
        with open(self.path, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._identity = _identity(os.fstat(handle.fileno()))
        if hasattr(self._map, "madvise"):
            # Lookups read scattered rows: without this, every page fault also reads the pages around it.
            self._map.madvise(mmap.MADV_RANDOM)
        self._arrays: dict[str, np.ndarray] = {}
        for name, layout in self.layouts.items():
            dtype = np.dtype(_DTYPES[layout.dtype])
            count = (layout.end - layout.begin) // dtype.itemsize
            array = np.frombuffer(self._map, dtype=dtype, count=count, offset=data_start + layout.begin)
            self._arrays[name] = array.reshape(layout.shape)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.layouts[name].shape

    def rows(self, name: str, indices: torch.Tensor | np.ndarray | slice) -> torch.Tensor:
        """
        Copies rows `indices` of tensor `name` out of the file.

        Raises:
            `ValueError`: when the file was replaced, rewritten or cut since it was opened (a memory map would then
            read another file's rows, zeros, or crash the process).
        """
        try:
            unchanged = _identity(os.stat(self.path)) == self._identity
        except OSError:
            unchanged = False
        if not unchanged:
            raise ValueError(
                f"{self.path} was replaced or rewritten since it was opened: its rows would no longer be the ones "
                "checked. Leave the anchors file alone while a trainer uses it, and restart the run."
            )
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        return torch.from_numpy(np.array(self._arrays[name][indices]))


class AnchorFileWriter:
    """
    Writes a safetensors file whose tensors are known in advance, one group of rows at a time, in any order.

    The file is laid out (header and zero-filled data) under a temporary name next to `path`; rows are written in
    place, and [`~AnchorFileWriter.commit`] flushes it to disk and renames it to `path` in one step, so an
    interrupted write never leaves a half-written file under `path` (and the next write removes what a killed one
    left). Use it as a context manager: leaving the block
    with an exception removes the temporary file.

    Args:
        path (`str`):
            Where the file goes.
        shapes (`dict[str, tuple[tuple[int, ...], torch.dtype]]`):
            Every tensor's shape and dtype (`torch.float32` or `torch.bool`).
        metadata (`dict[str, str]`):
            The `__metadata__` strings.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
        metadata: dict[str, str],
    ):
        self.path = os.path.abspath(os.fspath(path))
        header: dict[str, object] = {"__metadata__": dict(metadata)}
        self._layouts: dict[str, TensorLayout] = {}
        position = 0
        for name in sorted(shapes):
            shape, torch_dtype = shapes[name]
            if torch_dtype not in _DTYPE_NAMES:
                raise ValueError(f"Anchors files hold {list(_DTYPE_NAMES)} tensors, not {torch_dtype} ({name!r}).")
            dtype = _DTYPE_NAMES[torch_dtype]
            size = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            self._layouts[name] = TensorLayout(dtype, tuple(shape), position, position + size)
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
            position += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data buffer to 8 bytes
        self.temporary_path = new_temporary(self.path)
        self._data_start = _HEADER_SIZE_BYTES + len(encoded)
        with open(self.temporary_path, "wb") as file:
            file.write(struct.pack("<Q", len(encoded)))
            file.write(encoded)
            file.truncate(self._data_start + position)  # zero-filled (sparse where the file system allows)
        self._arrays: dict[str, np.memmap] = {}

    def _array(self, name: str) -> np.memmap:
        if name not in self._arrays:
            layout = self._layouts[name]
            self._arrays[name] = np.memmap(
                self.temporary_path,
                dtype=_DTYPES[layout.dtype],
                mode="r+",
                offset=self._data_start + layout.begin,
                shape=layout.shape,
            )
        return self._arrays[name]

    def write(self, name: str, rows: torch.Tensor | np.ndarray | slice, values: torch.Tensor) -> None:
        """Writes `values[i]` to row `rows[i]` of tensor `name` (`rows` may be a slice)."""
        if isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        if self._layouts[name].end == self._layouts[name].begin:
            return
        self._array(name)[rows] = values.detach().cpu().numpy()

    def commit(self) -> None:
        """Flushes the file to disk and moves it to `path` (with the permissions the umask gives new files)."""
        for array in self._arrays.values():
            array.flush()
        self._arrays.clear()
        commit_temporary(self.temporary_path, self.path)

    def abort(self) -> None:
        """Removes the temporary file."""
        self._arrays.clear()
        if os.path.exists(self.temporary_path):
            os.remove(self.temporary_path)

    def __enter__(self) -> AnchorFileWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abort()
