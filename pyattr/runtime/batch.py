"""Explanations at dataset scale on Ray Data: a folder, a list of paths / URIs or a Parquet table of paths in; a
Parquet table (class, score, a compressed map and an error column per image) and PNG overlays out. Torch-free,
like the rest of :mod:`pyattr.runtime`; Ray is an optional extra (``pip install "pyattr[ray]"``).

::

    from pyattr.runtime.batch import run_batch, read_results, decode_map

    summary = run_batch("gradcam.onnx", "images/", "explained/", actors=2)   # starts a local Ray if none runs
    table = read_results("explained/")                     # pyarrow.Table: one row per input, in input order
    row = table.slice(0, 1).to_pylist()[0]
    row["class_name"], row["score"], row["error"]          # error is None for an image that was explained
    decode_map(row)                                        # (H, W) float32 in [0, 1], bit-exact

or ``pyattr batch gradcam.onnx images/ --out explained/ --actors 2`` (one JSON summary line on stdout).

How it runs:

* the driver checks everything that would fail every image first -- the graph (a pyattr export that takes no
  run-time input besides the images: class graphs, and segmentation graphs with the model's predicted region),
  the options, the inputs argument, the output folder (created and written to) -- and stops with one
  :class:`~pyattr.errors.InputError` when one is bad;
* each input gets a key, the first 16 hex digits of the SHA-256 of its absolute path (or of its URI as given);
  the same input listed twice is explained once;
* the graph file's bytes are put once into Ray's object store and each actor writes them to a local temporary
  file (checked against their SHA-256) and opens one session: workers need no copy of the graph;
* ``ray.data.from_items(...).map_batches(ExplainBatch, compute=ActorPoolStrategy(size=actors))`` runs the
  images in batches of the graph's batch (its dynamic batch: ``batch_size``, default 16; a graph with a fixed
  batch N runs batches of N, the last padded). Each actor requests ``threads_per_actor`` CPUs and, where the
  cluster has GPUs, a GPU (:func:`actor_gpus`; its session then picks onnxruntime's CUDA provider or OpenVINO's
  GPU by itself);
* per batch an actor writes each overlay (``overlays/<stem>-<key>.png``) and then the batch's rows
  (``parts/part-<hash of the batch's keys>.parquet``), each to a temporary file renamed into place: a killed
  worker leaves no partial file, and Ray restarts it and retries its batch (Ray Data's actor pools retry lost
  tasks by default), which rewrites the same files;
* an image that cannot be read or explained becomes a row with ``error`` set (the other images go on); a batch
  whose graph run fails gives every image of the batch an error row;
* resume: a rerun with the same ``out`` skips every input that already has a row without error in a part file
  (inputs that failed are tried again), so an interrupted or crashed run continues where it stopped;
* at the end the driver assembles ``results.parquet`` from the part files -- de-duplicated by key (a row without
  error wins, else the last), restricted to this run's inputs, in their order -- and checks that every input
  has exactly one row.

Results table columns: ``key``, ``input``, ``name``, ``explained_class``, ``class_name``, ``score`` (the logit),
``probability``, ``predicted_class``, ``map`` (the graph's map at its input size, float32 little-endian,
zlib-compressed: :func:`decode_map`), ``map_height``, ``map_width``, ``overlay`` (path relative to ``out``, or
null), ``error`` (null, or what went wrong), ``worker`` (``host:pid`` of the actor).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import socket
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pyattr._files import sweep_stale, temp_beside, written_atomically
from pyattr.errors import InputError

__all__ = ["DEFAULT_BATCH_SIZE", "BatchSummary", "ExplainBatch", "actor_gpus", "collect_inputs", "decode_map",
           "input_key", "read_results", "require_ray", "run_batch"]

RAY_INSTALL = 'pip install "pyattr[ray]"'
MIN_RAY = (2, 40)  # the lowest Ray tested with its Data API as used here: ActorPoolStrategy(size=), from_items
DEFAULT_BATCH_SIZE = 16
MAX_INPUT_BYTES = 256 << 20  # one image file read from a URI
KEY_CHARS = 16
RESULTS, PARTS, OVERLAYS = "results.parquet", "parts", "overlays"
PATH_COLUMNS = ("path", "uri", "image", "file")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
COLUMNS = ("key", "input", "name", "explained_class", "class_name", "score", "probability", "predicted_class",
           "map", "map_height", "map_width", "overlay", "error", "worker")


# --- optional dependencies -------------------------------------------------------------------------


def require_ray():
    """``ray`` with ``ray.data``, or an :class:`InputError` saying how to install them."""
    try:
        import ray
        import ray.data
    except ImportError as err:
        raise InputError(f"the batch pipeline runs on Ray Data, which is not installed ({err}); install it with "
                         f"{RAY_INSTALL}") from None
    version = tuple(int(p) for p in re.findall(r"\d+", ray.__version__)[:2])
    if version < MIN_RAY:
        raise InputError(f"the batch pipeline needs Ray >= {'.'.join(map(str, MIN_RAY))}, found {ray.__version__}; "
                         f"upgrade with {RAY_INSTALL} --upgrade")
    return ray


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InputError(f"the batch pipeline writes Parquet with pyarrow, which is not installed; install it with "
                         f"{RAY_INSTALL}") from None
    return pyarrow


# --- inputs ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchInput:
    """One input: its key (:func:`input_key`), the path or URI, and a name (the file stem)."""

    key: str
    input: str
    name: str


def _is_uri(text: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", text) is not None


def _canonical(text: str) -> str:
    if text.startswith("file://"):
        return os.path.abspath(text[7:])  # the same key as the plain path
    return text if _is_uri(text) else os.path.abspath(text)


def input_key(text: str | os.PathLike) -> str:
    """The key of an input: the first 16 hex digits of the SHA-256 of its absolute path (``file://`` URIs
    alike) or of its URI as given. Outputs are named after it, so reruns find them.

    Example:
        >>> input_key("/data/cat.jpg") == input_key("/data/./cat.jpg") == input_key("file:///data/cat.jpg")
        True
    """
    return hashlib.sha256(_canonical(os.fspath(text)).encode("utf-8")).hexdigest()[:KEY_CHARS]


def _name_of(text: str) -> str:
    stem = Path(text.rstrip("/").split("/")[-1]).stem
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", stem).lstrip(".")[:64] or "image"


def collect_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike], column: str | None = None,
                   ) -> list[BatchInput]:
    """The inputs, de-duplicated by key, in order: a folder (its image files, recursively, sorted), a ``.parquet``
    table (its ``column``, default the first of ``path``, ``uri``, ``image``, ``file``), an image path or URI, or a
    list of those. A listed file that does not exist is kept: it becomes an error row, not a stop.

    Raises:
        InputError: no inputs, a folder with no image files, a Parquet table without a path column.
    """
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise InputError("no inputs given: give image files, URIs, folders or a .parquet table of paths")
    texts: list[str] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise InputError(f"an input must be a path or a URI string, got {type(item).__name__}")
        text = os.fspath(item)
        if not _is_uri(text) and Path(text).is_dir():
            found = [str(p) for p in iter_image_files(text)]
            if not found:
                raise InputError(f"no image files in folder {text}")
            texts.extend(found)
        elif text.lower().endswith(".parquet"):
            texts.extend(_parquet_paths(text, column))
        else:
            texts.append(text)
    seen: set[str] = set()
    out = []
    for text in texts:
        key = input_key(text)
        if key not in seen:
            seen.add(key)
            out.append(BatchInput(key, text, _name_of(text)))
    return out


def _parquet_paths(table: str, column: str | None) -> list[str]:
    pa = _pyarrow()
    try:
        schema = pa.parquet.read_schema(table)
    except FileNotFoundError:
        raise InputError(f"no such Parquet table: {table}") from None
    except Exception as err:
        raise InputError(f"{table} is not a readable Parquet table ({type(err).__name__}: {err})") from err
    names = list(schema.names)
    wanted = column or next((c for c in PATH_COLUMNS if c in names), None)
    if wanted is None or wanted not in names:
        raise InputError(f"the Parquet table {table} has no column {column or ' / '.join(PATH_COLUMNS)} of image "
                         f"paths (its columns: {', '.join(names)}); name the column with --column")
    values = pa.parquet.read_table(table, columns=[wanted]).column(wanted).to_pylist()
    if not all(isinstance(v, str) and v for v in values):
        raise InputError(f"the column {wanted!r} of {table} must hold non-empty strings (paths or URIs)")
    return values


def _read_rgb(text: str) -> np.ndarray:
    """An input's pixels, RGB uint8: a local path through :func:`pyattr.runtime.images.read_image`, a URI read with
    pyarrow's filesystems (``s3://``, ``gs://``, ``hdfs://``, ``file://``, ...)."""
    from .images import read_image

    if not _is_uri(text):
        return read_image(text)
    if text.startswith("file://"):
        return read_image(text[7:])
    from PIL import Image

    from .images import check_image_size, to_rgb

    pa = _pyarrow()
    import pyarrow.fs  # noqa: F401

    try:
        fs, path = pa.fs.FileSystem.from_uri(text)
        with fs.open_input_stream(path) as stream:
            data = stream.read(MAX_INPUT_BYTES + 1)
    except Exception as err:
        raise InputError(f"cannot read {text}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from err
    if len(data) > MAX_INPUT_BYTES:
        raise InputError(f"{text} is over {MAX_INPUT_BYTES >> 20} MiB")
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_image_size(im.size, text)
            return to_rgb(im, text)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{text} is not an image that Pillow can read ({type(err).__name__})") from err


# --- GPUs ------------------------------------------------------------------------------------------


def actor_gpus(cluster_gpus: float, actors: int, gpus: str | float = "auto") -> float:
    """The GPUs each actor requests: ``gpus="auto"``: none on a cluster without GPUs, else ``min(1, GPUs / actors)``
    (actors share a GPU when there are more actors than GPUs); a number: that many per actor (0 = CPU only).

    Example:
        >>> actor_gpus(0, 2), actor_gpus(4, 2), actor_gpus(1, 4), actor_gpus(8, 2, gpus=0)
        (0.0, 1.0, 0.25, 0.0)
    """
    if gpus == "auto":
        return 0.0 if cluster_gpus <= 0 else min(1.0, float(cluster_gpus) / max(1, actors))
    try:
        value = float(gpus)
    except (TypeError, ValueError):
        raise InputError(f"gpus must be 'auto' or a number of GPUs per actor, got {gpus!r}") from None
    if not (0 <= value and math.isfinite(value)):
        raise InputError(f"gpus must be >= 0, got {gpus!r}")
    if value > 0 and value > cluster_gpus:
        raise InputError(f"each actor asks for {value} GPU(s) but the cluster has {cluster_gpus}")
    return value


# --- the actor ---------------------------------------------------------------------------------------


def encode_map(values: np.ndarray) -> bytes:
    """A float map as zlib-compressed float32 little-endian bytes (lossless)."""
    return zlib.compress(np.ascontiguousarray(values, dtype="<f4").tobytes(), 6)


def decode_map(row: dict[str, Any]) -> np.ndarray:
    """A results row's map: (``map_height``, ``map_width``) float32, exactly the graph's output.

    Example:
        >>> row = {"map": encode_map(np.eye(2)), "map_height": 2, "map_width": 2}
        >>> decode_map(row).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    if row.get("map") is None:
        raise InputError(f"{row.get('input', 'this row')} has no map ({row.get('error') or 'no result'})")
    flat = np.frombuffer(zlib.decompress(row["map"]), dtype="<f4")
    return flat.reshape(int(row["map_height"]), int(row["map_width"])).astype(np.float32)


class ExplainBatch:
    """Ray Data's class-based UDF: one :class:`~pyattr.runtime.AttributionRuntime` session per actor; each call
    explains a batch of inputs, writes their overlays and one Parquet part file, and returns their keys. Plain
    Python: it runs without Ray too (``ExplainBatch(...)(batch)``), which the tests and the benchmark use.

    Args:
        graph: the ``.onnx`` file's bytes, a path, or ``[ObjectRef]`` of the bytes (put in Ray's object store).
        sha256: the bytes' SHA-256 (hex), checked after they arrive.
        out: the output folder (shared by every worker: a local folder, or a network filesystem on a cluster).
        options: ``overlays`` (bool), ``target`` (None or a class id), ``alpha``, ``cmap``, ``backend``,
            ``providers``, ``num_threads``, ``batch_size``.
    """

    def __init__(self, graph: Any, sha256: str, out: str, options: dict[str, Any]):
        from . import AttributionRuntime

        if isinstance(graph, list):  # [ObjectRef]: wrapped so that Ray hands it over unresolved
            import ray

            graph = ray.get(graph[0])
        self._tmp = None
        if isinstance(graph, (bytes, bytearray, memoryview)):
            data = bytes(graph)
            if hashlib.sha256(data).hexdigest() != sha256:
                raise InputError("the graph's bytes arrived altered (SHA-256 mismatch)")
            self._tmp = tempfile.TemporaryDirectory(prefix="pyattr-batch-")
            path = Path(self._tmp.name) / "graph.onnx"
            path.write_bytes(data)
        else:
            path = Path(graph)
        self.out = Path(out)
        self.options = dict(options)
        self.runtime = AttributionRuntime(path, providers=self.options.get("providers"),
                                          num_threads=int(self.options.get("num_threads", 1)),
                                          backend=self.options.get("backend", "onnxruntime"))
        signed = bool(self.runtime.metadata.get("signed", False))
        self.source = "raw" if signed else "maps"
        self.sign = "centered" if signed else "all"
        self.cmap = self.options.get("cmap") or ("bwr" if signed else "jet")
        batch_dim = self.runtime.graph.inputs[0].shape[0]
        self.fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        rows = self.explain(keys, [str(v) for v in batch["input"]], [str(v) for v in batch["name"]])
        write_part(self.out, rows)
        return {"key": np.asarray(keys, dtype=object),
                "failed": np.asarray([r["error"] is not None for r in rows], dtype=bool)}

    def explain(self, keys: list[str], inputs: list[str], names: list[str]) -> list[dict[str, Any]]:
        """One results row per input (``error`` set where it failed); overlays written."""
        rows = [_empty_row(k, i, n, self.worker) for k, i, n in zip(keys, inputs, names)]
        images: list[np.ndarray] = []
        good: list[int] = []
        for j, text in enumerate(inputs):
            try:
                images.append(_read_rgb(text))
                good.append(j)
            except Exception as err:  # noqa: BLE001 -- every failure is this image's, recorded; the others go on
                rows[j]["error"] = _message(err)
        if not good:
            return rows
        try:
            out = self._run(images)
        except Exception as err:  # noqa: BLE001 -- recorded on each image of the batch
            for j in good:
                rows[j]["error"] = f"the graph run failed for this batch: {_message(err)}"
            return rows
        runtime = self.runtime
        probabilities = runtime.probabilities(out.scores) if runtime.target_kind == "class" else None
        overlays: list[Any] = [None] * len(good)
        if self.options.get("overlays", True):
            try:
                overlays = runtime._overlays(out, images, float(self.options.get("alpha", 0.5)), self.cmap,
                                             self.source, self.sign, 0.0)
            except Exception as err:  # noqa: BLE001 -- recorded on each image of the batch
                for j in good:
                    rows[j]["error"] = f"rendering the overlay failed: {_message(err)}"
                return rows
        for m, j in enumerate(good):
            row = rows[j]
            try:
                k = int(out.explained_class[m])
                if overlays[m] is not None:
                    relative = f"{OVERLAYS}/{row['name']}-{row['key']}.png"
                    _write_png(overlays[m], self.out / relative)
                    row["overlay"] = relative
                row.update(explained_class=k, class_name=runtime.class_name(k), score=float(out.scores[m, k]),
                           probability=None if probabilities is None else float(probabilities[m, k]),
                           predicted_class=int(out.scores[m].argmax()), map=encode_map(out.maps[m]),
                           map_height=int(out.maps.shape[1]), map_width=int(out.maps.shape[2]))
            except Exception as err:  # noqa: BLE001 -- recorded on this image's row
                row["error"] = _message(err)
        return rows

    def _run(self, images: list[np.ndarray]):
        """The graph on the images (padded to a fixed batch, in runs of it, where the graph has one)."""
        from . import GraphOutputs

        runtime = self.runtime
        x = np.stack([runtime._preprocess_one(rgb) for rgb in images])
        target = self.options.get("target")
        step = self.fixed_batch or len(x)
        parts = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            n = len(chunk)
            if self.fixed_batch and n < step:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - n, axis=0)])
            result = runtime.run(chunk, target)
            parts.append([None if a is None else a[:n] for a in result])
        return GraphOutputs(*[None if p[0] is None else np.concatenate(p) for p in zip(*parts)])


def _empty_row(key: str, text: str, name: str, worker: str) -> dict[str, Any]:
    return {"key": key, "input": text, "name": name, "explained_class": None, "class_name": None, "score": None,
            "probability": None, "predicted_class": None, "map": None, "map_height": None, "map_width": None,
            "overlay": None, "error": None, "worker": worker}


def _message(err: BaseException) -> str:
    text = " ".join(str(err).split())[:500]
    return text if isinstance(err, InputError) and text else f"{type(err).__name__}: {text}"


def _write_png(rgb: np.ndarray, path: Path) -> None:
    from PIL import Image

    with written_atomically(path, ".png") as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def _schema():
    pa = _pyarrow()
    return pa.schema([("key", pa.string()), ("input", pa.string()), ("name", pa.string()),
                      ("explained_class", pa.int64()), ("class_name", pa.string()), ("score", pa.float64()),
                      ("probability", pa.float64()), ("predicted_class", pa.int64()), ("map", pa.binary()),
                      ("map_height", pa.int32()), ("map_width", pa.int32()), ("overlay", pa.string()),
                      ("error", pa.string()), ("worker", pa.string())])


def write_part(out: Path, rows: list[dict[str, Any]]) -> Path:
    """The rows of one batch as ``parts/part-<hash of their keys>.parquet``, written to a temporary file and renamed
    into place (a retried batch rewrites the same file)."""
    pa = _pyarrow()
    digest = hashlib.sha256("\n".join(sorted(r["key"] for r in rows)).encode()).hexdigest()[:24]
    path = Path(out) / PARTS / f"part-{digest}.parquet"
    table = pa.Table.from_pylist(rows, schema=_schema())
    with written_atomically(path, ".parquet") as tmp:
        pa.parquet.write_table(table, tmp)
    return path


# --- the driver --------------------------------------------------------------------------------------


@dataclass
class BatchSummary:
    """What a :func:`run_batch` call did: ``total`` inputs, ``skipped`` (done by an earlier run), ``processed`` (rows
    written by this run), ``failed`` (rows with an error in the results table), ``seconds`` (wall time of the Ray
    part), the ``results`` table's path, the ``actors`` and the GPUs each requested."""

    total: int
    skipped: int
    processed: int
    failed: int
    seconds: float
    results: str
    actors: int
    gpus_per_actor: float

    def to_json(self) -> str:
        return json.dumps(self.__dict__)


