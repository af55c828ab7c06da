"""Agreement of pyattr's gradient family with captum on seeded random-init torchvision models.

For each model (resnet18, vgg11, mobilenet_v3_small; 10 classes, 64x64 inputs) and method, the
element-wise attributions (``reduction="none"``) of a batch are compared with captum's; the figure
is max over samples of max |pyattr - captum| / max |captum|. SmoothGrad: captum's NoiseTunnel is
fed pyattr's noise tensors. Also: Integrated Gradients' completeness error on the built-in model.

    python benchmarks/gradient_agreement.py            # writes benchmarks/results/gradient_agreement.{json,md}
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
import torchvision
from captum.attr import (
    Deconvolution,
    GuidedBackprop,
    InputXGradient,
    IntegratedGradients,
    NoiseTunnel,
    Saliency,
)

import pyattr
from pyattr.methods import gradient as g

MODELS = {
    "resnet18": (0, lambda: torchvision.models.resnet18(num_classes=10)),
    "vgg11": (1, lambda: torchvision.models.vgg11(num_classes=10)),
    "mobilenet_v3_small": (2, lambda: torchvision.models.mobilenet_v3_small(num_classes=10)),
}


def relative(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double().flatten(1), ref.detach().double().flatten(1)
    return float(((ours - ref).abs().amax(1) / ref.abs().amax(1)).max())


def noise_tunnel(method: g.SmoothGrad, attribution, x, target, **kwargs) -> torch.Tensor:
    noise = method.noise(x).flatten(0, 1)
    original = torch.normal
    torch.normal = lambda *a, **k: noise.clone()
    try:
        return NoiseTunnel(attribution).attribute(x.clone(), nt_type=method.variant, nt_samples=method.samples,
                                                  stdevs=1.0, target=target, **kwargs)
    finally:
        torch.normal = original


def agreement(model, x, target, steps: int) -> dict[str, float]:
    out = {}
    out["saliency"] = relative(g.Saliency(model, reduction="none")(x, target).raw,
                               Saliency(model).attribute(x.clone(), target=target, abs=True))
    out["saliency (signed)"] = relative(g.Saliency(model, reduction="none", absolute=False)(x, target).raw,
                                        Saliency(model).attribute(x.clone(), target=target, abs=False))
    out["inputxgradient"] = relative(g.InputXGradient(model, reduction="none")(x, target).raw,
                                     InputXGradient(model).attribute(x.clone(), target=target))
    for rule in ("gausslegendre", "riemann_left", "riemann_middle"):
        out[f"integratedgradients ({rule})"] = relative(
            g.IntegratedGradients(model, steps=steps, rule=rule, chunk_size=8, reduction="none")(x, target).raw,
            IntegratedGradients(model).attribute(x.clone(), target=target, n_steps=steps, method=rule))
    sg = g.SmoothGrad(model, "saliency", samples=8, chunk_size=4, reduction="none")
    out["smoothgrad"] = relative(sg(x, target).raw, noise_tunnel(sg, Saliency(model), x, target, abs=True))
    vg = g.SmoothGrad(model, "saliency", samples=8, variant="vargrad", reduction="none", absolute=False)
    out["smoothgrad (vargrad)"] = relative(vg(x, target).raw, noise_tunnel(vg, Saliency(model), x, target, abs=False))
    out["guidedbackprop"] = relative(g.GuidedBackprop(model, reduction="none", absolute=False)(x, target).raw,
                                     GuidedBackprop(model).attribute(x.clone(), target=target))
    out["deconvnet"] = relative(g.DeconvNet(model, reduction="none", absolute=False)(x, target).raw,
                                Deconvolution(model).attribute(x.clone(), target=target))
    return out


def completeness(n: int, steps: int) -> dict[str, list[float]]:
    model = pyattr.zoo.load_builtin()
    batch = pyattr.zoo.generate(n, seed=50_000)
    x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
    out = {}
    for rule in ("gausslegendre", "riemann_trapezoid", "riemann_middle", "riemann_left"):
        result = g.IntegratedGradients(model, steps=steps, rule=rule, chunk_size=32)(x)
        with torch.no_grad():
            gap = (model(x) - model(torch.zeros_like(x))).gather(1, result.target[:, None])[:, 0]
        out[rule] = (result.completeness_error / gap.abs()).tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gradient_agreement"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    x = torch.rand(args.n, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    target = torch.arange(args.n) % 10
    table = {}
    for name, (seed, build) in MODELS.items():
        torch.manual_seed(seed)
        table[name] = agreement(build().eval(), x, target, args.steps)
        print(name, {k: f"{v:.1e}" for k, v in table[name].items()}, flush=True)
    ig = completeness(24, 64)
    print("IG completeness (relative, 64 steps):", {k: f"{max(v):.1e}" for k, v in ig.items()})
    methods = list(next(iter(table.values())))
    md = "| method | " + " | ".join(MODELS) + " |\n|---|" + "---|" * len(MODELS) + "\n"
    md += "\n".join(f"| {m} | " + " | ".join(f"{table[k][m]:.1e}" for k in MODELS) + " |" for m in methods) + "\n"
    md += ("\n| IG rule, 64 steps, zero baseline | mean relative completeness error | max (24 images) |\n|---|---|---|\n"
           + "\n".join(f"| {rule} | {sum(v) / len(v):.1e} | {max(v):.1e} |" for rule, v in ig.items()) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"agreement": table, "ig_completeness": ig,
                                                    "torch": torch.__version__}, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        f"Max relative error vs captum ({args.n} random 64x64 inputs, IG {args.steps} steps, SmoothGrad 8 samples "
        "with captum fed the same noise):\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
