"""The import rule of docs/architecture.md, enforced: import-linter's contracts in
pyproject.toml hold for the package laid out as installed (``kernels/`` becomes
``gpurnn/kernels``), and a back arrow planted in a copy of it breaks them."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _installed_copy(tmp_path):
    """The package as a wheel installs it (gpurnn/, with kernels/ as gpurnn/kernels), beside
    the pyproject.toml that holds the contracts."""
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "gpurnn", site / "gpurnn", ignore=ignore)
    shutil.copytree(ROOT / "kernels", site / "gpurnn" / "kernels", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", site)
    return site


def _lint(site):
    """lint-imports in ``site``: it reads the contracts from the pyproject.toml there.  ``site``
    comes first on the path; what PYTHONPATH held stays behind it (where import-linter itself
    may be installed)."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache"], cwd=site, env=env,
                          capture_output=True, text=True, timeout=300)


def test_import_contracts_hold(tmp_path):
    result = _lint(_installed_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module,planted,broken", [
    ("engine/memory.py", "from ..nn import layers",
     "gpurnn.engine is not allowed to import gpurnn.nn"),
    ("nn/layers.py", "from ..interop import interchange",
     "gpurnn.nn is not allowed to import gpurnn.interop"),
    ("interop/interchange.py", "from ..training import tasks",
     "gpurnn.interop is not allowed to import gpurnn.training"),
    ("kernels/cell_math.py", "from gpurnn.engine import backend",
     "gpurnn.kernels is not allowed to import gpurnn.engine"),
    ("training/data.py", "from . import model", "No cycles are allowed in gpurnn.training"),
], ids=["engine->nn", "nn->interop", "interop->training", "kernels->engine", "cycle"])
def test_a_back_arrow_breaks_a_contract(tmp_path, module, planted, broken):
    site = _installed_copy(tmp_path)
    path = site / "gpurnn" / module
    path.write_text(path.read_text() + f"\n{planted}\n")
    result = _lint(site)
    assert result.returncode == 1, result.stdout + result.stderr
    assert broken in result.stdout, result.stdout
