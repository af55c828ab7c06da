"""Where the built-in model's ONNX mismatches come from: onnxruntime's BatchNorm folding, or fp32 rounding?

Checks three things on the methods that missed 1e-4 in ``export_matrix_builtin.md`` (ShapesNet, batch 8,
mixed targets), writing ``benchmarks/results/export_matrix_builtin_numerics.md``:

1. The ONNX file run with onnxruntime's graph optimisations off (``ORT_DISABLE_ALL``: no Conv+BatchNorm
   fusion) and on (``ORT_ENABLE_BASIC`` fuses Conv+BatchNormalization, ``ORT_ENABLE_ALL``), against eager
   fp32 and against eager fp64.
2. BatchNorm folded into the convolutions *before* export (an experiment on a deep copy with
   ``torch.nn.utils.fusion.fuse_conv_bn_eval``): eager folded vs eager unfolded, and the folded ONNX vs
   eager folded. If folding made the two sides agree by construction, this error would be ~1e-7.
3. ReLU masks: on the inputs Integrated Gradients and SmoothGrad evaluate, how many ReLU pre-activations
   change sign between eager fp32, eager fp32 with BatchNorm folded, and eager fp64.

    python benchmarks/export_matrix_numerics.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyattr
from pyattr.methods import build_method

METHODS = ("smoothgrad", "integratedgradients", "lrp_epsilon_plus_flat", "lrp_epsilon_alpha2_beta1")
LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_ALL")


def folded_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ShapesNet with every BatchNorm fused into the convolution before it (experiment only)."""
    folded = copy.deepcopy(model)
    folded.stem[0] = fuse_conv_bn_eval(folded.stem[0], folded.stem[1])
    folded.stem[1] = nn.Identity()
    for block in (folded.layer1, folded.layer2, folded.layer3):
        block.conv1, block.bn1 = fuse_conv_bn_eval(block.conv1, block.bn1), nn.Identity()
        block.conv2, block.bn2 = fuse_conv_bn_eval(block.conv2, block.bn2), nn.Identity()
        if isinstance(block.downsample, nn.Sequential):
            block.downsample[0] = fuse_conv_bn_eval(block.downsample[0], block.downsample[1])
            block.downsample[1] = nn.Identity()
    return folded


def ort_maps(path: Path, level: str, x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": x.numpy(), "target": t.numpy()})[3]


def relu_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    got: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, i, _o: got.append(i[0].detach().double()))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


def flips(a: list[torch.Tensor], b: list[torch.Tensor]) -> int:
    return sum(int(((u > 0) != (v > 0)).sum()) for u, v in zip(a, b))


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    model = pyattr.zoo.load_builtin()
    folded = folded_copy(model)
    model64 = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 64, 64, generator=gen)
    t = torch.tensor([-1, 2, -1, 3, -1, 0, -1, 5])
    lines = ["# Built-in model: where the ONNX mismatches come from", "",
             ("Command: `python benchmarks/export_matrix_numerics.py` (ShapesNet, batch 8, targets "
             f"{t.tolist()}; max abs error of the normalized maps). torch {torch.__version__}."), "",
             (f"Folding every BatchNorm into its convolution changes the logits by "
             f"{float((folded(x) - model(x)).abs().max()):.1e} (fp32 rounding)."), "",
             "## 1-2. ONNX at each onnxruntime optimisation level, unfolded and BatchNorm-folded model", "",
             "| method | eager fp32 vs fp64 | eager folded vs eager | " + " | ".join(
                 f"ONNX {lv[4:]} vs eager" for lv in LEVELS) + " | " + " | ".join(
                 f"folded ONNX {lv[4:]} vs eager folded" for lv in LEVELS[::2]) + " | export s |",
             "|---|---|---|" + "---|" * (len(LEVELS) + 2) + "---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in METHODS:
            method, method_folded = build_method(name, model), build_method(name, folded)
            ref, ref_folded = method(x, t).maps, method_folded(x, t).maps
            ref64 = build_method(name, model64)(x.double(), t).maps
            t0 = time.perf_counter()
            path, path_folded = Path(tmp) / f"{name}.onnx", Path(tmp) / f"{name}_folded.onnx"
            pyattr.export(method, x[:1], path)
            seconds = time.perf_counter() - t0
            pyattr.export(method_folded, x[:1], path_folded)
            plain = [np.abs(ort_maps(path, lv, x, t) - ref.numpy()).max() for lv in LEVELS]
            fold = [np.abs(ort_maps(path_folded, lv, x, t) - ref_folded.numpy()).max() for lv in LEVELS[::2]]
            row = (f"| {name} | {float((ref.double() - ref64).abs().max()):.1e} | "
                   f"{float((ref_folded - ref).abs().max()):.1e} | " + " | ".join(f"{e:.1e}" for e in plain)
                   + " | " + " | ".join(f"{e:.1e}" for e in fold) + f" | {seconds:.0f} |")
            print(row, flush=True)
            lines.append(row)
    lines += ["", "## 3. ReLU mask flips", "",
              ("| inputs | ReLU inputs | fp64 abs(z) < 1e-5 | flips fp32 vs fp64 | flips fp32-folded vs fp64 | "
              "flips fp32 vs fp32-folded | largest fp64 abs(z) at a flip |"), "|---|---|---|---|---|---|---|"]
    alphas = torch.linspace(0, 1, 32)
    cases = (("Integrated Gradients path (32 steps x 8 images)", (alphas[:, None, None, None, None] * x[None]).flatten(0, 1)),
             ("SmoothGrad noise (16 draws x 8 images, sigma 0.15)",
              (x[None] + 0.15 * torch.randn(16, *x.shape, generator=gen)).flatten(0, 1)))
    for label, inputs in cases:
        a, f, d = relu_inputs(model, inputs), relu_inputs(folded, inputs), relu_inputs(model64, inputs.double())
        flipped = [v[((u > 0) != (v > 0)) | ((w > 0) != (v > 0)) | ((u > 0) != (w > 0))].abs() for u, v, w in zip(a, d, f)]
        largest = max((float(z.max()) for z in flipped if z.numel()), default=0.0)
        row = (f"| {label} | {sum(z.numel() for z in d)} | {sum(int((z.abs() < 1e-5).sum()) for z in d)} | "
               f"{flips(a, d)} | {flips(f, d)} | {flips(a, f)} | {largest:.1e} |")
        print(row, flush=True)
        lines.append(row)
    out = Path(__file__).resolve().parent / "results" / "export_matrix_builtin_numerics.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
