"""DeepLIFT, DeepLIFT-SHAP and GradientSHAP: ONNX (onnxruntime) against eager, max differences of the normalized maps
and of the raw maps (relative to their largest value), batches 1 and 3, on the built-in model (its own shapes images)
and a seeded random resnet18 (64 px). Eager DeepLIFT takes its ReLU / max-pool rules from the compiled core; the
exported graph holds the torch formulas: this measures the two routes against each other.

    python benchmarks/deeplift_onnx_vs_eager.py    # writes benchmarks/results/cpu/deeplift_onnx_vs_eager.md
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torchvision

import pyattr

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from contract import mixed_targets, run_exported


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    resnet18 = torchvision.models.resnet18().eval()
    builtin = pyattr.zoo.load_builtin()
    data = pyattr.zoo.generate(3, seed=17)
    shapes = torch.from_numpy(data.images).permute(0, 3, 1, 2).float() / 255
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(17))
    cases = [("builtin", builtin, shapes, 6), ("resnet18", resnet18, images, 1000)]
    makers = {"deeplift": lambda m: pyattr.DeepLift(m),
              "deepliftshap": lambda m: pyattr.DeepLiftShap(m, baselines=3, chunk_size=2),
              "gradientshap": lambda m: pyattr.GradientShap(m, baselines=3, samples=3, chunk_size=2)}
    lines = ["| model | method | batch | maps max abs diff | raw max rel diff | explained classes equal |",
             "|---|---|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, model, x, k in cases:
            for name, make in makers.items():
                method = make(model)
                path = Path(tmp) / f"{model_name}-{name}.onnx"
                pyattr.export(method, x[:1], path)
                for b in (1, 3):
                    xb, t = x[:b], mixed_targets(b, k)
                    ref = method(xb, t)
                    _, explained, raw, maps = run_exported("onnx", path, xb, t)[:4]
                    maps_err = float((maps - ref.maps).abs().max())
                    raw_err = float((raw - ref.raw).abs().max() / ref.raw.abs().max().clamp_min(1e-12))
                    same = bool(torch.equal(explained.long(), ref.target))
                    lines.append(f"| {model_name} | {name} | {b} | {maps_err:.1e} | {raw_err:.1e} | {same} |")
                    print(lines[-1], flush=True)
    out = Path(__file__).parent / "results" / "cpu" / "deeplift_onnx_vs_eager.md"
    head = ["# DeepLIFT family: ONNX (onnxruntime) vs eager", "",
            f"`python benchmarks/deeplift_onnx_vs_eager.py` · torch {torch.__version__} · pyattr {pyattr.__version__}",
            ""]
    out.write_text("\n".join(head + lines) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
