"""A detector as an ONNX graph for the torch-free runtime: ``images -> boxes (N, M, 4), scores (N, M, K)``.

The dense layout of :class:`pyattr.runtime.Detector`: every candidate before score threshold and NMS (those
are data-dependent; the runtime applies them in NumPy as :func:`pyattr.zoo.detect` does). With an
explanation graph of the same model (``pyattr export det.onnx --task detection --detector-out
detector.onnx``), ``pyattr run det.onnx IMAGES --detector detector.onnx`` finds and explains boxes without
torch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import written_atomically
from ..errors import ExportError, InputError
from ..runtime.detection import DETECTOR_METADATA_KEY, detector_metadata


class _Candidates(nn.Module):
    """model + decode as one module (the user's model is held by reference, unchanged)."""

    def __init__(self, model: nn.Module, decode: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.model = model
        self.decode = decode

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, scores = self.decode(self.model(images))
        return boxes, scores


def export_detector(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *,
                    decode: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None,
                    class_names: Sequence[str] | None = None, preprocessing: dict[str, Any] | None = None,
                    nms_iou_threshold: float = 0.5) -> Path:
    """Write a dense detector as an ONNX graph ``images (N, C, H, W) -> boxes (N, M, 4), scores (N, M, K)``
    (dynamic batch) for :class:`pyattr.runtime.Detector`, with its metadata (``pyattr_detector``: layout,
    preprocessing, class names, the NMS IoU threshold the runtime applies).

    Args:
        model: the detector. It is traced on a private per-call view (:mod:`pyattr._callview`), in eval semantics
            whatever its training flag: torch.export swaps a traced module's parameters for fake tensors while it
            traces, which other threads running the same model would otherwise see (nothing of it is changed).
        example_input: an (N, C, H, W) input in the model's input convention (what ``preprocessing`` makes).
        path: the ``.onnx`` file (written atomically).
        decode: ``output -> (boxes (N, M, 4) xyxy in input pixels, scores (N, M, K))``; default: the output
            already is that pair (e.g. :class:`pyattr.detection.DenseCandidates`).
        class_names, preprocessing: recorded for the runtime.
        nms_iou_threshold: the IoU above which the runtime's per-class NMS drops a box.

    Example:
        >>> from pyattr import zoo
        >>> export_detector(zoo.load_builtin_detector(), torch.rand(1, 3, 64, 64), "detector.onnx",
        ...                 decode=zoo.decode_detections, class_names=zoo.DET_CLASSES)  # doctest: +SKIP
        PosixPath('detector.onnx')
    """
    from . import quiet_onnx_export, save_onnx

    path = Path(path)
    if path.suffix.lower() != ".onnx":
        raise InputError(f"the detector graph is written as ONNX: name it .onnx, got {path.name!r}")
    from . import require_onnx_packages

    require_onnx_packages()
    if not 0 <= nms_iou_threshold <= 1:
        raise InputError(f"nms_iou_threshold must be in [0, 1], got {nms_iou_threshold!r}")
    from .._callview import call_view

    # traced on this call's view of the model (eval semantics, the same tensors): torch.export re-parametrizes the
    # module it traces with fake tensors, which a thread running the user's model at that moment would run on
    with call_view(model) as view:
        wrapper = _Candidates(view.root, decode or (lambda output: (output[0], output[1])))
        wrapper.training = False
        with torch.no_grad():
            boxes, scores = wrapper(example_input)
        if boxes.dim() != 3 or boxes.shape[-1] != 4 or scores.dim() != 3 or scores.shape[:2] != boxes.shape[:2]:
            raise InputError(f"the detector must give boxes (N, M, 4) and scores (N, M, K), got {tuple(boxes.shape)} "
                             f"and {tuple(scores.shape)}")
        batch = torch.export.Dim("batch", min=1, max=4096)
        try:
            model_ir = quiet_onnx_export(wrapper, (example_input,), ["images"], ["boxes", "scores"],
                                         dynamic_shapes=({0: batch},))
        except Exception as err:  # torch.export / torch.onnx raise many types
            raise ExportError(f"cannot export the detector to ONNX: {str(err).strip().splitlines()[0][:300]}") from err
    with written_atomically(path, ".onnx") as tmp:
        save_onnx(model_ir, tmp, DETECTOR_METADATA_KEY,
                  detector_metadata(preprocessing or {}, class_names, nms_iou_threshold=float(nms_iou_threshold)),
                  what="the detector's ONNX graph")
    return path


__all__ = ["export_detector"]
