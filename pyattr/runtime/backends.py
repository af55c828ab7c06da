"""Inference backends for exported ``.onnx`` graphs: onnxruntime (default) and OpenVINO, behind one small
interface, torch-free.

:func:`open_graph` loads an ONNX file in a backend and returns a :class:`GraphSession`: its inputs and outputs
(names and shapes; a dynamic dimension is a string), the file's ``metadata_props`` and ``run(names, feed)``.
:class:`~pyattr.runtime.AttributionRuntime` and :class:`~pyattr.runtime.detection.Detector` only talk to this
interface, so both take ``backend="onnxruntime"`` or ``backend="openvino"``.

* ``onnxruntime``: ``providers`` are onnxruntime execution providers (default
  :func:`pyattr.runtime.default_providers`: CUDA then CPU where usable, else CPU).
* ``openvino`` (``pip install openvino``): the same ONNX file read by OpenVINO's ONNX frontend and compiled for
  one device: by default ``"GPU"`` where OpenVINO lists a GPU, else ``"CPU"`` (:func:`default_openvino_device`;
  ``providers=["AUTO"]`` and others where OpenVINO has them). Compiled with
  ``INFERENCE_PRECISION_HINT=f32`` so that CPUs with bf16 / AMX units do not silently run in lower precision
  (attribution maps would then differ from onnxruntime's by more than 1e-4). The pyattr metadata is read from
  the ONNX file itself (:func:`read_metadata_props`: OpenVINO does not expose ONNX ``metadata_props``).

Errors of either backend (a graph it cannot load, an operation it does not support, a run that fails) become an
:class:`~pyattr.errors.InputError` naming the file and, for OpenVINO's unsupported operations, the operations.

Example:
    >>> from pyattr.runtime.backends import open_graph                     # doctest: +SKIP
    >>> graph = open_graph("gradcam.onnx", backend="openvino")              # doctest: +SKIP
    >>> [(i.name, i.shape) for i in graph.inputs]                           # doctest: +SKIP
    [('images', ('?', 3, 64, 64)), ('target', ('?',))]
    >>> scores, maps = graph.run(["scores", "maps"], {"images": x, "target": t}, "gradcam.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from pyattr.errors import InputError

__all__ = ["BACKENDS", "GraphSession", "TensorInfo", "check_backend", "default_openvino_device", "open_graph",
           "read_metadata_props"]

BACKENDS = ("onnxruntime", "openvino")
MAX_METADATA_BYTES = 1 << 20  # one metadata_props entry; pyattr's metadata is a few kB


class TensorInfo(NamedTuple):
    """A graph input or output: its name and shape (an int per fixed dimension, a string per dynamic one)."""

    name: str
    shape: tuple[Any, ...]


class GraphSession:
    """An ONNX graph loaded in a backend (see :func:`open_graph`).

    Attributes:
        backend: ``"onnxruntime"`` or ``"openvino"``.
        native: the backend's own object (``onnxruntime.InferenceSession`` / ``openvino.CompiledModel``).
        providers: onnxruntime's providers in use, or the OpenVINO device.
        inputs, outputs: :class:`TensorInfo` lists, in the graph's order.
        metadata_props: the ONNX file's ``metadata_props`` (key -> value).
    """

    backend: str
    native: Any
    providers: list[str]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    metadata_props: dict[str, str]

    def run(self, names: Sequence[str], feed: dict[str, np.ndarray], what: str) -> list[np.ndarray]:
        """The outputs ``names`` for the inputs ``feed``, as arrays; the backend's errors become an
        :class:`InputError` naming ``what`` (the graph)."""
        try:
            return self._run(list(names), feed)
        except InputError:
            raise
        except Exception as err:  # each backend raises its own exception types
            raise InputError(f"{self.backend} failed running {what}: {_first_line(err)}") from err

    def _run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"GraphSession(backend={self.backend!r}, providers={self.providers})"


class _OnnxRuntimeGraph(GraphSession):
    backend = "onnxruntime"

    def __init__(self, path: Path, providers: Sequence[str] | None, num_threads: int):
        import onnxruntime as ort

        from . import default_providers

        providers = list(providers) if providers else default_providers()
        available = ort.get_available_providers()
        unknown = [p for p in providers if p not in available]
        if unknown or not providers:
            raise InputError(f"unknown onnxruntime provider(s) {unknown or providers}; this onnxruntime has "
                             f"{', '.join(available)}")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no provider chatter on CPU-only machines
        if num_threads:
            options.intra_op_num_threads = num_threads
        try:
            self.native = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types
            raise InputError(f"onnxruntime cannot load {path.name}: {_first_line(err)}") from err
        self.providers = self.native.get_providers()
        self.inputs = [TensorInfo(i.name, tuple(i.shape)) for i in self.native.get_inputs()]
        self.outputs = [TensorInfo(o.name, tuple(o.shape)) for o in self.native.get_outputs()]
        self.metadata_props = dict(self.native.get_modelmeta().custom_metadata_map)

    def _run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(o) for o in self.native.run(names, feed)]


class _OpenVINOGraph(GraphSession):
    backend = "openvino"

    def __init__(self, path: Path, providers: Sequence[str] | None, num_threads: int):
        try:
            import openvino as ov
        except ImportError:
            raise InputError("backend 'openvino' needs the openvino package: pip install openvino "
                             "(or pip install \"pyattr[openvino]\")") from None
        core = ov.Core()
        available = list(core.available_devices)
        devices = list(providers) if providers else [default_openvino_device(available)]
        if len(devices) != 1 or devices[0].split(":")[0] not in {*available, "AUTO", "MULTI", "HETERO"}:
            raise InputError(f"backend 'openvino' runs on one OpenVINO device, got {devices}; this machine has "
                             f"{', '.join(available)} (or AUTO)")
        self.metadata_props = read_metadata_props(path)
        try:
            model = core.read_model(str(path))
        except Exception as err:  # OpenVINO raises RuntimeError (and its own types) with long messages
            raise InputError(_openvino_load_error(path, err)) from err
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if num_threads and devices[0] == "CPU":
            config["INFERENCE_NUM_THREADS"] = num_threads
        try:
            self.native = core.compile_model(model, devices[0], config)
        except Exception as err:
            raise InputError(_openvino_load_error(path, err)) from err
        self.providers = devices
        # Names from the model as read (the ONNX names), ports by position: compiling may give a port more names
        # (e.g. ``target`` also named ``slice_1``), and get_any_name() then returns any of them.
        self.inputs = [TensorInfo(p.get_friendly_name(), _ov_shape(p.get_output_partial_shape(0)))
                       for p in model.get_parameters()]
        self.outputs = [TensorInfo(_result_name(r), _ov_shape(r.get_output_partial_shape(0)))
                        for r in model.get_results()]
        self._input_index = {info.name: i for i, info in enumerate(self.inputs)}
        self._ports = {info.name: port for info, port in zip(self.outputs, self.native.outputs)}
        self._local = threading.local()  # one infer request per thread: a request is not thread-safe

    def _run(self, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.native.create_infer_request()
        unknown = sorted(set(feed) - set(self._input_index))
        if unknown:
            raise InputError(f"unknown graph input(s) {unknown}; the graph takes {list(self._input_index)}")
        results = request.infer({self._input_index[k]: v for k, v in feed.items()})  # outputs copied
        return [np.array(results[self._ports[name]]) for name in names]


def default_openvino_device(available: Sequence[str]) -> str:
    """OpenVINO's device when none is given: ``"GPU"`` where OpenVINO lists one (``GPU``, ``GPU.0``, ...), else
    ``"CPU"``.

    Example:
        >>> default_openvino_device(["CPU", "GPU.0", "GPU.1"]), default_openvino_device(["CPU"])
        ('GPU', 'CPU')
    """
    return "GPU" if any(str(d).split(".")[0] == "GPU" for d in available) else "CPU"


def check_backend(backend: Any) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else an :class:`InputError` naming them."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; the runtime has {', '.join(BACKENDS)}")
    return backend


def open_graph(path: str | os.PathLike, backend: str = "onnxruntime", providers: Sequence[str] | None = None,
               num_threads: int = 0) -> GraphSession:
    """Load the ONNX graph ``path`` in ``backend`` (see the module docstring for ``providers``)."""
    check_backend(backend)
    cls = _OnnxRuntimeGraph if backend == "onnxruntime" else _OpenVINOGraph
    return cls(Path(path), providers, int(num_threads or 0))


# --- ONNX metadata_props without onnx or a session ---------------------------------------------------


def read_metadata_props(path: str | os.PathLike) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (``ModelProto`` field 14), read from its protobuf wire format
    directly: no onnx package and no session needed, and the graph (field 7) is skipped, not read.

    Example:
        >>> read_metadata_props("gradcam.onnx")["pyattr"][:20]                # doctest: +SKIP
        '{"format_version": 1'
    """
    path = Path(path)
    props: dict[str, str] = {}
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            while f.tell() < size:
                key = _varint(f)
                field, wire = key >> 3, key & 7
                if wire == 0:
                    _varint(f)
                elif wire == 1:
                    f.seek(8, os.SEEK_CUR)
                elif wire == 5:
                    f.seek(4, os.SEEK_CUR)
                elif wire == 2:
                    length = _varint(f)
                    if f.tell() + length > size:
                        raise ValueError("a field runs past the end of the file")
                    if field == 14:
                        if length > MAX_METADATA_BYTES:
                            raise ValueError(f"a metadata entry of {length} bytes")
                        k, v = _string_pair(f.read(length))
                        props[k] = v
                    else:
                        f.seek(length, os.SEEK_CUR)
                else:
                    raise ValueError(f"wire type {wire}")
    except (ValueError, UnicodeDecodeError, EOFError) as err:
        raise InputError(f"{path.name} is not a readable ONNX file ({err})") from None
    return props


