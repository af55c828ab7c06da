"""Run Python code in a subprocess in which importing torch or torchvision fails (the runtime's promise:
``pyattr.runtime`` needs numpy and onnxruntime only). Shared by the runtime tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent(
    """
    import sys

    class _BlockTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision"):
                raise ImportError(f"{name} is blocked in this test: pyattr.runtime must not import it")
            return None

    sys.meta_path.insert(0, _BlockTorch())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the torch blocker does not work")
    """
)


def run_without_torch(code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c BLOCK_TORCH + code *args``, its output captured as text."""
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=timeout)
