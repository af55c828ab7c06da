"""Is an export-matrix mismatch a discontinuity of the map? Re-run one built-in-model cell's inputs in fp64 with
fp32-sized noise on every convolution and BatchNorm output.

    python benchmarks/export_matrix_flip_check.py --method gradientshap --batch 1

The export matrix's ``eager_vs_fp64`` says how far eager fp32 is from fp64 on the same inputs, but a map with a
jump (a ReLU mask that flips at a pre-activation within rounding of zero, at one of the method's sample points)
is far from fp64 only in the runtimes whose rounding happens to cross it. Here the fp64 method runs on the
cell's batch (the matrix's :class:`ShapesStream` inputs and targets) with every convolution / BatchNorm output
multiplied by ``1 + 3e-7 * N(0, 1)`` (a few fp32 roundings), for several noise seeds: if the maps move by about
the mismatch in some draws and by ~1e-7 in others, the mismatch is such a jump, not an export error. With
``--ort-without-conv-bn-fusion`` the cell's ONNX graph is also run with onnxruntime's ConvBNFusion disabled.
Results: ``benchmarks/results/export_matrix_flip_check_<method>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from export_matrix import ShapesStream

import pyattr
from pyattr.methods import build_method, needs_layer


def cell_batch(method, batch: int):
    """The export matrix's inputs and targets of the built-in model's cell at ``batch`` (and the example)."""
    stream, gen = ShapesStream(64), torch.Generator().manual_seed(1)
    torch.rand(1, 3, 64, 64, generator=gen)  # the matrix draws (and discards) a noise example first
    example = stream.take(1)[0]
    for b in (1, 3):
        x, labels = stream.take(b)
        t = torch.multinomial(labels, 1, generator=gen)[:, 0]
        t[::2] = -1
        if b == batch:
            return example, x, t
    raise ValueError("batch must be 1 or 3")


def jitter(gen: torch.Generator, scale: float):
    def hook(_module, _inputs, out):
        return out * (1 + scale * torch.randn(out.shape, generator=gen, dtype=out.dtype))

    return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="gradientshap")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--scale", type=float, default=3e-7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = pyattr.zoo.load_builtin()
    layer = "layer3" if needs_layer(args.method) else None
    method = build_method(args.method, model, layer)
    example, x, t = cell_batch(method, args.batch)
    eager = method(x, t).maps
    model64 = pyattr.zoo.load_builtin().double()
    m64 = build_method(args.method, model64, layer)
    maps64 = m64(x.double(), t).maps
    moved = []
    for seed in range(args.draws):
        gen = torch.Generator().manual_seed(seed)
        handles = [m.register_forward_hook(jitter(gen, args.scale)) for m in model64.modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d))]
        try:
            moved.append(float((m64(x.double(), t).maps - maps64).abs().max()))
        finally:
            for h in handles:
                h.remove()
    result = {"method": args.method, "batch": args.batch, "targets": t.tolist(), "scale": args.scale,
              "eager_vs_fp64": float((eager.double() - maps64).abs().max()), "fp64_jittered_vs_fp64": moved}
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = pyattr.export(method, example, Path(tmp) / "cell.onnx")
        for label, disabled in (("onnx", []), ("onnx_without_ConvBNFusion", ["ConvBNFusion"])):
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                           disabled_optimizers=disabled)
            maps = torch.from_numpy(session.run(None, {"images": x.numpy(), "target": t.numpy()})[3])
            result[f"{label}_vs_eager"] = float((maps - eager).abs().max())
    meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "pyattr": pyattr.__version__, "load": os.getloadavg()}
    out = ROOT / "benchmarks" / "results" / f"export_matrix_flip_check_{args.method}"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "result": result}, indent=1) + "\n")
    lines = [f"# Export matrix, built-in model, {args.method}: a discontinuity or an export error?", "",
             (f"Command: `{meta['command']}`; pyattr {meta['pyattr']}, torch {meta['torch']}, onnxruntime "
             f"{meta['onnxruntime']}, load {meta['load'][0]:.1f}."), "",
             (f"The matrix cell's batch of {args.batch} (targets {result['targets']}); max abs error of the "
             "normalized maps."), "", "| comparison | max abs |", "|---|---|",
             f"| eager fp32 vs fp64 | {result['eager_vs_fp64']:.2e} |",
             f"| ONNX (onnxruntime defaults) vs eager | {result['onnx_vs_eager']:.2e} |",
             f"| ONNX, ConvBNFusion disabled, vs eager | {result['onnx_without_ConvBNFusion_vs_eager']:.2e} |"]
    lines += [f"| fp64 with 1 + {args.scale:g} N(0,1) on every conv / BN output (seed {i}) vs fp64 | {v:.2e} |"
              for i, v in enumerate(moved)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
