"""The export contract every method must pass: eager == TorchScript == .pt2 == onnxruntime.

Use from a test: ``assert_export_contract(method, example, tmp_path)``. The method is exported
from ``example[:1]`` to all three formats, then each file is run at batch sizes 1 and 5 with mixed
targets (-1 = arg-max, explicit ids) and compared with the eager call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch

import pyattr

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}


def run_exported(fmt: str, path: Path, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, {"images": x.numpy(), "target": t.numpy()})]
    if fmt == "torchscript":
        return list(torch.jit.load(str(path))(x, t))
    return list(torch.export.load(str(path)).module()(x, t))


def mixed_targets(n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, num_classes, (n,), generator=g)
    t[::2] = -1
    return t


def assert_export_contract(method: pyattr.AttributionMethod, inputs: torch.Tensor, tmp_path: Path,
                           num_classes: int, formats=tuple(FORMATS), batches=(1, 5), atol: float = 1e-4) -> None:
    """Export ``method`` once per format and check every output against eager at each batch size."""
    for fmt in formats:
        path = tmp_path / f"{method.name}{FORMATS[fmt]}"
        pyattr.export(method, inputs[:1], path)
        if fmt == "onnx":
            model = onnx.load(str(path))
            onnx.checker.check_model(model, full_check=True)
            assert not [n.op_type for n in model.graph.node if n.op_type == "Gradient" or n.domain not in ("", "ai.onnx")]
        for b in batches:
            idx = torch.arange(b) % inputs.shape[0]
            x = inputs[idx] + 0.01 * torch.arange(b, dtype=inputs.dtype).view(-1, *[1] * (inputs.dim() - 1))
            t = mixed_targets(b, num_classes)
            ref = method(x, t)
            scores, explained, raw, maps = run_exported(fmt, path, x, t)
            assert torch.equal(explained.long(), ref.target), f"{fmt} batch {b}: explained classes differ"
            scale = ref.scores.abs().max().clamp_min(1e-12)
            assert float((scores - ref.scores).abs().max() / scale) < 1e-4, f"{fmt} batch {b}: scores differ"
            assert maps.shape == ref.maps.shape, f"{fmt} batch {b}: maps shape {tuple(maps.shape)}"
            err = float((maps - ref.maps).abs().max())
            assert err <= atol, f"{fmt} batch {b}: normalized maps differ by {err:.2e} (> {atol})"
            raw_scale = ref.raw.abs().max().clamp_min(1e-12)
            raw_err = float((raw - ref.raw).abs().max() / raw_scale)
            assert raw_err <= 1e-3, f"{fmt} batch {b}: raw maps differ by {raw_err:.2e} relative"
