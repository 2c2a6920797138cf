"""The package reads top-down: no module imports from a layer above its own, lazy imports inside
functions included, and units that share a layer do not import each other.

Read from the source with ``ast`` (nothing is imported), so the test runs without the compiled
kernels, vLLM or lm-eval.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = "qadapter_kernels"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

# Lowest first. Each layer holds units ({name: module prefixes}); a module may import its own unit
# and any unit of a lower layer. The root package (its __init__, which re-exports every layer, and
# anything at the root no unit names, such as a native extension there) is above them all.
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"foundation": ("params", "reference", "outputs", "jsonl", "preferences", "signal_latch", "prompts",
                    "logit_identity")},
    {"ops": ("ops",)},  # the native extension lives here: qadapter_kernels.ops._C_*
    {"api": ("api",)},
    {"decoding": ("decoding",)},
    {"model": ("model", "loading")},
    {"training": ("training",)},
    {"evaluation": ("evaluation",), "serving": ("serving",), "baselines": ("baselines",)},
    {"app": ("app",)},
]
ROOT_UNIT = "package"


def unit_and_layer(module: str) -> tuple[str, int]:
    """The unit of a dotted module name and its layer's index (the root package: above every layer)."""
    for index, layer in enumerate(LAYERS):
        for unit, prefixes in layer.items():
            if any(module == f"{PACKAGE}.{p}" or module.startswith(f"{PACKAGE}.{p}.") for p in prefixes):
                return unit, index
    return ROOT_UNIT, len(LAYERS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(module: str, source: str, is_package: bool) -> list[tuple[int, str]]:
    """``(line, dotted name)`` of every import of this package in ``source``, wherever it stands.

    ``from X import name`` counts as an import of ``X.name`` (a submodule or a name defined in X:
    both map to X's unit unless ``X.name`` is a unit of its own).
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            found += [(node.lineno, f"{origin}.{alias.name}") for alias in node.names]
    return [(line, name) for line, name in found if name == PACKAGE or name.startswith(PACKAGE + ".")]


def upward_imports(module: str, source: str, is_package: bool = False) -> list[str]:
    """The imports of ``module`` that reach a unit it may not import, as ``"module:line -> target"``."""
    unit, layer = unit_and_layer(module)
    offenders = []
    for line, target in imported_modules(module, source, is_package):
        target_unit, target_layer = unit_and_layer(target)
        if target_unit != unit and target_layer >= layer:
            offenders.append(f"{module}:{line} ({unit}) -> {target} ({target_unit})")
    return offenders


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_belongs_to_a_layer():
    """A new top-level module must be placed in LAYERS, not fall silently into the root package."""
    unplaced = [module_name(p) for p in package_modules()
                if unit_and_layer(module_name(p))[0] == ROOT_UNIT and module_name(p) != PACKAGE]
    assert not unplaced, f"add these modules to a layer in LAYERS: {unplaced}"


def test_no_module_imports_from_a_layer_above_its_own():
    offenders = []
    for path in package_modules():
        offenders += upward_imports(module_name(path), path.read_text(), path.name == "__init__.py")
    assert not offenders, "imports that climb the layers:\n" + "\n".join(offenders)


@pytest.mark.parametrize("module, source", [
    ("qadapter_kernels.decoding.generate", "def f():\n    from ..training.data import encode_prompt\n"),
    ("qadapter_kernels.model.qadapter_model", "import qadapter_kernels.training.trainer\n"),
    ("qadapter_kernels.ops.registration", "from .. import _C\n"),
    ("qadapter_kernels.api.loss", "from qadapter_kernels import QAdapterModel\n"),
    ("qadapter_kernels.serving.model", "from ..evaluation import PolicyScorer\n"),
    ("qadapter_kernels.params", "from .api.checks import tile_budget\n"),
])
def test_the_check_reports_an_import_that_climbs(module, source):
    assert len(upward_imports(module, source)) == 1


@pytest.mark.parametrize("module, source, is_package", [
    ("qadapter_kernels.ops", "from . import _C_AVX512, native\n", True),
    ("qadapter_kernels.ops.native", "importlib.import_module('qadapter_kernels.ops._C_AVX2')\n", False),
    ("qadapter_kernels.model.qadapter_model", "from .. import decoding\nfrom ..loading import load_base_model\n",
     False),
    ("qadapter_kernels.training.data", "from ..prompts import encode_prompt\nimport torch\n", False),
    ("qadapter_kernels.reference", "from .params import PolicyParams\nfrom .outputs import QAdapterLossOutput\n",
     False),
])
def test_the_check_accepts_imports_that_go_down_or_stay(module, source, is_package):
    assert upward_imports(module, source, is_package) == []
