"""Sanity checks for attribution methods: the model-randomization test of Adebayo et al. 2018.

A map that explains the model should change when the model's weights are destroyed. The cascading
randomization test (Adebayo, Gilmer, Muelly, Goodfellow, Hardt & Kim, "Sanity Checks for Saliency
Maps", NeurIPS 2018, arXiv:1810.03292) re-initializes the layers one after the other from the output
down, on a copy of the model, and measures the Spearman rank correlation between the original maps
and the maps of the increasingly random model. A method that passes falls towards 0; a method whose
maps stay correlated (Guided Backprop is the known case) is mostly showing the input, not the model.

    python -m pyattr.sanity --out docs/        # figures + table for every method on the built-in model
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ._capture import find_layer
from .errors import InputError
from .methods.base import AttributionMethod

MethodFactory = Callable[[nn.Module], AttributionMethod]


def rank(values: torch.Tensor) -> torch.Tensor:
    """Ranks (0-based, float64) of a 1-D tensor; tied values share the mean of their ranks."""
    v = values.detach().flatten().double()
    order = v.argsort()
    ordinal = torch.empty_like(v)
    ordinal[order] = torch.arange(v.numel(), dtype=v.dtype, device=v.device)
    _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=v.dtype, device=v.device).scatter_add_(0, inverse, ordinal)
    return (sums / counts.to(v.dtype))[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation between ``a[i]`` and ``b[i]`` (flattened) for each sample i: (N,) float64.

    NaN where one of the two maps is constant (the correlation is undefined).

    Example:
        >>> spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 30.0, 20.0]]))
        tensor([0.5000], dtype=torch.float64)
    """
    if a.shape != b.shape or a.dim() < 2:
        raise InputError(f"spearman needs two (N, ...) tensors of the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    out = []
    for x, y in zip(a.flatten(1), b.flatten(1)):
        rx, ry = rank(x), rank(y)
        rx, ry = rx - rx.mean(), ry - ry.mean()
        denom = (rx.pow(2).sum() * ry.pow(2).sum()).sqrt()
        out.append((rx * ry).sum() / denom if float(denom) > 0 else torch.tensor(float("nan"), dtype=torch.float64))
    return torch.stack(out)


def default_layers(model: nn.Module) -> list[str]:
    """The model's direct children that hold parameters, from the output side down (registration
    order reversed, which is the forward order for most models)."""
    names = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    if not names:
        raise InputError("the model has no child module with parameters to randomize; pass layers=[...]")
    return names[::-1]


def reinitialize(module: nn.Module) -> None:
    """Re-initialize every parameter (and batch-norm statistics) of ``module`` in place: each submodule's
    own ``reset_parameters()``, else a normal draw for parameters that no submodule resets."""
    done: set[int] = set()
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
            done.update(id(p) for p in sub.parameters(recurse=False))
    with torch.no_grad():
        for p in module.parameters():
            if id(p) not in done:
                p.normal_(0.0, 0.02)


@dataclass
class RandomizationResult:
    """The cascade of :func:`randomization_cascade`.

    Attributes:
        layers: the re-initialized layers, in cascade order (stage k has layers[:k+1] random).
        correlations: per stage, the mean over samples of the Spearman correlation with the original.
        per_sample: (stages, N) float64 correlations.
        maps: the original maps, then the maps after each stage ((N, ...) each, the method's ``maps``).
        target: (N,) the explained classes (of the original model), kept for every stage.
    """

    layers: list[str]
    correlations: list[float]
    per_sample: torch.Tensor
    maps: list[torch.Tensor]
    target: torch.Tensor


def randomization_cascade(method_factory: MethodFactory, model: nn.Module, x: torch.Tensor,
                          layers: Sequence[str] | None = None, target=None, seed: int = 0,
                          absolute: bool = True) -> RandomizationResult:
    """The cascading model-randomization test; see :func:`model_randomization`. Keeps the maps."""
    work = copy.deepcopy(model)  # never the user's model
    names = list(layers) if layers is not None else default_layers(work)
    modules = [find_layer(work, name) for name in names]
    original = method_factory(work)(x, target)
    target = original.target
    maps = [original.maps]
    base = original.raw.abs() if absolute else original.raw
    per_sample = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in modules:
            reinitialize(module)
            result = method_factory(work)(x, target)
            maps.append(result.maps)
            per_sample.append(spearman(base, result.raw.abs() if absolute else result.raw))
    table = torch.stack(per_sample)
    return RandomizationResult(names, [float(r) for r in table.nanmean(1)], table, maps, target)


def model_randomization(method_factory: MethodFactory, model: nn.Module, x: torch.Tensor,
                        layers: Sequence[str] | None = None, target=None, seed: int = 0,
                        absolute: bool = True) -> list[tuple[str, float]]:
    """Cascading model-randomization sanity check (Adebayo et al. 2018, arXiv:1810.03292).

    On a deep copy of ``model`` (the model itself is never touched), the layers are re-initialized one
    after the other from the top (output side) down, cumulatively. After each one the method is run again
    on ``x`` for the same targets, and the Spearman rank correlation between the original and the new
    raw maps (of their absolute values when ``absolute``) is averaged over the batch.

    Args:
        method_factory: builds the method on a model, e.g. ``lambda m: pyattr.Saliency(m)`` or
            ``lambda m: pyattr.GradCAM(m, "layer3")``.
        model: the model to explain.
        x: a batch of inputs.
        layers: module names (as in ``named_modules()``) in cascade order, top first; default: the
            model's direct children that hold parameters, last to first (:func:`default_layers`).
        target: the classes to explain (None: the original model's arg-max), kept for every stage.
        seed: seed of the re-initialization (the caller's random state is left as it was).
        absolute: correlate absolute values (Adebayo et al.'s main setting) or signed maps.

    Returns:
        ``[(layer name, mean Spearman correlation after randomizing it and every layer above), ...]``.
        A method that depends on the model falls towards 0 as the cascade goes down.

    Example:
        >>> import torch, pyattr
        >>> from pyattr.sanity import model_randomization
        >>> model = pyattr.zoo.load_builtin()
        >>> model_randomization(lambda m: pyattr.Saliency(m), model, torch.rand(4, 3, 64, 64))[0][0]
        'fc'
    """
    result = randomization_cascade(method_factory, model, x, layers, target, seed, absolute)
    return list(zip(result.layers, result.correlations))


# -- figures ----------------------------------------------------------------------------------------


def randomization_figure(rows: dict[str, RandomizationResult], image, sample: int = 0, cell: int = 96,
                         cmap: str = "jet"):
    """A PIL image: one row per method, the map of ``sample`` for the original model and after each
    cascade stage, each under its Spearman correlation. ``image``: (H, W, 3) uint8 shown first."""
    import numpy as np
    from PIL import Image, ImageDraw

    from . import render
    from .figures import _font

    first = next(iter(rows.values()))
    stages = ["original"] + [f"-{name}" for name in first.layers]
    label_w, head, pad, foot = 130, 34, 4, 16
    width = label_w + (len(stages) + 1) * (cell + pad) + pad
    height = head + len(rows) * (cell + foot + pad) + pad
    fig = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(fig)
    font, small = _font(13), _font(11)
    draw.text((pad, 4), "cascading randomization, top layer first", fill="black", font=small)
    for j, title in enumerate(["input", *stages]):
        draw.text((label_w + j * (cell + pad) + 2, 18), title[:14], fill="black", font=small)
    picture = Image.fromarray(np.asarray(image)).resize((cell, cell), Image.NEAREST)
    for i, (name, result) in enumerate(rows.items()):
        y = head + i * (cell + foot + pad)
        draw.text((pad, y + cell // 2 - 8), name, fill="black", font=font)
        fig.paste(picture, (label_w, y))
        for j, maps in enumerate(result.maps):
            m = maps[sample]
            while m.dim() > 2:  # several targets or channels: show the first
                m = m[0]
            heat = render.colorize(m[None].float().numpy(), cmap=cmap)[0]
            x0 = label_w + (j + 1) * (cell + pad)
            fig.paste(Image.fromarray(heat).resize((cell, cell), Image.BILINEAR), (x0, y))
            if j > 0:
                rho = float(result.per_sample[j - 1, sample])
                text = "rho n/a" if math.isnan(rho) else f"rho {rho:+.2f}"
                draw.text((x0 + 2, y + cell + 1), text, fill="black", font=small)
    return fig


def _builtin_images(n: int, seed: int):
    from .zoo import generate

    batch = generate(n, seed=seed)
    x = torch.from_numpy(batch.images).permute(0, 3, 1, 2).float() / 255
    return x, batch.images


def main(argv: Sequence[str] | None = None) -> None:
    """Run the check for every registered method on the built-in model; write figures, JSON, Markdown."""
    from .figures import save_png_atomic
    from .methods import METHODS, build_method
    from .zoo import SHAPESNET_LAYER, load_builtin

    parser = argparse.ArgumentParser(description="Model-randomization sanity check on the built-in model.")
    parser.add_argument("--out", default="docs", help="folder for sanity_*.png, sanity.json, sanity.md")
    parser.add_argument("--n", type=int, default=8, help="images (default 8)")
    parser.add_argument("--seed", type=int, default=60_000, help="image seed (never used for training)")
    parser.add_argument("--methods", default="all", help="comma-separated method names, or all")
    parser.add_argument("--options", type=json.loads, default={},
                        help='method options as JSON, given to the methods that take them, e.g. \'{"masks": 250}\'')
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_builtin()
    x, images = _builtin_images(args.n, args.seed)
    names = list(METHODS) if args.methods == "all" else args.methods.split(",")
    rows: dict[str, RandomizationResult] = {}
    for name in names:
        params = inspect.signature(METHODS[name].__init__).parameters
        options = {k: v for k, v in args.options.items() if k in params}
        rows[name] = randomization_cascade(lambda m, name=name, options=options: build_method(name, m, SHAPESNET_LAYER,
                                                                                             **options), model, x)
        print(name, " ".join(f"{layer}:{rho:+.3f}" for layer, rho in zip(rows[name].layers, rows[name].correlations)),
              flush=True)
    layers = next(iter(rows.values())).layers
    for k in range(min(2, args.n)):
        save_png_atomic(randomization_figure(rows, images[k], sample=k), out / f"sanity_randomization_{k}.png")
    head = "| method | " + " | ".join(f"-{layer}" for layer in layers) + " |\n"
    head += "|---|" + "---|" * len(layers) + "\n"
    lines = [f"| {name} | " + " | ".join("n/a" if math.isnan(r) else f"{r:+.2f}" for r in res.correlations) + " |"
             for name, res in rows.items()]
    (out / "sanity.md").write_text(
        f"Spearman rank correlation (absolute values) between each method's maps on the built-in model and its maps "
        f"after re-initializing the layers cumulatively from the top, mean over {args.n} generated images "
        f"(seed {args.seed}).\n\n" + head + "\n".join(lines) + "\n")
    (out / "sanity.json").write_text(json.dumps(
        {name: dict(zip(res.layers, res.correlations)) for name, res in rows.items()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
