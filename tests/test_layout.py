"""The package's layering: public functions never shadow a module, no module imports another's
private names, and configuration is read when used (never at import)."""
import ast
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import qadapter_kernels as qk

PACKAGE_DIR = Path(qk.__file__).parent
REPO = PACKAGE_DIR.parent


def _packages():
    yield qk
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="qadapter_kernels."):
        if info.ispkg and not info.name.endswith(("training", "decoding", "app")):
            yield importlib.import_module(info.name)


@pytest.mark.parametrize("package", list(_packages()), ids=lambda p: p.__name__)
def test_no_public_name_shadows_a_submodule(package):
    submodules = {info.name for info in pkgutil.iter_modules(package.__path__)}
    for name in submodules:
        value = getattr(package, name, None)
        assert value is None or type(value).__name__ == "module", (
            f"{package.__name__}.{name} is a {type(value).__name__}, shadowing the module of that name")


def test_no_op_or_api_module_imports_a_private_name_of_another():
    offenders = []
    for path in [*(PACKAGE_DIR / "ops").rglob("*.py"), *(PACKAGE_DIR / "api").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "_C"]
                if private:
                    offenders.append(f"{path.relative_to(REPO)}: from {node.module} import {private}")
    assert not offenders, offenders


def test_malformed_tile_budget_variable_fails_at_the_call_not_at_import():
    """QADAPTER_TILE_BUDGET_MB used to be parsed when the package was imported."""
    script = (
        "import torch, qadapter_kernels as qk\n"
        "ha = torch.randn(4, 8); w = torch.randn(11, 8)\n"
        "ids = torch.randint(0, 11, (2, 2)); mask = torch.ones(2, 2, dtype=torch.bool)\n"
        "try:\n"
        "    qk.fused_linear_qadapter_loss(ha, ha.clone(), w, ids, mask)\n"
        "except ValueError as e:\n"
        "    print('ValueError:', e)\n"
        "print('explicit', float(qk.fused_linear_qadapter_loss(ha, ha.clone(), w, ids, mask, tile_budget_mb=1).loss))\n"
    )
    env = {**os.environ, "QADAPTER_TILE_BUDGET_MB": "lots", "PYTHONPATH": str(REPO)}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ValueError:" in proc.stdout and "QADAPTER_TILE_BUDGET_MB" in proc.stdout and "'lots'" in proc.stdout
    assert "explicit" in proc.stdout  # an explicit budget does not read the variable


@pytest.mark.parametrize("value, expected", [("8", 8.0), ("0.5", 0.5), ("", 64.0)])
def test_tile_budget_variable_is_read_at_each_call(monkeypatch, value, expected):
    from qadapter_kernels.api.checks import tile_budget

    monkeypatch.setenv("QADAPTER_TILE_BUDGET_MB", value)
    assert tile_budget(None) == expected
    for bad in ("0", "-3", "nan", "inf", "64MB"):
        monkeypatch.setenv("QADAPTER_TILE_BUDGET_MB", bad)
        with pytest.raises(ValueError, match="QADAPTER_TILE_BUDGET_MB"):
            tile_budget(None)
