"""Where LRP alpha2-beta1's fp32 error on the built-in model comes from (issue 12: the ONNX cell 1.3e-4 off eager).

    python benchmarks/lrp_alpha_beta_conditioning.py

On the inputs of the earlier export-matrix run (uniform noise from seed 1, the batch of 3 with targets
[-1, 1, -1]), against an fp64 eager run of the same method:

1. eager fp32 as it is;
2. the same fp32 forward, with every LRP rule's relevance (``LinearRule.relevance``) computed in fp64 from it;
3. the same, with the residual sums' relevance split (``canonizers._ResidualSum``) in fp64;
4. the fp64 run's sensitivity: its maps when the output of one module is multiplied by ``1 + 1e-7 * noise``
   (fp32 rounding is ~6e-8 relative per operation), module by module;
5. the unit whose relevance split differs most between fp32 and fp64 in each residual block: its two inputs
   ``a`` and ``b``, their sum ``z`` and the incoming relevance ``R`` (the split gives ``a R / z`` and ``b R / z``).

If 2 and 3 leave the error where 1 has it, the rules' own arithmetic is not what loses the digits: the fp32
forward's rounding is, through a map that is that sensitive to it (4, 5). Results:
``benchmarks/results/lrp_alpha_beta_conditioning.{md,json}``.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pyattr
from pyattr.methods import build_method
from pyattr.methods.lrp import canonizers, rules

NAME = "lrp_epsilon_alpha2_beta1"


def inputs(model):
    """The earlier export matrix's draw for the built-in model: example, batch 1, batch 3 (returned)."""
    method = build_method(NAME, model, None)
    gen = torch.Generator().manual_seed(1)
    torch.rand(1, 3, 64, 64, generator=gen)
    for b in (1, 3):
        x = torch.rand(b, 3, 64, 64, generator=gen)
        t = torch.randint(0, method(x).scores.shape[1], (b,), generator=gen)
        t[::2] = -1
    return x, t


def rules_in_fp64():
    original = rules.LinearRule.relevance

    def relevance(self, layer, x, weight, bias, relevance_out, **kw):
        params = kw.pop("term_params", None)
        if params is not None:
            kw["term_params"] = lambda i: tuple(None if v is None else v.double() for v in params(i))
        if kw.get("output") is not None:
            kw["output"] = kw["output"].double()
        weight = None if weight is None else weight.double()
        bias = None if bias is None else bias.double()
        return original(self, layer, x.double(), weight, bias, relevance_out.double(), **kw).float()

    return original, relevance


def perturbation(gen: torch.Generator):
    """A forward hook that multiplies the module's output by ``1 + 1e-7 * N(0, 1)``."""

    def hook(_module, _inputs, out):
        return out * (1 + 1e-7 * torch.randn(out.shape, generator=gen, dtype=out.dtype))

    return hook


def split_in_fp64(ctx, relevance):
    a, b = (t.double() for t in ctx.saved_tensors)
    s = relevance.double() / rules.Stabilizer(ctx.epsilon)(a + b)
    return (a * s).float(), (b * s).float(), None


