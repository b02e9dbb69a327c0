"""The README stays in step with the code: its families table covers exactly the tested families."""

import re
from pathlib import Path

from .testing_utils import MODEL_TYPES

README = Path(__file__).resolve().parent.parent / "README.md"


def test_families_table_lists_the_tested_families():
    text = README.read_text()
    section = text.split("<!-- families-table:begin -->", 1)[1].split("<!-- families-table:end -->", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert listed == MODEL_TYPES, "run `make families-table`"
    assert "FAILED" not in section


def test_quick_start_commands_exist():
    text = README.read_text()
    makefile = (README.parent / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in text
        assert re.search(rf"^{target}:", makefile, flags=re.M)
