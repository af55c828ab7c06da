"""Recipro-CAM speed against its peer, OpenVINO XAI's ``TorchReciproCAM``, and against the bound (interleaved).

    pip install openvino-xai   # in a separate environment: its pins move numpy / networkx (see
                               # benchmarks/reciprocam_openvino_xai.py, the agreement oracle)
    python benchmarks/reciprocam_peer_openvino_xai.py [ROUNDS] [--size 224] [--name STEM]

resnet50 (random init, seed 0), batch 1, one thread. OpenVINO XAI 1.1 hooks the last module whose name contains the
given name, so the explained layer is a leaf here: an identity ReLU after layer4 (both libraries explain the same
model and layer). Contenders, called in turn each round (the order rotates):

- bound: the forward pass with the layer's output kept, then h*w copies of it through the head (avgpool + fc) in
  chunks of 49 (what any Recipro-CAM must run; the masking itself is not in it);
- pyattr ``ReciproCAM(kernel="point")`` (the kernel OpenVINO XAI uses) and pyattr's default Gaussian kernel;
- OpenVINO XAI ``TorchReciproCAM(embed_scaling=False)``: it returns every class's map (pyattr: the target's).

Prints medians and median per-round ratios; writes benchmarks/results/cpu/STEM.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torchvision

import pyattr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rounds", type=int, nargs="?", default=15)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--name", default="reciprocam_peer_openvino_xai", help="results file stem")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from openvino_xai.methods.white_box.torch import TorchReciproCAM

    torch.manual_seed(0)
    r = torchvision.models.resnet50().eval()
    body = torch.nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4,
                               torch.nn.ReLU())
    head = torch.nn.Sequential(r.avgpool, torch.nn.Flatten(), r.fc)
    model = torch.nn.Sequential(*body, *head).eval()
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        target = model(x).argmax(1)

    def bound():
        with torch.no_grad():
            act = body(x)
            hw = act.shape[2] * act.shape[3]
            for start in range(0, hw, 49):
                c = min(49, hw - start)
                head(act.repeat_interleave(c, 0)).gather(1, target.repeat_interleave(c)[:, None])

    point = pyattr.ReciproCAM(model, "8", kernel="point")
    gaussian = pyattr.ReciproCAM(model, "8")
    peer = TorchReciproCAM(model, target_layer="8", embed_scaling=False)
    xn = x.numpy()
    runs = {"bound: fwd + h*w head passes": bound,
            "pyattr ReciproCAM (point kernel)": lambda: point(x, target),
            "pyattr ReciproCAM (gaussian, default)": lambda: gaussian(x, target),
            "OpenVINO XAI TorchReciproCAM": lambda: peer.model_forward(xn, preprocess=False)}
    # agreement first (point kernel): the same map
    ours = point(x, target).raw
    theirs = torch.from_numpy(peer.model_forward(xn, preprocess=False)["saliency_map"])[torch.arange(1), target]
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    for f in runs.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in runs}
    names = list(runs)
    load = os.getloadavg()
    for i in range(args.rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for k in order:
            t0 = time.perf_counter()
            runs[k]()
            times[k].append(time.perf_counter() - t0)
    ref = times[names[0]]
    pyattr_point = times[names[1]]
    rows = []
    for k in names:
        med = statistics.median(times[k]) * 1000
        xb = statistics.median([a / b for a, b in zip(times[k], ref)])
        xp = statistics.median([a / b for a, b in zip(times[k], pyattr_point)])
        rows.append((k, med, xb, xp))
        print(f"{k:42s} {med:8.1f} ms  x bound {xb:.3f}  x pyattr (point) {xp:.3f}")
    print(f"point-kernel maps, pyattr vs OpenVINO XAI: max relative difference {error:.1e}")
    out = Path(__file__).parent / "results" / "cpu" / args.name
    cmd = f"python benchmarks/reciprocam_peer_openvino_xai.py {args.rounds} --size {args.size} --name {args.name}"
    lines = [f"# Recipro-CAM vs OpenVINO XAI {version('openvino-xai')} (resnet50, {args.size} px, batch 1, 1 thread)", "",
             (f"`{cmd}` · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
             f"load before {tuple(round(v, 2) for v in load)}, after {tuple(round(v, 2) for v in os.getloadavg())} · "
             f"{args.rounds} interleaved rounds"), "",
             "| contender | median ms | x bound (median per-round ratio) | x pyattr point kernel |",
             "|---|---:|---:|---:|"]
    lines += [f"| {k} | {m:.1f} | {b:.3f}x | {p:.3f}x |" for k, m, b, p in rows]
    lines += ["", (f"Point-kernel maps, pyattr vs OpenVINO XAI: max relative difference {error:.1e}. OpenVINO XAI "
              "returns every class's map; pyattr the target's.")]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows, "error": error,
                                                    "times": times}, indent=1) + "\n")
    print("wrote", out.with_suffix(".md"))


if __name__ == "__main__":
    main()
