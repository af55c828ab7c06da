"""The machine and software a run measured, and waiting for a quiet machine."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def describe(device: torch.device, threads: int) -> dict:
    import onnxruntime as ort

    import pyattr

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": threads if device.type == "cpu" else "default",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pyattr": pyattr.__version__,
        "pyattr_commit": _git("rev-parse", "--short", "HEAD"),
        "pyattr_uncommitted": [line[3:] for line in (_git("status", "--porcelain", "--", "pyattr") or "").splitlines()],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "pyattr_C": _pyattr_c(),
        "peers": {name: _version(name) for name in ("captum", "grad-cam", "torchcam", "zennit")},
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
    }
    if device.type == "cuda":
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return info


def _pyattr_c() -> str:
    from pyattr import render

    return render.backend()


def wait_for_quiet(threshold: float, max_wait_s: float, poll_s: float, log: Callable[[str], None]) -> dict:
    """Poll the 1-minute load average until it is below ``threshold`` or ``max_wait_s`` has passed.
    Returns what happened, for the results' metadata."""
    start = time.time()
    history = [load_average()]
    while history[-1] and history[-1][0] >= threshold and time.time() - start < max_wait_s:
        log(f"load average {history[-1]} >= {threshold}: waiting {poll_s:.0f} s "
            f"({time.time() - start:.0f}/{max_wait_s:.0f} s)")
        time.sleep(poll_s)
        history.append(load_average())
    quiet = bool(history[-1]) and history[-1][0] < threshold
    return {"threshold": threshold, "waited_s": round(time.time() - start), "quiet": quiet,
            "load_at_start": history[-1], "polls": len(history)}
