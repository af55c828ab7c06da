"""pyattr's LRP composites against zennit's (the reference), per model, in float32 and float64.

Uses the zennit setups of tests/test_lrp.py (canonizers, bounds). Prints a Markdown table of the
max relative error (max |ours - zennit| / max |zennit|, worst of 2 samples, 64x64 inputs) and writes
benchmarks/results/lrp_agreement.md.

    python benchmarks/lrp_agreement.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import NUM_CLASSES_TORCHVISION, make_images, make_shapes
from test_lrp import (
    COMPOSITE_NAMES,
    max_relative_error,
    pyattr_method,
    seeded,
    zennit_composite,
    zennit_relevance,
)

import pyattr


def models() -> dict[str, torch.nn.Module]:
    vgg16_bn = seeded(2, lambda: torchvision.models.vgg16_bn(num_classes=NUM_CLASSES_TORCHVISION))
    with torch.no_grad():  # random BN statistics, as in the tests
        g = torch.Generator().manual_seed(5)
        for m in vgg16_bn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return {
        "vgg11": seeded(1, lambda: torchvision.models.vgg11(num_classes=NUM_CLASSES_TORCHVISION)),
        "vgg16_bn": vgg16_bn,
        "resnet18": seeded(0, lambda: torchvision.models.resnet18(num_classes=NUM_CLASSES_TORCHVISION)),
        "builtin": pyattr.zoo.load_builtin(),
    }


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for name, model in models().items():
        num_classes = 6 if name == "builtin" else NUM_CLASSES_TORCHVISION
        x = make_shapes(2, seed=21) if name == "builtin" else make_images(2, seed=21)
        target = torch.tensor([1, 4])
        for composite in COMPOSITE_NAMES:
            errs = []
            for dtype in (torch.float32, torch.float64):
                m, xx = copy.deepcopy(model).to(dtype), x.to(dtype)
                ours = pyattr_method(composite, name, m).relevances(xx, target)[""]
                ref = zennit_relevance(m, zennit_composite(composite, name, m), xx, target, num_classes)
                errs.append(max_relative_error(ours, ref))
            rows.append(f"| {name} | {composite} | {errs[0]:.1e} | {errs[1]:.1e} |")
            print(rows[-1], flush=True)
    table = "| model | composite | float32 | float64 |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    out = ROOT / "benchmarks" / "results" / "lrp_agreement.md"
    out.write_text(
        "Max relative error of pyattr's LRP vs zennit (python benchmarks/lrp_agreement.py; torch "
        f"{torch.__version__}, 64x64, batch 2).\n\n" + table
    )
    print(table)


if __name__ == "__main__":
    main()
