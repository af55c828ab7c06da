"""Issue 13, the runtime / exported-file side: untrusted files are data, resources are bounded, nothing is
written outside ``--out`` or left half-written, every CLI failure is one ``pyattr: error:`` line.

Most tests run on tiny hand-built ONNX graphs (tests/runtime_graphs.py: milliseconds, no trace). The
hostile ``.pt2`` is built here: a real ``torch.export`` archive whose constant is marked ``use_pickle``
and holds a pickle that writes a marker file when unpickled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_graphs import good_metadata, scores_of, write_graph

import pyattr
from pyattr import _files
from pyattr.errors import InputError
from pyattr.runtime import AttributionRuntime
from pyattr.runtime.cli import main as run_main
from pyattr.runtime.cli import unique_stems

ROOT = Path(__file__).resolve().parents[1]


# --- helpers ---------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this writes ``marker``: stands for any code an attacker's pickle would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "executed"))


class _WithConstant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.ones(3)

    def forward(self, x):
        return x + self.c


def hostile_pt2(path: Path, marker: Path, meta: dict) -> Path:
    """A .pt2 whose tensor constant is a pickle (``use_pickle``) that runs code on ``torch.export.load``."""
    ep = torch.export.export(_WithConstant(), (torch.zeros(3),))
    torch.export.save(ep, str(path), extra_files={"pyattr.json": json.dumps(meta)})
    with zipfile.ZipFile(path) as z:
        entries = {i.filename: z.read(i) for i in z.infolist()}
    config_name = next(n for n in entries if n.endswith("model_constants_config.json"))
    root = config_name.split("/")[0]
    config = json.loads(entries[config_name])
    for entry in config["config"].values():
        entry["use_pickle"] = True
        buffer = io.BytesIO()
        torch.save(_Payload(marker), buffer)
        entries[f"{root}/data/constants/{entry['path_name']}"] = buffer.getvalue()
    entries[config_name] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def write_images(folder: Path, names: list[str], size=(12, 10), seed=0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name in names:
        file = folder / name
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(file)
        files.append(file)
    return files


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = run_main([str(a) for a in args], prog="pyattr run")
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyattr: error: "), err
    assert "Traceback" not in err
    return lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture()
def graph(tmp_path) -> Path:
    return write_graph(tmp_path / "graph.onnx")


# --- 1. untrusted files are data -------------------------------------------------------------------


def test_read_metadata_of_a_hostile_pt2_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    meta = good_metadata()
    path = hostile_pt2(tmp_path / "evil.pt2", marker, meta)
    assert pyattr.read_metadata(path) == meta
    assert not marker.exists()
    from pyattr.runtime.metadata import read_metadata  # the torch-free reader

    assert read_metadata(path) == meta
    assert not marker.exists()
    # the file really is hostile: loading the program (what read_metadata did before) runs the payload
    with contextlib.suppress(Exception):  # whatever it does after unpickling, the payload has run
        torch.export.load(str(path))
    assert marker.read_text() == "executed"


def test_read_metadata_of_torchscript_reads_the_zip_entry_only(tmp_path):
    """A .pt archive whose code and pickles are garbage: torch.jit.load would fail on it; read_metadata
    only needs ``<root>/extra/pyattr.json``."""
    meta = good_metadata()
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/extra/pyattr.json", json.dumps(meta))
        z.writestr("model/data.pkl", b"\x80\x04cos\nsystem\n(S'touch /tmp/never'\ntR.")
    with pytest.raises(RuntimeError):
        torch.jit.load(str(path))
    assert pyattr.read_metadata(path) == meta


@pytest.mark.parametrize("suffix", [".onnx", ".pt", ".pt2"])
def test_read_metadata_of_missing_or_corrupt_files(tmp_path, suffix):
    with pytest.raises(InputError, match="no such file"):
        pyattr.read_metadata(tmp_path / f"missing{suffix}")
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    with pytest.raises(InputError, match="corrupt" + suffix.replace(".", r"\.")):
        pyattr.read_metadata(corrupt)
    with pytest.raises(InputError, match="not a file"):
        pyattr.read_metadata(tmp_path)


def test_zip_metadata_limits_and_json(tmp_path):
    from pyattr.runtime.metadata import MAX_METADATA_BYTES

    path = tmp_path / "big.pt2"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:  # 5 MB of spaces compress to a few kB
        z.writestr("a/extra/pyattr.json", "{" + " " * (MAX_METADATA_BYTES + 10) + "}")
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match="over the limit"):
        pyattr.read_metadata(path)
    for text, message in [("{bad", "not valid JSON"), ("[1, 2]", "must be a JSON object"),
                          ('{"scale": NaN}', "not valid JSON"), ("[" * 100_000, "not valid JSON")]:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("a/extra/pyattr.json", text)
        with pytest.raises(InputError, match=message):
            pyattr.read_metadata(path)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a/extra/other.json", "{}")
    with pytest.raises(InputError, match="holds no pyattr metadata"):
        pyattr.read_metadata(path)


def test_runtime_refuses_code_formats(tmp_path, capsys):
    marker = tmp_path / "marker"
    path = hostile_pt2(tmp_path / "evil.pt2", marker, good_metadata())
    image = write_images(tmp_path / "img", ["a.png"])[0]
    for suffix in (".pt2", ".pt"):
        model = path.rename(path.with_suffix(suffix))
        code, out, err = run_cli([model, image, "--out", tmp_path / "out"], capsys)
        assert code == 2 and out == "" and "runs ONNX graphs (.onnx) only" in one_error_line(err)
        path = model
    disguised = tmp_path / "evil.onnx"  # a zip named .onnx is not ONNX: onnxruntime refuses it, nothing runs
    (tmp_path / "evil.pt").rename(disguised)
    code, _, err = run_cli([disguised, image, "--out", tmp_path / "out"], capsys)
    assert code == 2 and "onnxruntime cannot load evil.onnx" in one_error_line(err)
    assert not marker.exists() and listing(tmp_path / "out") == []


def test_onnx_external_data_cannot_reach_outside_the_model_folder(tmp_path, capsys):
    """ONNX tensors may name an external data file; one outside the model's folder is refused by onnxruntime
    (so a graph cannot read /etc/... into its outputs), reported as one error line."""
    import onnx
    from onnx import TensorProto

    model = onnx.load_from_string(write_graph(tmp_path / "g.onnx").read_bytes())
    weights = next(t for t in model.graph.initializer if t.name == "W")
    weights.ClearField("raw_data")
    weights.ClearField("float_data")
    weights.data_location = TensorProto.EXTERNAL
    weights.external_data.add(key="location", value="../../../../../etc/hostname")
    path = tmp_path / "leak.onnx"
    path.write_bytes(model.SerializeToString())
    image = write_images(tmp_path / "img", ["a.png"])[0]
    code, out, err = run_cli([path, image, "--out", tmp_path / "out"], capsys)
    assert code == 2 and out == "" and "External data path" in one_error_line(err)


HOSTILE = [  # (field path, value, message part)
    (("method",), "../../escape", "metadata field 'method'"),
    (("method",), "a/b", "metadata field 'method'"),
    (("method",), ".hidden", "metadata field 'method'"),
    (("method",), 7, "metadata field 'method'"),
    (("layer",), {"x": 1}, "metadata field 'layer'"),
    (("layer",), ["layer2", 3], "metadata field 'layer'"),
    (("signed",), "yes", "metadata field 'signed'"),
    (("input_shape",), [3, 9, 8], "metadata field 'input_shape'"),
    (("preprocessing", "size"), [60000, 60000], "metadata field 'preprocessing.size'"),
    (("preprocessing", "size"), [16, 16], "metadata field 'preprocessing.size'"),
    (("preprocessing", "size"), [8, True], "metadata field 'preprocessing.size'"),
    (("preprocessing", "scale"), "1/255", "metadata field 'preprocessing.scale'"),
    (("preprocessing", "std"), [0.2, 0, 0.2], "metadata field 'preprocessing.std'"),
    (("preprocessing", "mean"), [0.5, 0.5], None),  # a 3-channel graph needs 3 means
    (("preprocessing", "resize"), "magic", "metadata field 'preprocessing.resize'"),
    (("preprocessing", "color"), "CMYK", "metadata field 'preprocessing.color'"),
    (("preprocessing", "mystery"), 1, "unknown keys"),
    (("preprocessing",), [1, 2], "metadata field 'preprocessing'"),
    (("class_names",), "circle", "metadata field 'class_names'"),
    (("class_names",), ["a", 1, "c", "d"], "metadata field 'class_names'"),
    (("class_names",), ["a", "b", "c"], "holds 3 names but the graph scores 4 classes"),
]


@pytest.mark.parametrize("where,value,message", HOSTILE, ids=[f"{'.'.join(h[0])}={h[1]!r}"[:40] for h in HOSTILE])
def test_metadata_schema(tmp_path, capsys, where, value, message):
    meta = good_metadata()
    node = meta
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    path = write_graph(tmp_path / "hostile.onnx", meta)
    with pytest.raises(InputError, match=message and message.replace("(", r"\(").replace(".", r"\.")):
        AttributionRuntime(path)
    image = write_images(tmp_path / "img", ["a.png"])[0]
    code, out, err = run_cli([path, image, "--out", tmp_path / "out"], capsys)
    assert code == 2 and out == ""
    one_error_line(err)
    assert listing(tmp_path / "out") == [] and sorted(p.name for p in tmp_path.iterdir()) == ["hostile.onnx", "img"]


def test_malformed_metadata_json_is_one_error_line(tmp_path, capsys):
    image = write_images(tmp_path / "img", ["a.png"])[0]
    for text in ("{not json", "[]", "1e999999", '{"method": Infinity}'):
        path = write_graph(tmp_path / "bad.onnx", raw_text=text)
        code, _, err = run_cli([path, image, "--out", tmp_path / "out"], capsys)
        assert code == 2 and "bad.onnx: its pyattr metadata" in one_error_line(err), (text, err)
        with pytest.raises(InputError):
            pyattr.read_metadata(path)


# --- 1. at export ---------------------------------------------------------------------------------


def _tiny_model(k: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, k)).eval()


@pytest.mark.parametrize("kwargs,message", [
    ({"class_names": "circle"}, "class_names must be a list of strings"),
    ({"class_names": ["a", 2, "c", "d"]}, "class_names must be a list of strings"),
    ({"metadata": {"when": object()}}, "the metadata is not JSON: field 'when'"),
    ({"metadata": {"x": float("nan")}}, "the metadata is not JSON: field 'x'"),
    ({"metadata": {"method": "../x"}}, "are pyattr's own"),
    ({"preprocessing": {"size": [60000, 60000]}}, "metadata field 'preprocessing.size'"),
    ({"preprocessing": {"size": [16, 16]}}, "metadata field 'preprocessing.size' must be the graph's input size"),
    ({"dtype": torch.float64}, "the example input is float64"),
])
def test_export_rejects_bad_metadata_before_the_trace(tmp_path, monkeypatch, kwargs, message):
    from pyattr import exporting

    def no_trace(*args, **kw):
        raise AssertionError("traced before the metadata was checked")

    monkeypatch.setattr(exporting, "trace_graph", no_trace)
    model = _tiny_model()
    dtype = kwargs.pop("dtype", torch.float32)
    if dtype == torch.float64:
        model = model.double()
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        pyattr.export(pyattr.Saliency(model), torch.rand(1, 3, 8, 8, dtype=dtype), tmp_path / "x.onnx", **kwargs)
    assert listing(tmp_path) == []


def test_export_rejects_class_names_of_the_wrong_length(tmp_path):
    with pytest.raises(InputError, match="class_names holds 3 names but the model scores 4 classes"):
        pyattr.export(pyattr.Saliency(_tiny_model(4)), torch.rand(1, 3, 8, 8), tmp_path / "x.pt2",
                      class_names=["a", "b", "c"])
    assert listing(tmp_path) == []


# --- 2. bounded resources --------------------------------------------------------------------------


@pytest.mark.parametrize("threads", ["100000", "1000", "-1"])
def test_thread_counts_are_bounded(graph, tmp_path, threads):
    """Subprocess: before the bound, 100000 threads segfaulted onnxruntime and 1000 hung it."""
    from pyattr.runtime import max_threads

    image = write_images(tmp_path / "img", ["a.png"])[0]
    result = subprocess.run([sys.executable, "-m", "pyattr", "run", str(graph), str(image), "--out",
                             str(tmp_path / "out"), "--threads", threads], check=False, capture_output=True, text=True,
                            timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and result.stdout == ""
    line = one_error_line(result.stderr)
    assert f"--threads must be from 0 (all cores) to {max_threads()}" in line
    with pytest.raises(InputError, match="num_threads must be"):
        AttributionRuntime(graph, num_threads=int(threads))
    with pytest.raises(InputError, match="num_threads must be an int"):
        AttributionRuntime(graph, num_threads=1.5)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG file that declares ``width`` x ``height`` (8-bit RGB) and holds one empty IDAT: a few dozen
    bytes that a decoder would expand to ``3 * width * height`` bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [12_000, 20_000])  # over pyattr's limit (89 Mpx); over Pillow's bomb error limit too
def test_decompression_bomb_is_refused_before_decoding(graph, tmp_path, capsys, side):
    bomb = png_header_only(tmp_path / "bomb.png", side, side)
    if side == 12_000:
        with warnings.catch_warnings():  # Pillow warns only, between 89 and 179 Mpx
            warnings.simplefilter("ignore")
            with Image.open(bomb) as im:
                assert im.size == (side, side)
    good = write_images(tmp_path, ["good.png"])[0]
    code, out, err = run_cli([graph, good, bomb, "--out", tmp_path / "out"], capsys)
    assert code == 2 and out == "" and "over the limit" in one_error_line(err)
    assert listing(tmp_path / "out") == []
    runtime = AttributionRuntime(graph)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the check comes before Pillow's own warning
        with pytest.raises(InputError, match="over the limit"):
            runtime.explain([bomb])


def test_batch_size_is_bounded(graph, tmp_path, capsys):
    image = write_images(tmp_path / "img", ["a.png"])[0]
    for size in ("0", "5000"):
        code, _, err = run_cli([graph, image, "--batch-size", size, "--out", tmp_path / "o"], capsys)
        assert code == 2 and "--batch-size must be from 1 to 4096" in one_error_line(err)
    with pytest.raises(InputError, match="batch_size must be an int from 1 to 4096"):
        AttributionRuntime(graph).explain([image], batch_size=10**9)


@pytest.mark.parametrize("broken,message", [("class", "explained_class values outside 0..3"),
                                            ("run", "onnxruntime failed running broken.onnx")])
def test_graph_outputs_are_checked(tmp_path, capsys, broken, message):
    """A crafted graph that returns out-of-range classes (used to index the scores) or fails when run."""
    path = write_graph(tmp_path / "broken.onnx", broken=broken)
    image = write_images(tmp_path / "img", ["a.png"])[0]
    with pytest.raises(InputError, match=message):
        AttributionRuntime(path).explain([image])
    code, out, err = run_cli([path, image, "--out", tmp_path / "out"], capsys)
    assert code == 2 and out == "" and message in one_error_line(err)
    assert listing(tmp_path / "out") == []


# --- 3. nothing outside --out ----------------------------------------------------------------------


def test_output_names_stay_inside_out(graph, tmp_path, capsys):
    from pyattr.runtime.cli import output_path

    out = tmp_path / "out"
    for bad in ("../x", "a/b", ".hidden", "..", "a\0b"):
        with pytest.raises(InputError, match="not a plain file name inside --out"):
            output_path(out, bad, "")
    # an image named like a traversal is just a file name; its outputs land inside --out
    image = write_images(tmp_path / "img", ["..weird name.png"])[0]
    code, out_text, err = run_cli([graph, image, "--out", out], capsys)
    assert code == 0, err
    line = json.loads(out_text)
    assert Path(line["overlay"]).parent == out and listing(out) == ["weird name_saliency_overlay.png"]


@pytest.mark.parametrize("method", ["/../../../../escaped", "../x", "a\nb"])
def test_triton_generator_keeps_the_repository_inside(tmp_path, method):
    """export/triton/make_model_repository.py names the model folder after the metadata's method."""
    graph = write_graph(tmp_path / "g.onnx", {**good_metadata(), "method": method})
    repository = tmp_path / "deep" / "er" / "repo"
    result = subprocess.run([sys.executable, str(ROOT / "export" / "triton" / "make_model_repository.py"),
                             str(graph), "--repository", str(repository)], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 1 and "its metadata's method must be a name" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["g.onnx"]


# --- 4. targets ------------------------------------------------------------------------------------


def test_targets_are_validated_not_truncated(graph, tmp_path):
    runtime = AttributionRuntime(graph)
    x = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    for bad in (2.5, 2.0, True, np.float32(1.0), np.bool_(False), [1.5, 0, 0], [True, 0, 1], np.array([0.0, 1, 2])):
        with pytest.raises(InputError, match="a target must be a class id"):
            runtime.run(x, target=bad)
    for bad in (-2, "-2", [0, -3, 1], 4):
        with pytest.raises(InputError, match="out of range"):
            runtime.run(x, target=bad)
    assert runtime.run(x, target="class_2").explained_class.tolist() == [2, 2, 2]
    assert runtime.run(x, target=["class_3", 0, "-1"]).explained_class.tolist() == [
        3, 0, int(scores_of(x[2:], 4).argmax())]
    assert runtime.run(x, target=np.array([1, 2, 3])).explained_class.tolist() == [1, 2, 3]
    explained = runtime.explain([np.zeros((8, 8, 3), np.uint8)] * 2, target=["class_1", 3])
    assert [e.explained_class for e in explained] == [1, 3]


def test_unknown_target_name_suggests_close_names(tmp_path, capsys):
    names = [f"class_{i:04d}" for i in range(1000)]
    meta = {**good_metadata(1000), "class_names": names}
    path = write_graph(tmp_path / "big.onnx", meta, k=1000)
    image = write_images(tmp_path / "img", ["a.png"])[0]
    code, _, err = run_cli([path, image, "--target", "class_0123x", "--out", tmp_path / "o"], capsys)
    line = one_error_line(err)
    assert code == 2 and "did you mean 'class_0123'" in line and len(line) < 300
    code, _, err = run_cli([path, image, "--target", "zebra", "--out", tmp_path / "o"], capsys)
    line = one_error_line(err)
    assert code == 2 and "the graph has 1000 classes, e.g. 'class_0000'" in line and len(line) < 300


# --- 5. nothing partial ----------------------------------------------------------------------------


def test_corrupt_image_late_in_the_list_leaves_nothing(graph, tmp_path, capsys):
    files = write_images(tmp_path / "img", [f"{i}.png" for i in range(4)])
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) // 2])  # a valid header, truncated pixel data: fails when decoded
    code, out, err = run_cli([graph, *files, "--batch-size", "1", "--out", tmp_path / "out"], capsys)
    assert code == 2 and out == ""
    assert "3.png is not an image that Pillow can read" in one_error_line(err)
    assert listing(tmp_path / "out") == []  # not the first three overlays, not the staging folder