def _check_options(actors: Any, batch_size: Any, threads_per_actor: Any, alpha: Any) -> None:
    def integer(value: Any, name: str, low: int, high: int) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
            raise InputError(f"{name} must be an int from {low} to {high}, got {value!r}")

    integer(actors, "actors", 1, 4096)
    if batch_size is not None:
        integer(batch_size, "batch_size", 1, 4096)
    integer(threads_per_actor, "threads_per_actor", 1, 1024)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha!r}")


def prepare_output(out: str | os.PathLike) -> Path:
    """Create ``out``, ``out/parts`` and ``out/overlays`` and write a probe file there; an :class:`InputError`
    naming the problem when the folder cannot be written (a file in its path, no permission, a read-only disk)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"the output location {str(out)!r} is a file, not a folder")
    try:
        for folder in (out, out / PARTS, out / OVERLAYS):
            folder.mkdir(parents=True, exist_ok=True)
        probe = temp_beside(out / PARTS / "probe", ".tmp")
        probe.unlink()
    except (FileExistsError, NotADirectoryError):
        raise InputError(f"cannot create the output folder {str(out)!r}: a part of its path is a file") from None
    except OSError as err:
        raise InputError(f"cannot create or write the output folder {str(out)!r}: {err.strerror or err}") from None
    return out


def _read_parts(out: Path, columns: list[str] | None = None):
    """Every readable part file's rows, as one table (unreadable files are skipped: their inputs are redone)."""
    pa = _pyarrow()
    tables = []
    for part in sorted((out / PARTS).glob("part-*.parquet")):
        try:
            tables.append(pa.parquet.read_table(part, columns=columns))
        except Exception as err:  # noqa: BLE001 -- a file cut short by a disk failure: its images are redone
            warnings.warn(f"skipping the unreadable part file {part.name} ({type(err).__name__}); its images are "
                          "explained again", stacklevel=2)
            continue
    if not tables:
        schema = _schema()
        return pa.Table.from_pylist([], schema=pa.schema([schema.field(c) for c in columns]) if columns else schema)
    return pa.concat_tables(tables)