def _varint(f) -> int:
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise EOFError("the file ends inside a field")
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _string_pair(data: bytes) -> tuple[str, str]:
    """A ``StringStringEntryProto`` (key = 1, value = 2)."""
    import io

    f, out = io.BytesIO(data), {1: "", 2: ""}
    while f.tell() < len(data):
        key = _varint(f)
        if key & 7 != 2:
            raise ValueError("a metadata entry that is not two strings")
        length = _varint(f)
        out[key >> 3] = f.read(length).decode("utf-8")
    return out[1], out[2]


# --- helpers ---------------------------------------------------------------------------------------------


def _result_name(result) -> str:
    """An OpenVINO Result's ONNX output name: its friendly name ``<name>/sink_port_0`` without the suffix, when
    that is one of the tensor's names, else the first of its names."""
    names = sorted(result.input(0).get_source_output().get_names())
    stem = result.get_friendly_name().rsplit("/sink_port_", 1)[0]
    return stem if stem in names or not names else names[0]


def _ov_shape(shape) -> tuple[Any, ...]:
    return tuple(d.get_length() if d.is_static else "?" for d in shape)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _openvino_load_error(path: Path, err: BaseException) -> str:
    """OpenVINO's message, cut to what matters: the operations it does not support, else its last line."""
    text = str(err)
    # OpenVINO 2024: "... does not support the following ONNX operations: X"; 2026: "No conversion rule found for
    # operations: X"
    ops = re.search(r"(?:does not support the following ONNX operations?|No conversion rule found for operations?):"
                    r"\s*([^\n]+)", text)
    if ops:
        return (f"OpenVINO cannot compile {path.name}: it does not support the ONNX operation(s) "
                f"{ops.group(1).strip()[:300]}; run this graph with backend 'onnxruntime'")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Exception from")]
    return f"OpenVINO cannot load {path.name}: {(lines[-1] if lines else type(err).__name__)[:300]}"
