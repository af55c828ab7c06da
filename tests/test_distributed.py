"""The Ray Data batch pipeline (pyattr.runtime.batch, ``pyattr batch``) on a local Ray cluster (2 CPUs): every input
explained exactly once even when a worker is SIGKILLed mid-run, a rerun resumes an interrupted run, bad inputs are
rows with an error or one clear error, and the results equal the single-process runtime's.

The graph is the built-in model's Grad-CAM, exported once per module; the images are 200 generated shapes at 32 to
64 px. GPU selection is tested with the provider / device / cluster-resource lists injected (no GPU here).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from runtime_graphs import graph_model
from torchfree import run_without_torch

import pyattr
from pyattr import zoo
from pyattr.cli import main as pyattr_main
from pyattr.errors import InputError
from pyattr.runtime import AttributionRuntime, select_providers
from pyattr.runtime.backends import default_openvino_device

ray = pytest.importorskip("ray", reason='the batch pipeline needs Ray: pip install "pyattr[ray]"')
batch = pytest.importorskip("pyattr.runtime.batch")

PREPROCESSING = {"color": "RGB", "scale": 1 / 255, "mean": [0.45, 0.5, 0.55], "std": [0.25, 0.2, 0.3],
                 "size": [64, 64], "resize": "bilinear", "layout": "NCHW"}
N_IMAGES = 200
TOL = 1e-5


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch_graph")
    method = pyattr.GradCAM(zoo.load_builtin(), zoo.SHAPESNET_LAYER)
    return pyattr.export(method, torch.rand(1, 3, 64, 64), root / "gradcam.onnx", class_names=zoo.SHAPE_CLASSES,
                         preprocessing=PREPROCESSING)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """200 shapes images, 32 to 64 px a side (most are resized by the runtime), in two sub-folders."""
    root = tmp_path_factory.mktemp("batch_images")
    rng = np.random.default_rng(5)
    files = []
    for i, array in enumerate(zoo.generate(N_IMAGES, seed=40_000).images):
        h, w = (int(s) for s in rng.integers(32, 65, 2))
        folder = root / f"group{i % 2}"
        folder.mkdir(exist_ok=True)
        files.append(folder / f"shape{i:03d}.png")
        Image.fromarray(array).resize((w, h), Image.BILINEAR).save(files[-1])
    return files


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 << 20, logging_level="warning",
             configure_logging=False)
    yield ray
    ray.shutdown()


def actor_pids() -> list[int]:
    """This test process's descendants that are the pipeline's Ray actors (process title MapWorker(...ExplainBatch))."""
    parents: dict[int, int] = {}
    titles: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            titles[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])

    def mine(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [pid for pid, title in titles.items() if "ExplainBatch" in title and "MapWorker" in title and mine(pid)]


def assert_same_as_runtime(table, graph: Path, files: list[Path]) -> None:
    """Every row's class, score and map equal the single-process runtime's (maps within 1e-5)."""
    rows = {r["input"]: r for r in table.to_pylist()}
    runtime = AttributionRuntime(graph, num_threads=1)
    for start in range(0, len(files), 50):
        for file, e in zip(files[start:start + 50], runtime.explain(files[start:start + 50], batch_size=50)):
            row = rows[str(file)]
            assert row["error"] is None, row["error"]
            assert (row["explained_class"], row["class_name"]) == (e.explained_class, e.class_name)
            assert row["score"] == pytest.approx(e.score, abs=1e-5)
            assert row["probability"] == pytest.approx(e.probability, abs=1e-6)
            np.testing.assert_allclose(batch.decode_map(row), e.map, rtol=0, atol=TOL)


def test_a_killed_worker_loses_and_duplicates_nothing(cluster, graph, images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = tmp_path / "gone.jpg"
    folders = sorted({str(f.parent) for f in images})  # both sub-folders, then the two bad inputs
    inputs = [*folders, str(bad), str(missing)]
    out = tmp_path / "out"
    result: dict = {}

    def work():
        try:
            result["summary"] = batch.run_batch(graph, inputs, out, actors=2, batch_size=8, progress=False)
        except BaseException as err:  # noqa: BLE001 -- handed to the test thread
            result["error"] = err

    thread = threading.Thread(target=work)
    thread.start()
    killed, parts_at_kill = None, None
    deadline = time.monotonic() + 240
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        parts = list((out / "parts").glob("part-*.parquet")) if (out / "parts").is_dir() else []
        pids = actor_pids()
        if parts and pids:  # results landing: kill an actor mid-run
            parts_at_kill = len(parts)
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert killed is not None, "the run ended before a worker could be killed"
    assert parts_at_kill < N_IMAGES // 8, "the kill came after the last batch"
    summary = result["summary"]
    assert (summary.total, summary.skipped, summary.processed, summary.failed) == (N_IMAGES + 2, 0, N_IMAGES + 2, 2)

    table = batch.read_results(out)
    expected = [str(f) for f in sorted(images)] + [str(bad), str(missing)]
    assert table.column("input").to_pylist() == expected  # every input once, in input order
    keys = table.column("key").to_pylist()
    assert len(set(keys)) == len(keys) == N_IMAGES + 2
    assert keys == [batch.input_key(x) for x in expected]
    errors = dict(zip(table.column("input").to_pylist(), table.column("error").to_pylist()))
    assert "broken.png is not an image that Pillow can read" in errors[str(bad)]
    assert errors[str(missing)] == f"no such file: {missing}"
    assert all(errors[x] is None for x in expected[:N_IMAGES])
    # overlays: one per good image, complete PNGs at the image's size, no temporary file left anywhere
    overlays = table.column("overlay").to_pylist()
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(Path(p).name for p in overlays[:N_IMAGES])
    assert overlays[N_IMAGES:] == [None, None]
    assert not [p for p in out.rglob(".*")], "a temporary file was left"
    assert_same_as_runtime(table, graph, sorted(images))
    runtime = AttributionRuntime(graph, num_threads=1)
    for i in (0, 77, 199):
        e = runtime.explain([sorted(images)[i]])[0]
        np.testing.assert_array_equal(np.asarray(Image.open(out / overlays[i])), e.overlay)
    # the part files hold every input at least once; the table exactly once
    parts = batch._read_parts(out, ["key"]).column("key").to_pylist()
    assert set(parts) == set(keys)


def test_an_interrupted_run_resumes(cluster, graph, images, tmp_path, capsys):
    files = [str(f) for f in sorted(images)[:64]]
    out = tmp_path / "out"
    seen = []

    def stop_after_the_first_batch(done, total):
        seen.append(done)
        raise KeyboardInterrupt  # as Ctrl-C in the driver: the run stops with results of some batches on disk

    with pytest.raises(KeyboardInterrupt):
        batch.run_batch(graph, files, out, actors=1, batch_size=8, progress=False, on_progress=stop_after_the_first_batch)
    done_before = batch.done_keys(out)
    assert 8 <= len(done_before) < len(files)
    assert not (out / "results.parquet").exists()
    # what a crash can leave: a truncated part file and a temporary file of a dead writer
    (out / "parts" / "part-truncated.parquet").write_bytes(b"PAR1\x00\x00")
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32]
    (out / "overlays" / f".x.pyattr-{host}-999999999-abc.png").write_bytes(b"")

    with pytest.warns(UserWarning, match="skipping the unreadable part file part-truncated.parquet"):
        code = pyattr_main(["batch", str(graph), *files, "--out", str(out), "--batch-size", "8", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["skipped"] == len(done_before) and summary["processed"] == len(files) - len(done_before)
    assert summary["total"] == len(files) and summary["failed"] == 0
    table = batch.read_results(out)
    assert table.column("input").to_pylist() == files
    assert len(set(table.column("key").to_pylist())) == len(files)
    assert not [p for p in (out / "overlays").iterdir() if p.name.startswith(".")]
    assert_same_as_runtime(table, graph, [Path(f) for f in files])
    # a third run has nothing left to do and starts no actor
    (out / "parts" / "part-truncated.parquet").unlink()
    again = batch.run_batch(graph, files, out, progress=False)
    assert (again.skipped, again.processed, again.total) == (len(files), 0, len(files))


def test_no_overlays_and_a_parquet_table_of_paths(cluster, graph, images, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = [str(f) for f in sorted(images)[:12]]
    pq.write_table(pa.table({"id": list(range(12)), "uri": [f"file://{f}" for f in files]}), tmp_path / "t.parquet")
    out = tmp_path / "out"
    summary = batch.run_batch(graph, tmp_path / "t.parquet", out, overlays=False, batch_size=5, progress=False)
    assert (summary.total, summary.failed) == (12, 0)
    table = batch.read_results(out)
    assert table.column("overlay").to_pylist() == [None] * 12 and not list((out / "overlays").iterdir())
    runtime = AttributionRuntime(graph, num_threads=1)
    for row, e in zip(table.to_pylist(), runtime.explain(files)):
        np.testing.assert_allclose(batch.decode_map(row), e.map, rtol=0, atol=TOL)


def test_bad_graph_inputs_and_output_are_one_clear_error(graph, images, tmp_path, capsys):
    foreign = tmp_path / "plain.onnx"
    foreign.write_bytes(graph_model().SerializeToString())  # a valid ONNX graph without pyattr metadata
    with pytest.raises(InputError, match="holds no pyattr metadata"):
        batch.run_batch(foreign, images[:2], tmp_path / "o1", progress=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        batch.run_batch(graph, images[:2], blocker, progress=False)
    with pytest.raises(InputError, match="a part of its path is a file"):
        batch.run_batch(graph, images[:2], blocker / "sub", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files in folder"):
        batch.run_batch(graph, tmp_path / "empty", tmp_path / "o2", progress=False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1]}), tmp_path / "no_paths.parquet")
    with pytest.raises(InputError, match="has no column path / uri / image / file"):
        batch.run_batch(graph, tmp_path / "no_paths.parquet", tmp_path / "o3", progress=False)
    with pytest.raises(InputError, match="actors must be an int from 1"):
        batch.run_batch(graph, images[:2], tmp_path / "o4", actors=0, progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()  # nothing written before the checks
    code = pyattr_main(["batch", str(foreign), str(images[0]), "--out", str(tmp_path / "o5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("pyattr: error: plain.onnx holds no pyattr metadata")


def test_gpu_selection_with_injected_devices(cluster, graph, images, tmp_path, monkeypatch):
    """No GPU on this machine: the selection logic, with the lists a GPU machine would give injected."""
    cuda = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(cuda, True) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert select_providers(cuda, lambda: False) == ["CPUExecutionProvider"]  # onnxruntime-gpu without a driver
    assert select_providers(["CPUExecutionProvider"], True) == ["CPUExecutionProvider"]
    import onnxruntime as ort

    import pyattr.runtime as runtime_module

    monkeypatch.setattr(ort, "get_available_providers", lambda: cuda)
    monkeypatch.setattr(runtime_module, "_nvidia_driver_present", lambda: True)
    assert runtime_module.default_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.undo()
    assert default_openvino_device(["CPU", "GPU.0"]) == "GPU" and default_openvino_device(["CPU", "NPU"]) == "CPU"
    assert [batch.actor_gpus(g, a) for g, a in [(0, 2), (2, 2), (4, 2), (1, 3)]] == [0.0, 1.0, 1.0, pytest.approx(1 / 3)]
    assert batch.actor_gpus(4, 2, gpus=0) == 0.0 and batch.actor_gpus(4, 2, gpus="0.5") == 0.5
    with pytest.raises(InputError, match="the cluster has 0"):
        batch.actor_gpus(0, 1, gpus=1)

    # run_batch asks Ray Data for a GPU per actor when the cluster reports GPUs (stopped before anything runs)
    captured = {}

    class Stop(Exception):
        pass

    def fake_map_batches(self, fn, **kwargs):
        captured.update(kwargs)
        raise Stop

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 2.0})
    monkeypatch.setattr(ray.data.Dataset, "map_batches", fake_map_batches)
    with pytest.raises(Stop):
        batch.run_batch(graph, images[:4], tmp_path / "out", actors=2, progress=False)
    assert captured["num_gpus"] == 1.0 and captured["compute"].min_size == captured["compute"].max_size == 2 and captured["num_cpus"] == 1


def test_the_module_imports_without_torch_and_ray(graph, images, tmp_path):
    code = """
    import sys

    class _BlockRay:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "ray":
                raise ImportError("No module named 'ray'")
            return None

    sys.meta_path.insert(0, _BlockRay())
    from pyattr.runtime import batch
    from pyattr.cli import main
    try:
        batch.run_batch(sys.argv[1], [sys.argv[2]], sys.argv[3])
    except Exception as err:
        print(type(err).__name__, err)
    print(main(["batch", sys.argv[1], sys.argv[2], "--out", sys.argv[3]]))
    print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "ray")))
    """
    done = run_without_torch(code, graph, images[0], tmp_path / "out")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("InputError the batch pipeline runs on Ray Data, which is not installed")
    assert 'pip install "pyattr[ray]"' in lines[0]
    assert lines[1:] == ["2", "[]"]
    assert done.stderr.count("pyattr: error:") == 1 and 'pip install "pyattr[ray]"' in done.stderr


def test_docstring_examples_run():
    import doctest

    import pyattr.runtime as runtime_module
    from pyattr.runtime import backends

    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner()
    for obj in (batch, runtime_module.select_providers, backends.default_openvino_device):
        for test in finder.find(obj):
            runner.run(test)
    assert runner.failures == 0 and runner.tries >= 6
