"""pyattr's exports run one at a time; what torch changes for other threads while one runs.

What torch (2.14) changes for the whole process while it traces, and what pyattr does about each:

- ``make_fx`` (pyattr's trace, :func:`pyattr.exporting.trace.trace_graph`) patches ``nn.Module.__call__`` and
  ``nn.Module.__getattr__`` (``torch.fx.Tracer.trace``, through ``_Patcher``) for every thread. With
  ``record_module_stack=True`` every module call of every thread then went through the trace's
  ``_ModuleStackTracer``; for a model that registers one module under two names, other threads got its
  ``AttrProxy`` objects, whose calls pushed onto the trace's module stack: ``AssertionError: Unexpected key conv1@6,
  expected conv1@5`` in eager calls of other threads, and in the export itself (2 of 3 exports, 2 of 485 eager
  calls, tests/test_export_threads.py). pyattr now traces with the plain tracer, whose wrappers only pass calls
  through, and records the layers itself on its per-call view (:func:`pyattr.exporting.trace.recording_layers`).
- Those patches are undone in reverse order of their making, per trace: two traces that overlap in time undo each
  other's (``nn.Module.__call__`` can be left wrapped for good). Also process-wide: ``fx.traceback``'s
  ``should_preserve_node_meta`` flag and ``current_meta`` dict (the backward ops' ``seq_nr``), make_fx's current
  tracer (``_CURRENT_MAKE_FX_TRACER``, read when a loop body is traced), and torch.export's patches of
  ``builtins.max``/``min``, ``math.pow`` and of the dynamo config. Hence :data:`EXPORT_LOCK`: one pyattr export
  (trace and writers) at a time. Eager calls never take it, so they never wait on an export.
- ``torch.export`` (pyattr's .pt2 writer, and ONNX when the direct translation fails) switches mkldnn, nnpack and
  cuDNN off for the whole process while it traces (``torch.export._trace._ignore_backend_decomps``; they are global
  C++ flags, there is no per-thread setting). Other threads' convolutions then run another algorithm: eager
  Saliency in another thread differed from its single-threaded result in 750 of 1866 calls during .pt2 exports
  (by 4e-11 on gradients of 3e-4: exactly what turning mkldnn off gives), and on a GPU they run without cuDNN
  meanwhile. pyattr cannot avoid it (keeping the flags on for its own exports changes the exported program: a
  ``batch <= 15`` guard appears and the export fails), so: export before serving, or in another process, when
  other threads need bit-identical results.
- torch.export traces with a *pre-dispatch* proxy mode, which torch keeps on one process-wide stack
  (``torch._ops._mode_stack_state_for_pre_dispatch``). pyattr's eager calls made their constants with
  ``disable_proxy_modes_tracing()``, which set that mode aside from whichever thread called it: 2 of 3 .pt2 exports
  failed while an eager Saliency thread ran ('fake tensor in the exported program constant's list', 'Trying to pop
  empty mode stack'). :func:`pyattr._callview.outside_trace` now does it only in a thread that traces. (torch does
  the same when any thread prints a tensor, ``torch._tensor_str``: not pyattr's to fix.)
- torch.onnx prints its progress; pyattr used to silence it with ``contextlib.redirect_stdout``, which swapped
  ``sys.stdout`` for every thread: other threads' prints were lost meanwhile. :func:`quiet_stdout` drops only the
  exporting thread's output.

Still process-wide while pyattr exports (harmless to other threads' results): the pass-through
``Module.__call__``/``__getattr__`` wrappers (one more Python call per module call), torch.export's
``builtins.max``/``min`` (tensor arguments give ``torch.maximum``/``minimum``) and ``math.pow`` (``x ** y``), the
``warnings.catch_warnings()`` of the trace and the writers (Python's warning filters are global: other threads'
warnings are not shown meanwhile) and the ONNX translation's raising of torch.onnx's logger level to ERROR.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
from collections.abc import Iterator

EXPORT_LOCK = threading.RLock()
"""Held by a thread while it traces or writes an export (re-entrant: export calls trace_graph)."""


@contextlib.contextmanager
def serialized_export() -> Iterator[None]:
    """Within the body, this thread holds :data:`EXPORT_LOCK`: no other pyattr export traces or writes meanwhile."""
    with EXPORT_LOCK:
        yield


class _ThreadStdout:
    """A ``sys.stdout`` that sends one thread's writes to ``sink`` and every other thread's to ``original``."""

    def __init__(self, original, sink):
        self._original, self._sink, self._thread = original, sink, threading.get_ident()

    def _target(self):
        return self._sink if threading.get_ident() == self._thread else self._original

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str):
        return getattr(self._original, name)


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Within the body, what this thread prints is dropped; other threads' prints go where they went.
    (``sys.stdout`` is swapped for the body, as ``contextlib.redirect_stdout`` does, but for this thread only.)"""
    original = sys.stdout
    sys.stdout = _ThreadStdout(original, io.StringIO())
    try:
        yield
    finally:
        sys.stdout = original


__all__ = ["EXPORT_LOCK", "quiet_stdout", "serialized_export"]
