"""The torch-free install, for real: pyattr's wheel installed with its declared dependencies into a fresh virtual
environment (no system site-packages) pulls no torch, and ``pyattr run`` there gives the eager maps.

Steps (about 1-2 minutes on 2 cores; the C++ core's CMake build is kept in ``build/torchfree_wheel/``, so runs
after the first only re-link):

1. ``pip wheel . --no-deps --no-build-isolation`` with this environment's scikit-build-core and pybind11 (the
   ``test`` extra installs them) and the CMake on PATH (none: pip's isolated build, which fetches it);
2. ``python -m venv`` + ``pip install pyattr-*.whl``: pip resolves the runtime's dependencies (numpy, Pillow,
   onnxruntime, onnx, onnxscript, tqdm) from the package index. No index reachable: this test FAILS (with pip's message); it does
   not skip;
3. there: ``import torch`` fails, no torch / torchvision in ``pip list``, ``import pyattr`` and
   ``from pyattr.runtime import AttributionRuntime`` work with the compiled core, ``pyattr explain`` and
   ``pyattr export`` fail with one ``pyattr: error:`` line naming ``pip install "pyattr[torch]"`` (exit 2);
4. a Grad-CAM graph exported here (with torch) runs with ``pyattr run`` there: overlays written, maps equal to
   eager pyattr's within 1e-4.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pyattr
from pyattr import zoo

ROOT = Path(__file__).resolve().parent.parent
PIP_TIMEOUT = 600
PREPROCESSING = {"color": "RGB", "scale": 1 / 255, "mean": [0.45, 0.5, 0.55], "std": [0.25, 0.2, 0.3],
                 "size": [64, 64], "resize": "bilinear", "layout": "NCHW"}


def clean_env() -> dict[str, str]:
    """The environment without what would let the fresh venv see this checkout or this environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def run(command: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout, check=False)


def must(done: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{what} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def build_isolation() -> list[str]:
    """``--no-build-isolation`` where this environment can build the wheel itself (scikit-build-core and pybind11
    from the test extra, a CMake on PATH); else pip's isolated build, which fetches them (CMake too) from the index."""
    import importlib.util
    import shutil

    ready = all(importlib.util.find_spec(m) for m in ("scikit_build_core", "pybind11")) and shutil.which("cmake")
    return ["--no-build-isolation"] if ready else []


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torchfree_install")
    wheels = root / "wheels"
    must(run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", *build_isolation(), "-q", "-w", wheels,
              "--config-settings=build-dir=build/torchfree_wheel/{wheel_tag}"], cwd=root, timeout=PIP_TIMEOUT),
         "building pyattr's wheel")
    (wheel,) = wheels.glob("pyattr-*.whl")
    env = root / "venv"
    must(run([sys.executable, "-m", "venv", env], cwd=root), "python -m venv")
    python = env / "bin" / "python"
    must(run([python, "-m", "pip", "install", "-q", "--no-input", "--no-compile", "--timeout", "60", wheel], cwd=root,
             timeout=PIP_TIMEOUT),
         "pip install of the wheel with its dependencies from the package index (is PyPI reachable? this test "
         "needs it)")
    return {"root": root, "python": python, "pyattr": env / "bin" / "pyattr"}


def test_the_runtime_install_has_no_torch(venv):
    python, root = venv["python"], venv["root"]
    done = run([python, "-c", "import torch"], cwd=root)
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr
    installed = {p["name"].lower() for p in json.loads(must(run([python, "-m", "pip", "list", "--format", "json"],
                                                                 cwd=root), "pip list").stdout)}
    assert {"pyattr", "numpy", "pillow", "onnxruntime"} <= installed
    assert not installed & {"torch", "torchvision", "triton"}, installed
    code = ("import sys, pyattr, pyattr._C; from pyattr.runtime import AttributionRuntime; "
            "from pyattr.render import heatmap_overlay; "
            "assert 'site-packages' in pyattr.__file__, pyattr.__file__; assert 'torch' not in sys.modules; "
            "print(pyattr.__version__)")
    assert must(run([python, "-c", code], cwd=root), "import pyattr").stdout.strip() == pyattr.__version__


@pytest.mark.parametrize("command", [["explain"], ["export", "g.onnx", "--method", "gradcam"]])
def test_explain_and_export_say_what_to_install(venv, command):
    done = run([venv["pyattr"], *command], cwd=venv["root"])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"pyattr: error: pyattr {command[0]} needs PyTorch")
    assert 'pip install "pyattr[torch]"' in lines[0] and "pyattr run" in lines[0]


def test_pyattr_run_gives_the_eager_maps(venv, tmp_path):
    torch.manual_seed(0)
    method = pyattr.GradCAM(zoo.ShapesNet().eval(), "layer3")
    graph = pyattr.export(method, torch.rand(1, 3, 64, 64), tmp_path / "gradcam.onnx", class_names=zoo.SHAPE_CLASSES,
                          preprocessing=PREPROCESSING)
    images = zoo.generate(3, seed=11).images  # 64x64: the runtime's resize is the identity
    files = []
    for i, image in enumerate(images):
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(image).save(files[-1])
    out = tmp_path / "out"
    done = must(run([venv["pyattr"], "run", graph, *files, "--out", out, "--save-maps", "--threads", "1"],
                    cwd=venv["root"]), "pyattr run in the torch-free venv")
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(PREPROCESSING["mean"])[:, None, None]) / torch.tensor(PREPROCESSING["std"])[:, None, None]
    eager = method(x)
    assert [d["explained_class"] for d in lines] == eager.target.tolist()
    for j, file in enumerate(files):
        assert (out / f"{file.stem}_gradcam_overlay.png").is_file()
        saved = np.load(out / f"{file.stem}_gradcam_maps.npz")
        assert eager.maps[j].max() > 0.99
        np.testing.assert_allclose(saved["map"], eager.maps[j].numpy(), rtol=0, atol=1e-4)


def test_onnx_export_without_the_onnx_packages_says_what_to_install(monkeypatch, tmp_path):
    """An environment without onnx / onnxscript (removed by hand; pyattr's install pulls them): .onnx export stops
    before tracing with an ExportError naming the packages to install; no file is written."""
    import importlib.util

    from pyattr.errors import ExportError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    method = pyattr.Saliency(zoo.ShapesNet().eval())
    with pytest.raises(ExportError, match=r"needs the packages onnxscript, .*pip install onnx onnxscript"):
        pyattr.export(method, torch.rand(1, 3, 64, 64), tmp_path / "s.onnx")
    assert not list(tmp_path.iterdir())


def test_cli_without_torch_in_process():
    """The same check without a venv (tests/torchfree.py's blocker): explain fails with one line, --help works."""
    from torchfree import run_without_torch

    code = """
        import sys
        from pyattr.cli import main
        print(main(sys.argv[1:]))
    """
    done = run_without_torch(code, "explain", "--method", "saliency")
    assert done.stdout.strip() == "2" and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("pyattr: error: pyattr explain needs PyTorch (torch and torchvision not installed)")
    assert run_without_torch("from pyattr.cli import main; main(['--help'])").returncode == 0
