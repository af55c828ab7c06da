"""Interleaved timing and peak memory of a set of contenders that do the same work.

Every contender is a zero-argument callable. :func:`measure` warms each one up, measures its peak
memory on its last warm-up call, then runs timed *rounds*: in every round each contender runs
once, in an order rotated from round to round (A B C, B C A, C A B, ...), so that machine drift
and order effects hit all of them alike. Ratios are taken per round (paired) and summarized by
their median, which is what lets a ratio survive a noisy machine.

Peak memory:

- CPU: the process's resident set. Before the measured call the allocator returns its free
  pages (``malloc_trim(0)``) and the kernel's high-water mark is reset
  (``echo 5 > /proc/self/clear_refs``); after it, ``VmHWM`` of ``/proc/self/status`` is the peak.
  Reported as the peak above the resident set at the reset (MiB), i.e. what the call itself added.
- CUDA: ``torch.cuda.reset_peak_memory_stats()`` then ``max_memory_allocated()`` above the
  allocation at the reset (torch's caching allocator only: onnxruntime's CUDA arena is not seen).
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

MiB = 1024 * 1024


@dataclass
class Contender:
    """One way of doing a configuration's work.

    Attributes:
        name: what the table shows (e.g. ``"pyattr ONNX (onnxruntime)"``, ``"captum LayerGradCam"``).
        library: ``pyattr``, ``captum``, ``pytorch-grad-cam``, ``torchcam``, ``zennit`` or ``reference``.
        backend: ``eager``, ``torchscript``, ``pt2``, ``onnxruntime-cpu``, ``onnxruntime-cuda``, ``compile``.
        role: ``bound`` (the plain forward + backward the method needs), ``forward`` (forward only),
            ``pyattr``, ``peer`` or ``post`` (a peer's post-processing to normalized input-size maps,
            timed on its cached raw output; its time is added to the peer's raw time for "end to end").
        fn: the work, no arguments.
        output: what one call returns: ``e2e`` (normalized maps at input size), ``raw`` (the
            library's native output, e.g. layer-resolution maps) or ``none`` (references).
        after: run after every call, outside the timing (e.g. free the ``.grad`` a peer leaves).
        of: for ``post`` contenders, the name of the peer whose output they post-process.
    """

    name: str
    library: str
    backend: str
    role: str
    fn: Callable[[], Any]
    output: str = "none"
    after: Callable[[], Any] | None = None
    of: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- memory --------------------------------------------------------------------------------------

_libc = None


def _malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except OSError:
        pass


def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakMemory:
    """``with PeakMemory(device) as m: work()`` then ``m.peak_mib`` (above the level at entry) and
    ``m.total_mib`` (CPU: the process's peak RSS; CUDA: the peak allocated)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib: float | None = None
        self.total_mib: float | None = None

    def __enter__(self):
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self._base = _status_kib("VmRSS")
            except OSError:
                self._base = None
        return self

    def __exit__(self, *exc):
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            self.total_mib = peak / MiB
            self.peak_mib = (peak - self._base) / MiB
        elif self._base is not None:
            hwm = _status_kib("VmHWM")
            if hwm is not None:
                self.total_mib = hwm / 1024
                self.peak_mib = (hwm - self._base) / 1024
        return False


# --- timing ----------------------------------------------------------------------------------------


@dataclass
class Measured:
    contender: Contender
    times: list[float] = field(default_factory=list)  # wall seconds, one per round
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds (all threads), one per round
    warmup_s: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    total_mib: float | None = None
    error: str | None = None


def _call(c: Contender, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    synchronize(device)
    c0, t0 = time.process_time(), time.perf_counter()
    c.fn()
    synchronize(device)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    if c.after is not None:
        c.after()
    return dt, dc


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


def measure(contenders: list[Contender], device: torch.device, *, warmup: int = 2, min_rounds: int = 5,
            max_rounds: int = 30, budget_s: float = 60.0, slow_s: float = 10.0,
            log: Callable[[str], None] = print) -> list[Measured]:
    """Warm up every contender (``warmup`` calls, one when a call takes more than ``slow_s``; peak
    memory of the last), then run interleaved rounds: as many as fit in ``budget_s`` (estimated
    from the last warm-up), within [``min_rounds``, ``max_rounds``]. A contender that raises is
    reported with its error and left out."""
    results = [Measured(c) for c in contenders]
    for m in results:
        c = m.contender
        try:
            for _ in range(max(1, warmup)):
                with PeakMemory(device) as mem:
                    m.warmup_s.append(_call(c, device)[0])
                m.peak_mib, m.total_mib = mem.peak_mib, mem.total_mib
                if m.warmup_s[-1] > slow_s:  # one warm-up call is enough for slow work
                    break
        except Exception as err:  # noqa: BLE001 -- a failing contender is a result, not a crash
            m.error = _first_line(err)
            log(f"    ! {c.name}: {m.error}")
    alive = [m for m in results if m.error is None]
    if not alive:
        return results
    round_s = sum(m.warmup_s[-1] for m in alive)
    rounds = int(min(max_rounds, max(min_rounds, budget_s // max(round_s, 1e-9))))
    log(f"    {len(alive)} contenders, ~{round_s:.2f} s a round -> {rounds} rounds")
    for r in range(rounds):
        shift = r % len(alive)
        for m in alive[shift:] + alive[:shift]:
            try:
                wall, cpu = _call(m.contender, device)
                m.times.append(wall)
                m.cpu_times.append(cpu)
            except Exception as err:  # noqa: BLE001
                m.error = _first_line(err)
                log(f"    ! {m.contender.name}: {m.error}")
        alive = [m for m in alive if m.error is None]
        if not alive:
            break
    return results


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) with linear interpolation; a single value gives it three times."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], statistics.median(values), q[2]


def paired_ratio(a: list[float], b: list[float]) -> float | None:
    """Median over rounds of a[r] / b[r] (both timed in the same round)."""
    n = min(len(a), len(b))
    if n == 0:
        return None
    return statistics.median(a[i] / b[i] for i in range(n))
