"""Names made safe for file names (and the harness's task names, which name files too)."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^0-9A-Za-z_]")


def safe_file_name(name: str) -> str:
    """`name` with every character but ASCII letters, digits and `_` replaced by `_` (`"sara/all"` -> `"sara_all"`)."""
    return _UNSAFE.sub("_", name)
