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


def run_exported(fmt: str, path: Path, x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> list[torch.Tensor]:
    """Run an exported file on images ``x``, targets ``t`` and the target's inputs ``extra`` (in the order of
    the metadata's ``inputs``)."""
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        feeds = dict(zip(names, [v.numpy() for v in (x, t, *extra)]))
        return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feeds)]
    with torch.no_grad():
        if fmt == "torchscript":
            return list(torch.jit.load(str(path))(x, t, *extra))
        return list(torch.export.load(str(path)).module()(x, t, *extra))


def mixed_targets(n: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, num_classes, (n,), generator=g)
    t[::2] = -1
    return t


def assert_export_contract(method: pyattr.AttributionMethod, inputs: torch.Tensor, tmp_path: Path,
                           num_classes: int, formats=tuple(FORMATS), batches=(1, 5), atol: float = 1e-4,
                           target=None, target_inputs=None) -> None:
    """Export ``method`` once per format and check every output against eager at each batch size.

    ``target``: a :class:`pyattr.targets.Target` kind to export (default: class logits);
    ``target_inputs(x, t)``: (the eager target for images ``x`` and ids ``t``, the graph's extra inputs)."""
    for fmt in formats:
        path = tmp_path / f"{method.name}{FORMATS[fmt]}"
        pyattr.export(method, inputs[:1], path, target=target)
        if fmt == "onnx":
            model = onnx.load(str(path))
            onnx.checker.check_model(model, full_check=True)
            assert not [n.op_type for n in model.graph.node if n.op_type == "Gradient" or n.domain not in ("", "ai.onnx")]
        for b in batches:
            idx = torch.arange(b) % inputs.shape[0]
            x = inputs[idx] + 0.01 * torch.arange(b, dtype=inputs.dtype).view(-1, *[1] * (inputs.dim() - 1))
            t = mixed_targets(b, num_classes)
            eager_target, extra = (t, ()) if target_inputs is None else target_inputs(x, t)
            ref = method(x, eager_target)
            outs = run_exported(fmt, path, x, t, *extra)
            scores, explained, raw, maps = outs[:4]
            for name, value in zip(target.outputs if target is not None else (), outs[4:]):
                want = ref.outputs[name]
                err = float((value - want).abs().max() / want.abs().max().clamp_min(1e-12))
                assert err < 1e-4, f"{fmt} batch {b}: output {name} differs by {err:.2e} relative"
            assert torch.equal(explained.long(), ref.target), f"{fmt} batch {b}: explained classes differ"
            scale = ref.scores.abs().max().clamp_min(1e-12)
            assert float((scores - ref.scores).abs().max() / scale) < 1e-4, f"{fmt} batch {b}: scores differ"
            assert maps.shape == ref.maps.shape, f"{fmt} batch {b}: maps shape {tuple(maps.shape)}"
            err = float((maps - ref.maps).abs().max())
            assert err <= atol, f"{fmt} batch {b}: normalized maps differ by {err:.2e} (> {atol})"
            raw_scale = ref.raw.abs().max().clamp_min(1e-12)
            raw_err = float((raw - ref.raw).abs().max() / raw_scale)
            assert raw_err <= 1e-3, f"{fmt} batch {b}: raw maps differ by {raw_err:.2e} relative"


def assert_detection_contract(method: pyattr.AttributionMethod, images: torch.Tensor, boxes: torch.Tensor,
                              box_classes: torch.Tensor, tmp_path: Path, target, formats=tuple(FORMATS),
                              batches=(1, 2), atol: float = 1e-4) -> None:
    """The contract for a detection target (:class:`pyattr.targets.DetectionTarget`, exported as ``target``):
    the graph takes ``images, boxes, box_classes`` (no class ids: every box is explained) and returns
    ``scores, explained_class, raw, maps, matched, iou``, each (N, B, ...); every output equals the eager call
    ``method(x, DetectionTarget(boxes, box_classes, ...))`` at each batch size (the first ``b`` samples)."""
    from pyattr.targets import DetectionTarget

    options = {"decode": target.decode, "iou_threshold": target.iou_threshold, "objective": target.objective,
               "match": target.match}
    for fmt in formats:
        path = tmp_path / f"{method.name}{FORMATS[fmt]}"
        pyattr.export(method, images[:1], path, target=target)
        if fmt == "onnx":
            model = onnx.load(str(path))
            onnx.checker.check_model(model, full_check=True)
            assert [i.name for i in model.graph.input] == ["images", "boxes", "box_classes"]
        for b in batches:
            x, bx, bc = images[:b], boxes[:b], box_classes[:b]
            ref = method(x, DetectionTarget(boxes=bx, box_classes=bc, **options))
            scores, explained, raw, maps, matched, iou = run_exported(fmt, path, x, bx, bc)
            assert torch.equal(explained.long(), ref.target), f"{fmt} batch {b}: explained boxes differ"
            assert torch.equal(matched.bool(), ref.outputs["matched"]), f"{fmt} batch {b}: matched differs"
            # tiny random-init boxes (< 1 px wide at 32 px from the origin) cost IoUs a few 1e-6 of rounding
            assert float((iou - ref.outputs["iou"]).abs().max()) < 1e-4, f"{fmt} batch {b}: iou differs"
            scale = ref.scores.abs().max().clamp_min(1e-12)
            assert float((scores - ref.scores).abs().max() / scale) < 1e-4, f"{fmt} batch {b}: scores differ"
            assert maps.shape == ref.maps.shape, f"{fmt} batch {b}: maps shape {tuple(maps.shape)}"
            err = float((maps - ref.maps).abs().max())
            assert err <= atol, f"{fmt} batch {b}: normalized maps differ by {err:.2e} (> {atol})"
            raw_err = float((raw - ref.raw).abs().max() / ref.raw.abs().max().clamp_min(1e-12))
            assert raw_err <= 1e-3, f"{fmt} batch {b}: raw maps differ by {raw_err:.2e} relative"