def done_keys(out: str | os.PathLike) -> set[str]:
    """The keys with a row without error in ``out``'s part files: what a rerun skips."""
    table = _read_parts(Path(out), ["key", "error"])
    keys, errors = table.column("key").to_pylist(), table.column("error").to_pylist()
    return {k for k, e in zip(keys, errors) if e is None}


def assemble(out: Path, inputs: list[BatchInput]) -> Any:
    """``results.parquet``: one row per input, in input order, from the part files (a row without error wins,
    else the last one); an :class:`InputError` when an input has no row (which a finished run never leaves)."""
    pa = _pyarrow()
    for folder in (out / PARTS, out / OVERLAYS):  # temporary files of workers killed mid-write
        sweep_stale(folder)
    table = _read_parts(out)
    keys, errors = table.column("key").to_pylist(), table.column("error").to_pylist()
    best: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k not in best or errors[best[k]] is not None:  # the first row without error stays
            best[k] = i
    missing = [x.input for x in inputs if x.key not in best]
    if missing:
        raise InputError(f"{len(missing)} input(s) have no result, e.g. {missing[0]}; run again to finish them")
    result = table.take(pa.array([best[x.key] for x in inputs], pa.int64()))
    with written_atomically(out / RESULTS, ".parquet") as tmp:
        pa.parquet.write_table(result, tmp)
    return result


