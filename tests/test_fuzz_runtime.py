"""Property tests (hypothesis) over the runtime's inputs: metadata JSON of crafted ONNX files, zip metadata
of .pt/.pt2 archives, targets, command-line options and image bytes.

For every example: no exception other than pyattr's own (:class:`pyattr.errors.PyattrError`) from the API;
from the CLI exit code 0, or exit code 2 with exactly one ``pyattr: error:`` line and no traceback; no file
anywhere but inside ``--out``; after a failure nothing in ``--out``; after a success exactly the announced
files. The graphs are tiny hand-built ONNX files (tests/runtime_graphs.py), so an example costs tens of
milliseconds. Examples are derandomized (the same in every CI run); ``PYATTR_FUZZ_RANDOM=1`` draws new ones
and ``PYATTR_FUZZ_EXAMPLES=N`` sets how many.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from runtime_graphs import good_metadata, write_graph

from pyattr.errors import PyattrError
from pyattr.runtime import AttributionRuntime
from pyattr.runtime.cli import main as run_main
from pyattr.runtime.metadata import read_metadata

EXAMPLES = int(os.environ.get("PYATTR_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("PYATTR_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)

# JSON values, hostile ones included: traversal strings, huge and negative numbers, wrong nesting
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**63), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20), st.sampled_from(["../../x", "a/b", ".", "..", "", "RGB", "NCHW", "bilinear", "\x00", "CON"]),
)
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
sizes = st.lists(st.one_of(st.integers(-5, 70000), st.sampled_from([8, 60000]), json_scalars), max_size=3)
FIELDS = {
    "method": st.one_of(st.sampled_from(["saliency", "../../escape", "a/b", "..", ".x", "x" * 65]), json_scalars),
    "layer": json_values,
    "signed": json_values,
    "input_shape": st.one_of(st.just([3, 8, 8]), sizes),
    "class_names": st.one_of(st.just(["a", "b", "c", "d"]), st.lists(json_scalars, max_size=6), json_scalars),
    "preprocessing.size": st.one_of(st.just([8, 8]), sizes),
    "preprocessing.scale": json_scalars,
    "preprocessing.mean": st.one_of(st.lists(json_scalars, max_size=4), json_scalars),
    "preprocessing.std": st.one_of(st.lists(st.floats(-2, 2), max_size=4), json_scalars),
    "preprocessing.resize": json_scalars,
    "preprocessing.color": json_scalars,
    "preprocessing.layout": json_scalars,
    "preprocessing": json_values,
}


@st.composite
def metadata(draw) -> Any:
    """Valid metadata with a few fields replaced, or an arbitrary JSON value."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    meta = good_metadata()
    for field in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True)):
        value = draw(FIELDS[field])
        if field.startswith("preprocessing.") and isinstance(meta.get("preprocessing"), dict):
            meta["preprocessing"][field.split(".", 1)[1]] = value
        elif "." not in field:
            meta[field] = value
    for key, value in draw(st.dictionaries(st.text(max_size=6), json_scalars, max_size=2)).items():
        meta.setdefault(key, value)
    return meta


def write_image(folder: Path, name: str = "img.png") -> Path:
    file = folder / name
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(file)
    return file


def cli(args: list[Any]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            code = run_main([str(a) for a in args], prog="pyattr run")
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


def check_cli_result(root: Path, out: Path, code: int, stdout: str, stderr: str, before: set[Path]) -> list[dict]:
    """The CLI contract: 0 with one JSON line per image and exactly its files, or 2 with one error line and
    nothing written; never a file outside ``out``."""
    assert "Traceback" not in stderr
    written = {p for p in root.rglob("*")} - before
    assert all(p == out or out in p.parents for p in written), written
    if code == 2:
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyattr: error: "), stderr
        assert stdout == ""
        assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())
        return []
    assert code == 0, (code, stderr)
    results = [json.loads(line) for line in stdout.splitlines()]
    announced = {Path(r[key]) for r in results for key in ("overlay", "maps") if key in r}
    assert set(out.iterdir()) == announced
    assert all(p.parent == out for p in announced)
    return results


@FUZZ
@given(meta=metadata())
def test_fuzz_metadata_of_onnx_graphs(meta):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        path = write_graph(root / "graph.onnx", meta)
        image = write_image(root)
        try:
            runtime = AttributionRuntime(path)
        except PyattrError:
            runtime = None
        try:
            read = read_metadata(path)
        except PyattrError:
            read = None
        if runtime is not None:  # what the runtime accepts, read_metadata accepts too
            assert read == meta
        out = root / "out"
        before = set(root.rglob("*"))
        code, stdout, stderr = cli([path, image, "--out", out, "--save-maps"])
        assert (code == 0) == (runtime is not None), stderr
        results = check_cli_result(root, out, code, stdout, stderr, before)
        if results:
            assert results[0]["overlay"] == str(out / f"img_{meta['method']}_overlay.png")


@FUZZ
@given(text=st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
                      st.sampled_from(["{", "[]", "null", "NaN", '{"method": NaN}', "1" * 5000, "[" * 5000])))
