"""Running from a source checkout after `pip install .`: the installed compiled core is used, no warning."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pyattr

SOURCE = Path(pyattr.__file__).parent


def test_checkout_without_core_uses_the_installed_one(tmp_path):
    from pyattr import render

    if not render.HAVE_C:
        pytest.fail("this test needs the compiled core built in the source tree (./dev_build.sh)")
    core = next(SOURCE.glob("_C.*.so"))
    ignore = shutil.ignore_patterns("_C.*.so", "_C.*.pyd", "__pycache__")
    checkout = tmp_path / "checkout"
    shutil.copytree(SOURCE, checkout / "pyattr", ignore=ignore)
    site = tmp_path / "site-packages"
    shutil.copytree(SOURCE, site / "pyattr", ignore=ignore)
    shutil.copy2(core, site / "pyattr" / core.name)
    assert not list((checkout / "pyattr").glob("_C.*.so"))
    code = ("import pyattr, pyattr.render as r; print(r.HAVE_C); print(r._C.__file__); "
            "print(pyattr.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": f"{checkout}:{site}", "PATH": "/usr/bin:/bin"}, check=False)
    assert proc.returncode == 0, proc.stderr
    have_c, core_file, package = proc.stdout.split()
    assert have_c == "True"
    assert Path(core_file) == site / "pyattr" / core.name
    assert Path(package) == checkout / "pyattr" / "__init__.py"  # the checkout's Python code
    assert "pip install" not in proc.stderr and "ExtensionMissingWarning" not in proc.stderr
