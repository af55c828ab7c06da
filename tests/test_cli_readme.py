"""The README's Python snippets run as written (in order, in a temporary folder, on the built-in model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_the_snippets():
    snippets = python_snippets()
    assert len(snippets) >= 3
    assert any("onnxruntime" in s for s in snippets)


def test_readme_python_snippets_run(tmp_path):
    code = "\n".join(python_snippets())
    checks = """
assert overlays.shape == (8, 64, 64, 3) and overlays.dtype.name == "uint8"
assert scores.shape == (2, 6) and maps.shape == (2, 64, 64) and explained.tolist() == scores.argmax(1).tolist()
assert 0.0 <= float(maps.min()) and float(maps.max()) <= 1.0
"""
    script = tmp_path / "readme_snippets.py"
    script.write_text(code + checks)
    env = {**os.environ, "PYTHONPATH": str(README.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "gradcam.onnx").is_file()