def read_results(out: str | os.PathLike):
    """The results table of a finished run (``out/results.parquet``) as a ``pyarrow.Table``."""
    path = Path(out) / RESULTS
    if not path.is_file():
        raise InputError(f"no results table at {path}: run the batch first")
    return _pyarrow().parquet.read_table(path)


def run_batch(graph: str | os.PathLike, inputs: Any, out: str | os.PathLike, *, actors: int = 1,
              batch_size: int | None = None, overlays: bool = True, target: int | str | None = None,
              alpha: float = 0.5, cmap: str | None = None, backend: str = "onnxruntime",
              providers: Sequence[str] | None = None, threads_per_actor: int = 1, gpus: str | float = "auto",
              address: str | None = None, column: str | None = None, progress: bool = True,
              on_progress: Callable[[int, int], None] | None = None) -> BatchSummary:
    """Explain every input with the graph on a Ray Data actor pool; see the module docstring.

    Args:
        graph: an ``.onnx`` file written by :func:`pyattr.export` (class or segmentation target).
        inputs: a folder, a ``.parquet`` table of paths (``column``), an image path / URI, or a list of those.
        out: the output folder (``results.parquet``, ``overlays/``, ``parts/``); reruns into it resume.
        actors: the size of the actor pool (one graph session each).
        batch_size: images per graph run (default 16; a graph with a fixed batch N: N).
        overlays: write ``overlays/<stem>-<key>.png`` (the overlay at the image's own size).
        target: a class id or name for every image; None: each image's top class.
        alpha, cmap: the overlay's opacity and colormap (default jet; bwr for signed graphs).
        backend, providers: the runtime's backend and its providers / device (default: CUDA or OpenVINO GPU where
            present, else CPU).
        threads_per_actor: CPUs each actor requests, and its session's threads.
        gpus: GPUs each actor requests: ``"auto"`` (:func:`actor_gpus`) or a number.
        address: a Ray cluster to connect to (``"auto"``, ``"ray://host:10001"``); default: the running one, or a
            local one started here (and shut down at the end).
        progress: a progress bar on stderr; ``on_progress(done, total)`` is called after every batch.

    Returns:
        :class:`BatchSummary`.

    Raises:
        InputError: Ray missing, a bad graph, option, inputs argument or output folder; an input left without a
        result.

    Example:
        >>> summary = run_batch("gradcam.onnx", ["a.png", "s3://bucket/b.jpg"], "explained", actors=2)  # doctest: +SKIP
        >>> summary.total, summary.failed                                                              # doctest: +SKIP
        (2, 0)
    """
    from . import AttributionRuntime

    ray = require_ray()
    _pyarrow()
    _check_options(actors, batch_size, threads_per_actor, alpha)
    graph_path = Path(graph)
    # the file, its metadata and the backend checked here, on the driver's CPU (the workers may have GPUs it lacks)
    runtime = AttributionRuntime(graph_path, num_threads=1, backend=backend,
                                 providers=["CPUExecutionProvider"] if backend == "onnxruntime" else ["CPU"])
    if runtime.target_kind in ("similarity", "detection"):
        raise InputError(f"{graph_path.name} explains a {runtime.target_kind} target, which takes run-time inputs "
                         "(a reference, boxes); the batch pipeline runs class and segmentation graphs: use pyattr run")
    if runtime.targets_per_input is not None:
        raise InputError(f"{graph_path.name} explains {runtime.targets_per_input} targets per image; the batch pipeline "
                         "writes one row per image: export with one target per image, or use pyattr run --target a,b,c")
    if cmap is not None:
        from pyattr.colormaps import COLORMAPS

        if cmap not in COLORMAPS:
            raise InputError(f"unknown colormap {cmap!r}; available: {', '.join(COLORMAPS)}")
    target_id = None if target is None else runtime.class_index(target)
    batch_dim = runtime.graph.inputs[0].shape[0]
    fixed = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
    batch = fixed or batch_size or DEFAULT_BATCH_SIZE
    items = collect_inputs(inputs, column)
    out_path = prepare_output(out)
    done = done_keys(out_path)
    todo = [x for x in items if x.key not in done]
    data = graph_path.read_bytes()
    options = {"overlays": bool(overlays), "target": target_id, "alpha": float(alpha), "cmap": cmap,
               "backend": backend, "providers": list(providers) if providers else None,
               "num_threads": threads_per_actor}
    started_here = False
    gpus_each = 0.0
    start = time.perf_counter()
    processed = 0
    try:
        if todo:
            if not ray.is_initialized():
                ray.init(address=address, include_dashboard=False, logging_level="warning",
                         configure_logging=False)
                started_here = True
            gpus_each = actor_gpus(float(ray.cluster_resources().get("GPU", 0)), actors, gpus)
            processed = _execute(ray, todo, data, out_path, options, actors, batch, threads_per_actor, gpus_each,
                                 progress, on_progress, len(done & {x.key for x in items}))
    finally:
        if started_here:
            ray.shutdown()
    seconds = time.perf_counter() - start
    result = assemble(out_path, items)
    failed = sum(e is not None for e in result.column("error").to_pylist())
    return BatchSummary(total=len(items), skipped=len(items) - len(todo), processed=processed, failed=failed,
                        seconds=round(seconds, 3), results=str(out_path / RESULTS), actors=actors,
                        gpus_per_actor=gpus_each)


