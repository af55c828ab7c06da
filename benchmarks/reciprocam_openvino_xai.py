"""Recipro-CAM against OpenVINO XAI's TorchReciproCAM (an optional oracle: openvino-xai is not in the test extra,
its pins move numpy / networkx and pull opencv-python over grad-cam's opencv-python-headless).

    pip install openvino-xai && python benchmarks/reciprocam_openvino_xai.py

OpenVINO XAI 1.1's TorchReciproCAM (point kernel, logits) hooks the last module whose name contains the given name,
so the layer is a leaf here: an identity ReLU after resnet18's layer4 (random init, seed 0, 64x64, 2 images).
Prints the largest relative difference of the raw maps and writes benchmarks/results/reciprocam_openvino_xai.txt;
exits 1 above 1e-5.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision

import pyattr


def main() -> None:
    from openvino_xai.methods.white_box.torch import TorchReciproCAM

    torch.manual_seed(0)
    r = torchvision.models.resnet18(num_classes=10).eval()
    model = torch.nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4,
                                torch.nn.ReLU(), r.avgpool, torch.nn.Flatten(), r.fc).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    target = torch.tensor([1, 8])
    ours = pyattr.ReciproCAM(model, "8", kernel="point")(x, target).raw
    theirs = TorchReciproCAM(model, target_layer="8", embed_scaling=False)
    maps = torch.from_numpy(theirs.model_forward(x.numpy(), preprocess=False)["saliency_map"])[torch.arange(2), target]
    error = float((ours - maps).abs().max() / maps.abs().max())
    from importlib.metadata import version

    line = (f"Recipro-CAM (point kernel) vs OpenVINO XAI {version('openvino-xai')} TorchReciproCAM, resnet18 layer4, "
            f"64x64, 2 images: max relative difference {error:.2e} ({'ok' if error < 1e-5 else 'FAILED'})")
    print(line)
    (Path(__file__).parent / "results" / "reciprocam_openvino_xai.txt").write_text(line + "\n")
    sys.exit(0 if error < 1e-5 else 1)


if __name__ == "__main__":
    main()