def test_fuzz_raw_metadata_text(text):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        path = write_graph(root / "graph.onnx", raw_text=text)
        for call in (lambda: AttributionRuntime(path), lambda: read_metadata(path)):
            try:
                call()
            except PyattrError:
                pass
        out, image = root / "out", write_image(root)
        before = set(root.rglob("*"))
        check_cli_result(root, out, *cli([path, image, "--out", out]), before)


@FUZZ
@given(entries=st.lists(st.tuples(st.sampled_from(["a/extra/pyattr.json", "b/extra/pyattr.json", "extra/pyattr.json",
                                                   "a/data.pkl", "a/extra/pyattr.json/x"]),
                                  st.one_of(st.binary(max_size=50), json_values.map(json.dumps).map(str.encode))),
                        max_size=3),
       suffix=st.sampled_from([".pt", ".pt2"]), garbage=st.binary(max_size=30))
def test_fuzz_zip_metadata(entries, suffix, garbage):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"model{suffix}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate zip entry names
            with zipfile.ZipFile(path, "w") as z:
                for name, data in entries:
                    z.writestr(name, data)
        if garbage:
            path.write_bytes(path.read_bytes()[: len(garbage)] + garbage)
        try:
            meta = read_metadata(path)
        except PyattrError:
            return
        assert isinstance(meta, dict)


targets = st.one_of(
    st.integers(-10, 10), st.floats(), st.booleans(), st.text(max_size=12),
    st.sampled_from(["class_1", "-1", "-2", "3", " 2 ", "1e3", "class_9", "CLASS_1"]),
    st.lists(st.one_of(st.integers(-3, 6), st.floats(-2, 5), st.booleans(), st.sampled_from(["class_0", "x"])),
             min_size=0, max_size=4),
)


@FUZZ
@given(target=targets)
def test_fuzz_targets(target):
    runtime = _runtime()
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    try:
        out = runtime.run(x, target)
    except PyattrError:
        return
    explained = out.explained_class.tolist()
    assert all(0 <= k < 4 for k in explained)
    flat = target if isinstance(target, list) else [target] * 3
    for t, k in zip(flat, explained):  # an accepted target is explained exactly, never truncated
        assert not isinstance(t, (float, bool))
        if isinstance(t, int) and t >= 0:
            assert k == t
        if isinstance(t, str) and t.strip().startswith("class_"):
            assert k == int(t.strip()[6:])


_RUNTIME: list[AttributionRuntime] = []
_GRAPH = tempfile.TemporaryDirectory()


def _runtime() -> AttributionRuntime:
    if not _RUNTIME:
        _RUNTIME.append(AttributionRuntime(write_graph(Path(_GRAPH.name) / "graph.onnx"), num_threads=1))
    return _RUNTIME[0]


options = st.lists(st.one_of(
    st.tuples(st.just("--alpha"), st.one_of(st.floats(-1, 2), st.text(max_size=4))),
    st.tuples(st.just("--batch-size"), st.one_of(st.integers(-2, 5000), st.text(max_size=3))),
    st.tuples(st.just("--threads"), st.one_of(st.integers(-2, 10**6), st.text(max_size=3))),
    st.tuples(st.just("--cmap"), st.sampled_from(["jet", "viridis", "nope", "../x", ""])),
    st.tuples(st.just("--sign"), st.sampled_from(["all", "centered", "absolute", "bad"])),
    st.tuples(st.just("--source"), st.sampled_from(["maps", "raw", "grad"])),
    st.tuples(st.just("--outlier-perc"), st.one_of(st.floats(-5, 60), st.text(max_size=3))),
    st.tuples(st.just("--target"), st.one_of(st.text(max_size=8), st.integers(-3, 6).map(str))),
    st.tuples(st.just("--providers"), st.sampled_from(["CPUExecutionProvider", "Nope", ","])),
    st.tuples(st.just("--save-maps"), st.none()),
), max_size=4)


@FUZZ
@given(opts=options, names=st.lists(st.sampled_from(["a.png", "a.jpg", "a_1.png", ".h.png", "b.bmp"]),
                                    min_size=1, max_size=4, unique=True))
def test_fuzz_cli_options(opts, names):
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        path = write_graph(root / "graph.onnx")
        images = [write_image(root, name) for name in names]
        args = [path, *images, "--out", root / "out"]
        for flag, value in opts:
            args += [flag] if value is None else [flag, value]
        before = set(root.rglob("*"))
        results = check_cli_result(root, root / "out", *cli(args), before)
        if results:
            assert len(results) == len(images)
            assert len({r["overlay"] for r in results}) == len(images)  # colliding stems, distinct outputs


@FUZZ
@given(cut=st.integers(0, 400), flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=4))
def test_fuzz_image_bytes(cut, flips):
    """A good image then a damaged one (truncated, bytes flipped): all or nothing."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        path = write_graph(root / "graph.onnx")
        good = write_image(root, "good.png")
        data = bytearray(good.read_bytes())
        for at, value in flips:
            data[at % len(data)] = value
        bad = root / "bad.png"
        bad.write_bytes(bytes(data[: len(data) - cut]))
        before = set(root.rglob("*"))
        results = check_cli_result(root, root / "out", *cli([path, good, bad, "--out", root / "out",
                                                            "--batch-size", "1"]), before)
        assert len(results) in (0, 2)