def _ray_reason(err: BaseException) -> str:
    """The innermost pyattr error in a Ray exception's text (a worker's traceback), else its last line."""
    text = str(err)
    found = re.findall(r"(?:pyattr\.errors\.)?InputError: ([^\n]+)", text)
    if found:
        return found[-1].strip()[:400]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:400]


def _execute(ray, todo: list[BatchInput], data: bytes, out: Path, options: dict[str, Any], actors: int, batch: int,
             threads: int, gpus: float, progress: bool, on_progress: Callable[[int, int], None] | None,
             already: int) -> int:
    """The Ray Data part: the actor pool over ``todo``; returns the rows written."""
    import logging

    import ray.data
    from tqdm import tqdm

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    graph_ref = ray.put(data)
    blocks = max(1, min(math.ceil(len(todo) / batch), 10_000))
    ds = ray.data.from_items([{"key": x.key, "input": x.input, "name": x.name} for x in todo],
                             override_num_blocks=blocks)
    ds = ds.map_batches(
        ExplainBatch, batch_size=batch, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"graph": [graph_ref], "sha256": hashlib.sha256(data).hexdigest(), "out": str(out),
                               "options": options},
        num_cpus=threads, num_gpus=gpus or None)
    total = len(todo) + already
    done = already
    with tqdm(total=total, initial=already, disable=not progress, unit="img", desc="pyattr batch") as bar:
        results = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
        while True:
            try:
                result = next(results)
            except StopIteration:
                break
            except Exception as err:  # e.g. an actor that cannot start on a worker: one clear error
                raise InputError(f"the Ray job stopped: {_ray_reason(err)}; the results written so far are kept, "
                                 "and a rerun with the same output folder resumes") from err
            n = len(result["key"])
            done += n
            bar.update(n)
            if on_progress is not None:
                on_progress(done, total)
    return done - already


def iter_image_files(folder: str | os.PathLike) -> Iterable[Path]:
    """The image files under ``folder``, recursively, sorted (what a folder input expands to)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