def main() -> None:
    torch.set_num_threads(1)
    model = pyattr.zoo.load_builtin()
    model64 = copy.deepcopy(model).double()
    x, t = inputs(model)
    m32, m64 = build_method(NAME, model, None), build_method(NAME, model64, None)
    maps64 = m64(x.double(), t).maps

    def error() -> float:
        return float((m32(x, t).maps.double() - maps64).abs().max())

    result: dict = {"targets": t.tolist(), "eager_fp32": error()}
    original, relevance = rules_in_fp64()
    rules.LinearRule.relevance = relevance
    try:
        result["rules_fp64"] = error()
    finally:
        rules.LinearRule.relevance = original
    backward = canonizers._ResidualSum.backward
    canonizers._ResidualSum.backward = staticmethod(split_in_fp64)
    try:
        result["splits_fp64"] = error()
    finally:
        canonizers._ResidualSum.backward = backward
    worst = int((m32(x, t).maps.double() - maps64).flatten(1).abs().amax(1).argmax())
    result["worst_sample"] = worst

    # 4. sensitivity of the fp64 maps of the worst sample to 1e-7 relative noise at one module's output
    xs, ts = x[worst:worst + 1].double(), t[worst:worst + 1]
    base = m64(xs, ts).maps
    sensitivity = {}
    for name, module in model64.named_modules():
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)):
            continue
        handle = module.register_forward_hook(perturbation(torch.Generator().manual_seed(5)))
        try:
            sensitivity[name] = float((m64(xs, ts).maps - base).abs().max())
        finally:
            handle.remove()
    result["sensitivity"] = sensitivity

    # 5. the residual splits: the unit of each block whose a R / z differs most between fp32 and fp64
    log: list = []

    def logged(ctx, relevance):
        out = backward(ctx, relevance)
        log.append((*(t.detach() for t in ctx.saved_tensors), relevance.detach(), out[0].detach()))
        return out

    canonizers._ResidualSum.backward = staticmethod(logged)
    try:
        m32(x, t)
        runs32, log[:] = list(log), []
        m64(x.double(), t)
        runs64 = list(log)
    finally:
        canonizers._ResidualSum.backward = backward
    splits = []
    for (a32, b32, r32, ra32), (a64, b64, r64, ra64) in zip(runs32, runs64):
        err = (ra32.double() - ra64).abs()
        i = int(err.argmax())
        unit = [int(v) for v in torch.unravel_index(torch.tensor(i), err.shape)]

        def at(v, i=i):
            return float(v.flatten()[i])

        splits.append({"shape": list(a32.shape), "unit": unit, "a": [at(a32), at(a64)], "b": [at(b32), at(b64)],
                       "z": [at(a32 + b32), at(a64 + b64)], "R": [at(r32), at(r64)], "aR/z": [at(ra32), at(ra64)],
                       "max_abs_aR/z": float(ra64.abs().max()), "max_err_aR/z": float(err.max())})
    result["splits"] = splits
    meta = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__, "pyattr": pyattr.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "load": os.getloadavg()}
    out = ROOT / "benchmarks" / "results" / "lrp_alpha_beta_conditioning"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "result": result}, indent=1) + "\n")
    lines = ["# LRP alpha2-beta1 on the built-in model: where the fp32 error comes from", "",
             (f"Command: `{meta['command']}`; pyattr {meta['pyattr']}, torch {meta['torch']}, {meta['machine']}, "
             f"load {meta['load'][0]:.1f}. Inputs: the earlier export matrix's batch of 3 (uniform noise, seed 1), "
             f"targets {result['targets']}. Errors: max abs of the normalized maps against an fp64 eager run."), "",
             "| computation | maps vs fp64 |", "|---|---|",
             f"| eager fp32 | {result['eager_fp32']:.2e} |",
             f"| fp32 forward, every rule's relevance in fp64 | {result['rules_fp64']:.2e} |",
             f"| fp32 forward, the residual splits in fp64 | {result['splits_fp64']:.2e} |", "",
             f"fp64 maps of sample {worst} when one module's output is multiplied by 1 + 1e-7 * N(0, 1):", "",
             "| module | maps move by |", "|---|---|"]
    lines += [f"| {name} | {v:.1e} |" for name, v in sensitivity.items()]
    lines += ["", "Residual splits (block outputs, deepest first): the unit whose `a R / z` differs most, fp32 / fp64:",
              "", "| shape | unit | a | b | z = a + b | R | a R / z | max abs a R / z | max err |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in splits:
        def pair(key, s=s):
            return f"{s[key][0]:.7g} / {s[key][1]:.7g}"

        lines.append(f"| {tuple(s['shape'])} | {tuple(s['unit'])} | {pair('a')} | {pair('b')} | {pair('z')} | "
                     f"{pair('R')} | {pair('aR/z')} | {s['max_abs_aR/z']:.3g} | {s['max_err_aR/z']:.1e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
