"""Why a backend's Saliency map on resnet50 can differ from eager pyattr in single images (runtime_backends.md).

    python benchmarks/backend_near_ties.py

resnet50 (random init, seed 0) Saliency exported as ONNX at 64x64; 8 standard-normal images (seed 8) run in
onnxruntime and OpenVINO (1 thread) and eagerly in float32 and float64. Printed per image: max |maps| of each
pair, and the smallest relative gap between the two largest values of a window of resnet50's max-pool (on the
float64 stem output; a small gap is a near-tie that rounding may flip, routing the window's gradient to another
pixel). Last output: ``benchmarks/results/backend_near_ties.txt``.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

import pyattr
from pyattr.runtime import AttributionRuntime


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torchvision.models.resnet50().eval()
    x = np.random.default_rng(8).normal(size=(8, 3, 64, 64)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = pyattr.export(pyattr.Saliency(model), torch.rand(1, 3, 64, 64), Path(folder) / "s.onnx")
        ort = AttributionRuntime(path, num_threads=1).run(x).maps
        ov = AttributionRuntime(path, backend="openvino", num_threads=1).run(x).maps
    e32 = pyattr.Saliency(model)(torch.from_numpy(x)).maps.numpy()
    m64 = copy.deepcopy(model).double()
    e64 = pyattr.Saliency(m64)(torch.from_numpy(x).double()).maps.numpy()
    with torch.no_grad():
        stem = m64.relu(m64.bn1(m64.conv1(torch.from_numpy(x).double())))
        padded = F.pad(stem, (1, 1, 1, 1), value=-1e9)  # maxpool 3x3, stride 2, padding 1
        windows = padded.unfold(2, 3, 2).unfold(3, 3, 2).flatten(-2)
        top = windows.topk(2, dim=-1).values
        gap = torch.where(top[..., 0] > 0, (top[..., 0] - top[..., 1]) / top[..., 0].clamp_min(1e-12), 1.0)
        gap = gap.flatten(1).min(1).values.numpy()

    def per_image(a, b):
        return np.abs(a - b).reshape(len(x), -1).max(1)

    columns = {"ort-ov": per_image(ort, ov), "ort-eager32": per_image(ort, e32), "ov-eager32": per_image(ov, e32),
               "eager32-eager64": per_image(e32, e64), "min maxpool gap": gap}
    print("image " + " ".join(f"{k:>16s}" for k in columns))
    for i in range(len(x)):
        print(f"{i:5d} " + " ".join(f"{v[i]:16.1e}" for v in columns.values()))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