def test_colliding_stems_get_distinct_outputs(graph, tmp_path, capsys):
    files = write_images(tmp_path / "img", ["a.png", "a.jpg", "a_1.png", "a.bmp"])
    code, out, err = run_cli([graph, *files, "--out", tmp_path / "out", "--save-maps"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["image"] for line in lines] == ["a", "a_2", "a_1", "a_3"]
    assert len(listing(tmp_path / "out")) == 8
    runtime = AttributionRuntime(graph)
    for file, line in zip(files, lines):  # each output is its own image's
        expected = runtime.explain([file])[0]
        np.testing.assert_array_equal(np.asarray(Image.open(line["overlay"])), expected.overlay)
    assert unique_stems(["a", "a", "a_1", "a_1", "b"]) == ["a", "a_2", "a_1", "a_1_1", "b"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temp_files_of_killed_writers_are_swept(tmp_path):
    host = _files._tag().split("-")[1]
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".model.pyattr-{host}-{dead}-abc.tmp.onnx"
    stale.write_bytes(b"half")
    stale_dir = tmp_path / f".pyattr-run.pyattr-{host}-{dead}-xyz"
    stale_dir.mkdir()
    (stale_dir / "a.png").write_bytes(b"x")
    alive = tmp_path / f".model.pyattr-{host}-{live}-def.tmp.onnx"
    alive.write_bytes(b"in progress")
    other_host = tmp_path / f".model.pyattr-otherhost-{dead}-ghi.tmp.onnx"
    other_host.write_bytes(b"not ours to judge")
    user_file = tmp_path / ".model.notes"
    user_file.write_text("keep")
    tmp = _files.temp_beside(tmp_path / "model.onnx", ".tmp.onnx")
    assert not stale.exists() and not stale_dir.exists()
    later = tmp_path / f".other.pyattr-{host}-{dead}-jkl.tmp.png"  # swept once per folder and process
    later.write_bytes(b"half")
    _files.temp_beside(tmp_path / "other.png", ".png").unlink()
    assert later.exists()
    assert _files.sweep_stale(tmp_path) == [later] and not later.exists()
    assert alive.exists() and other_host.exists() and user_file.exists() and tmp.exists()


SIGTERM_SCRIPT = """
import sys, time
from pathlib import Path
from pyattr._files import temp_beside, terminate_cleanly
from pyattr.errors import PyattrError
try:
    with terminate_cleanly():
        tmp = temp_beside(Path(sys.argv[1]), ".tmp.onnx")
        try:
            print(tmp, flush=True)
            time.sleep(60)
        finally:
            tmp.unlink(missing_ok=True)
except PyattrError as err:
    print(f"pyattr: error: {err}", file=sys.stderr)
    sys.exit(2)
"""


def test_sigterm_removes_the_temp_file(tmp_path):
    """The pattern of export (temp_beside + finally) and of `pyattr run` (staging folder + finally) under
    terminate_cleanly, which both CLIs' main() wrap around the command."""
    process = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path / "model.onnx")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    tmp = Path(process.stdout.readline().strip())
    assert tmp.exists()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and "terminated by SIGTERM" in one_error_line(err)
    assert listing(tmp_path) == []


@pytest.mark.slow
def test_sigterm_during_pyattr_export_leaves_no_temp_file(tmp_path):
    """`pyattr export` killed with SIGTERM while its hidden temp file exists (40-55 s on 2 loaded cores)."""
    process = subprocess.Popen([sys.executable, "-m", "pyattr", "export", str(tmp_path / "g.onnx"), "--method",
                                "saliency"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 400
    while not list(tmp_path.glob(".g.pyattr-*")):
        assert process.poll() is None, "the export finished before its temp file was seen"
        assert time.monotonic() < deadline, "no temp file within 400 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 2 and "terminated by SIGTERM" in one_error_line(err)
    assert listing(tmp_path) == []


def test_sigterm_during_pyattr_run_leaves_nothing(graph, tmp_path):
    files = write_images(tmp_path / "img", [f"{i:03d}.png" for i in range(80)], size=(300, 300))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "pyattr", "run", str(graph), str(tmp_path / "img"),
                                "--out", str(out), "--batch-size", "1", "--threads", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the staging folder holds some overlays
        staged = [p for p in out.glob(".pyattr-run.*/*.png")] if out.exists() else []
        if len(staged) >= 3:
            break
        time.sleep(0.01)
    else:
        process.kill()
        pytest.fail("pyattr run wrote no staged overlay within 60 s")
    process.send_signal(signal.SIGTERM)
    stdout, err = process.communicate(timeout=60)
    assert process.returncode == 2 and stdout == "" and "terminated by SIGTERM" in one_error_line(err)
    assert listing(out) == [] and len(files) == 80


# --- 6. CLI errors ---------------------------------------------------------------------------------


def test_cli_errors_are_one_line(graph, tmp_path, capsys):
    image = write_images(tmp_path / "img", ["a.png"])[0]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ([graph, image, "--out", a_file], "is a file, not a folder"),
        ([graph, image, "--out", a_file / "sub"], "a part of its path is a file"),
        ([graph, image, "--out", "/proc/self/pyattr_out"], "cannot create the output folder"),
        ([tmp_path / "missing.onnx", image], "no such model file"),
        ([graph, tmp_path / "missing.png"], "no such file"),
        ([graph, image, "--threads", "x"], "invalid int value"),
        ([graph, image, "--source", "nope"], "invalid choice"),
    ]
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x0a\xff\xff\xff\xff garbage")
    cases.append(([corrupt, image, "--out", tmp_path / "o"], "onnxruntime cannot load corrupt.onnx"))
    for args, message in cases:
        try:
            code, out, err = run_cli(args, capsys)
        except SystemExit as exit_:  # argparse's usage errors
            code, captured = exit_.code, capsys.readouterr()
            out, err = captured.out, captured.err
        assert code == 2 and out == "", (args, err)
        assert message in one_error_line(err), (args, err)
    if os.geteuid() != 0:  # root writes into read-only folders
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run_cli([graph, image, "--out", locked], capsys)
        assert code == 2 and "cannot write into the output folder" in one_error_line(err)


def test_broken_pipe_is_one_error_line(graph, tmp_path):
    files = write_images(tmp_path / "img", [f"{i}.png" for i in range(30)])
    command = (f"{sys.executable} -m pyattr run {graph} {tmp_path / 'img'} --out {tmp_path / 'out'} "
               f"2>{tmp_path / 'err'} | (sleep 0; exit 0); echo ${{PIPESTATUS[0]}}")
    result = subprocess.run(["bash", "-c", command], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    err = (tmp_path / "err").read_text()
    assert result.stdout.strip() == "2", (result.stdout, err)
    assert "broken pipe" in one_error_line(err)
    assert len(listing(tmp_path / "out")) == len(files)  # the outputs were complete before printing


def test_run_reports_score_and_probability(graph, tmp_path, capsys):
    files = write_images(tmp_path / "img", ["a.png", "b.png"])
    code, out, err = run_cli([graph, *files, "--out", tmp_path / "out", "--target", "class_1"], capsys)
    assert code == 0, err
    runtime = AttributionRuntime(graph)
    scores = scores_of(runtime.preprocess(files), 4).astype(np.float64)
    softmax = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    for i, line in enumerate(map(json.loads, out.splitlines())):
        assert line["explained_class"] == 1 and line["class_name"] == "class_1"
        assert line["score"] == pytest.approx(scores[i, 1], rel=1e-5)
        assert line["probability"] == pytest.approx(softmax[i, 1], rel=1e-5)


def test_validate_metadata_accepts_what_export_writes(tmp_path):
    """The schema is not stricter than pyattr's own exports (the graph's dynamic batch is not compared)."""
    path = tmp_path / "real.onnx"
    pyattr.export(pyattr.Saliency(_tiny_model()), torch.rand(1, 3, 8, 8), path, class_names=list("abcd"),
                  preprocessing=good_metadata()["preprocessing"], metadata={"model": "tiny"})
    meta = pyattr.read_metadata(path)
    assert meta["class_names"] == list("abcd") and meta["model"] == "tiny"
    runtime = AttributionRuntime(path)
    from pyattr.runtime.metadata import validate_metadata

    assert validate_metadata(meta, input_shape=runtime.session.get_inputs()[0].shape, num_classes=4) is meta
    for layer in ("layer3", ["layer2", "layer3"], None):  # CAM metadata: one layer, several, none
        assert validate_metadata({**meta, "layer": layer}) is not None
