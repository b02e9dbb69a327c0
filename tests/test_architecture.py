"""The package's layout holds: lower layers never import higher ones, and no module imports another's private names."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_sara"
# What each part may import from hf_sara (besides itself): routing is the core, the CLI sits on top.
# `compat` (the version checks) sits below routing and imports nothing from hf_sara.
ALLOWED = {
    "compat": set(),
    "routing": {"distributed", "compat"},
    "training": {"routing", "distributed", "files", "compat"},
    "tools": {"routing", "training", "distributed", "files", "testing", "compat"},
    "cli": {"routing", "training", "tools", "files", "testing", "compat"},
    "testing": {"files", "training", "compat"},
    "integrations": {"routing", "training", "distributed", "files", "compat"},
}
MODULES = sorted(path for path in PACKAGE.rglob("*.py"))


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def _imports(path: Path):
    """(absolute imported module, imported names) of every `import`/`from ... import` inside hf_sara."""
    package = ".".join(("hf_sara", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]))
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "hf_sara" or module.startswith("hf_sara."):
                yield module, [alias.name for alias in node.names]


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_private_names_cross_modules(path):
    own = ".".join(("hf_sara", *path.relative_to(PACKAGE).with_suffix("").parts))
    for module, names in _imports(path):
        private = [name for name in names if name.startswith("_") and not name.startswith("__")]
        assert not private or module == own, f"{own} imports private {private} from {module}"


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_layers_import_only_downwards(path):
    relative = path.relative_to(PACKAGE).with_suffix("").parts
    part = relative[0] if len(relative) > 1 else relative[0]
    if part not in ALLOWED:
        return  # the package root (public API, deprecated aliases) may import anything
    for module, names in _imports(path):
        # From the package root, only its metadata (`__version__`); anything else there is the public API, on top.
        targets = {_part(module)} if _part(module) else {name for name in names if not name.startswith("__")}
        for target in targets - {part}:
            assert target in ALLOWED[part], f"hf_sara/{'/'.join(relative)}.py imports hf_sara.{target} ({module})"


def _modules_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter has imported after running `code`."""
    script = f"{code}\nimport sys, json\nprint(json.dumps(sorted({{name.split('.')[0] for name in sys.modules}})))"
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    )
    return set(json.loads(completed.stdout.strip().splitlines()[-1]))


def test_import_hf_sara_loads_no_trainer():
    loaded = _modules_after("import hf_sara")
    assert not {"trl", "peft", "torch", "axolotl"} & loaded


def test_the_mixin_for_any_trainer_loads_no_trl():
    loaded = _modules_after("from hf_sara import SARAMixin, SARATrainingArguments")
    assert "trl" not in loaded


def test_the_command_lines_help_loads_no_torch():
    loaded = _modules_after("from hf_sara.cli import main\nmain(['--help'])")
    assert not {"torch", "trl", "peft"} & loaded


def test_every_public_name_is_loaded_on_first_use():
    import hf_sara

    assert sorted(hf_sara.__all__) == hf_sara.__all__
    for name in hf_sara.__all__:
        value = getattr(hf_sara, name)
        assert getattr(value, "__module__", "hf_sara").startswith("hf_sara") or not callable(value), name
    assert set(hf_sara.__all__) <= set(dir(hf_sara))
    with pytest.raises(AttributeError, match="no attribute 'compute_anchor_distributions'"):
        hf_sara.compute_anchor_distributions  # noqa: B018 - removed: `OfflineAnchors.compute` is the one way
