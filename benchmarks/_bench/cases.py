"""What is timed: models, inputs, the methods' settings, the bounds and pyattr's backends.

Settings shared by pyattr, the peers and the bounds (so that all do the same work):

==================== ===========================================================================
method               work per image
==================== ===========================================================================
saliency             1 forward + 1 backward to the input; map: max over channels of |grad|
integratedgradients  32 points (Gauss-Legendre), zero baseline; sum over channels
smoothgrad           16 noisy samples (noise 0.15 x the input's range); max of |grad|
gradcam, gradcampp   1 forward + 1 backward down to the layer
scorecam             1 forward + C masked forwards (C channels of the layer)
fullgrad             1 forward + 1 backward to the input and to every biased layer's output
lrp                  EpsilonPlus rules; 1 forward + 1 modified backward to the input
occlusion            1 forward + 16 occluded forwards (4 x 4 windows of side/4, stride side/4, baseline 0)
featureablation      1 forward + 16 ablated forwards (a 4 x 4 grid of cells of side/4, baseline 0)
rise                 1 forward + 16 masked forwards (7 x 7 grids, p = 0.5); no peer implements it
deeplift             zero baseline; 1 forward + 1 backward of the 2N batch (inputs and baselines)
deepliftshap         4 baselines (seeded random images); 4 x (forward + backward of a 2N batch)
gradientshap         16 samples from 4 baselines (seeded random images), no noise; 16 x (fwd + bwd)
ablationcam          1 forward + C passes of the head after the layer (each channel ablated), 32 a pass
reciprocam           1 forward + h*w passes of the head after the layer (one per position), 64 a pass
sscam, iscam         1 forward + S x C masked forwards (S = CAM_SAMPLES noise / path samples, reduced from
                     torchcam's 35 / 10 so that a call fits the CPU suite), C per pass as Score-CAM
smoothgradcampp      1 clean forward + 4 noisy (forward + backward to the layer), one pass of 4N
eigencam             1 forward (no gradient)
eigengradcam         1 forward + 1 backward to the layer
==================== ===========================================================================

The head after the layer (Ablation-CAM, Recipro-CAM's bound): ``avgpool -> flatten -> fc`` after a torchvision
ResNet's ``layer4`` (:func:`head_fn`; the only models these two methods are timed on).

Targets beyond class logits (issue 14): two models explain another objective than a class logit
(:data:`TASK_MODELS`), with Saliency and Grad-CAM:

============================= ==================================================================
model                         objective (pyattr's target, the bound's hand-written objective)
============================= ==================================================================
deeplabv3_mobilenet_v3_large  segmentation, 256x256: a class's score summed over a region mask
                              (a box per sample, the class with the largest summed score in it);
                              ``SegmentationTarget(classes, region)``; Grad-CAM on ``backbone.16``
resnet50_embedding            similarity, 224x224: resnet50 with ``fc = Identity`` (2048-d pooled
                              features), cosine similarity to a reference embedding (another
                              image's); ``SimilarityTarget(reference)``; Grad-CAM on ``layer4``
============================= ==================================================================

Batching of the repeated passes (the same for pyattr, the bound and the peers that can batch):
:func:`points_per_pass` points / samples per input in one pass (16, fewer at large batches so that a
pass holds at most 128 images), :func:`channels_per_pass` Score-CAM masks per input in one pass (32,
at most 256 images a pass), :func:`points_per_pass` perturbed copies per input in one pass for the
perturbation methods (all 16 at batch 8: one pass of 128 images after the clean one).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pyattr
from pyattr.methods import METHODS

from .timing import Contender

IG_STEPS, SG_SAMPLES, SG_NOISE = 32, 16, 0.15
PERTURBATIONS = 16  # windows (4 x 4), grid cells (4 x 4) or RISE masks per image
PERTURBATION_METHODS = ("occlusion", "featureablation", "rise")

SHAP_BASELINES = 4
CAM_SAMPLES = 2  # SS-CAM / IS-CAM samples (torchcam: 35 / 10): S x C masked forwards a call
ABLATION_CHUNK, RECIPRO_CHUNK, SMOOTH_CAMPP_SAMPLES = 32, 64, 4


def shap_baselines(x: torch.Tensor) -> torch.Tensor:
    """The (SHAP_BASELINES, C, H, W) baseline distribution of the SHAP methods: seeded uniform noise over x's range."""
    g = torch.Generator().manual_seed(7)
    noise = torch.rand(SHAP_BASELINES, *x.shape[1:], generator=g).to(x.device)
    return float(x.min()) + float(x.max() - x.min()) * noise


def points_per_pass(batch: int) -> int:
    """Integration points / noisy samples per input in one batched pass (divides 16)."""
    chunk = 16
    while chunk > 1 and batch * chunk > 128:
        chunk //= 2
    return chunk


def channels_per_pass(batch: int) -> int:
    """Score-CAM channels per input in one masked pass."""
    return max(1, min(32, 256 // batch))


VIT_LAYER = "encoder.layers.encoder_layer_11.ln_1"
METHOD_LABELS = {
    "saliency": "Saliency", "integratedgradients": "Integrated Gradients (32)", "smoothgrad": "SmoothGrad (16)",
    "gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++", "scorecam": "Score-CAM", "fullgrad": "FullGrad",
    "lrp": "LRP (EpsilonPlus)", "occlusion": "Occlusion (16 windows)", "featureablation": "Feature Ablation (16 cells)",
    "rise": "RISE (16 masks)",
    "deeplift": "DeepLIFT", "deepliftshap": f"DeepLIFT-SHAP ({SHAP_BASELINES})",
    "gradientshap": f"GradientSHAP ({SG_SAMPLES})",
    "ablationcam": "Ablation-CAM", "reciprocam": "Recipro-CAM", "sscam": f"SS-CAM ({CAM_SAMPLES} samples)",
    "iscam": f"IS-CAM ({CAM_SAMPLES} samples)", "smoothgradcampp": f"Smooth Grad-CAM++ ({SMOOTH_CAMPP_SAMPLES})",
    "eigencam": "Eigen-CAM", "eigengradcam": "Eigen-Grad-CAM",
}
ALL_METHODS = list(METHOD_LABELS)
CAM_METHODS = ("gradcam", "gradcampp", "scorecam", "sscam", "iscam", "smoothgradcampp", "eigencam", "eigengradcam")
ALL_MODELS = ["resnet50", "vgg16", "mobilenet_v3_large", "vit_b_16"]


@dataclass
class Setup:
    """A model on its device with its input batch, fixed targets and the explained layer."""

    name: str
    model: nn.Module
    x: torch.Tensor
    target: torch.Tensor          # (N,) the arg-max classes, given explicitly to every library
    layer_name: str | None        # CAM layer (None for models where none applies)
    reshape: Callable | None      # tokens -> (N, C, h, w) for ViT, else None
    device: torch.device
    task: str = "class"           # "class", "segmentation" or "similarity" (TASK_MODELS)
    objective: Callable[[object], torch.Tensor] | None = None
    """The hand-written objective of a task model: the model's output -> (N,) per-sample scalars
    (the bound's, and the peers' wrapped forward); None for classifiers (the target class's logit)."""
    eager_target: object = None   # what pyattr's eager call is given as its target (class ids or a Target)
    kind: object = None           # the target kind exported graphs are traced with (None: class logits)
    feeds: tuple[torch.Tensor, ...] = ()  # the exported graph's inputs after images, target (region / reference)
    peer_model: nn.Module | None = None   # the model as the peers take it (a tensor output)
    objective_label: str = ""

    @property
    def layer(self) -> nn.Module:
        return dict(self.model.named_modules())[self.layer_name]


TASK_MODELS = {
    "deeplabv3_mobilenet_v3_large": ("segmentation", 256, "backbone.16"),
    "resnet50_embedding": ("similarity", 224, "layer4"),
}
"""Models explained for another objective than a class logit: name -> (task, input side, CAM layer)."""
TASK_METHODS = ("saliency", "gradcam")


def model_size(name: str, size: int) -> int:
    """The input side of a model: a task model's own (TASK_MODELS), else ``size``."""
    return TASK_MODELS[name][1] if name in TASK_MODELS else size


class OutOnly(nn.Module):
    """A torchvision segmenter's per-pixel scores: ``model(x)["out"]`` (the peers need a tensor output)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


def make_model(name: str, size: int, device: torch.device) -> nn.Module:
    """A torchvision classifier with random (seeded) weights, in eval mode; nothing is downloaded.
    Task models: ``deeplabv3_mobilenet_v3_large`` (21 classes, no aux head, returns ``{"out": ...}``),
    ``resnet50_embedding`` (resnet50 with ``fc = nn.Identity()``: (N, 2048) pooled features)."""
    torch.manual_seed(0)
    if name == "deeplabv3_mobilenet_v3_large":
        model = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)
        return model.eval().to(device)
    if name == "resnet50_embedding":
        model = torchvision.models.resnet50(weights=None)
        model.fc = nn.Identity()
        return model.eval().to(device)
    kwargs = {"image_size": size} if name.startswith("vit") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model.eval().to(device)


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens (N, 1 + h*w, D) -> (N, D, h, w), as a plain function (for the peers)."""
    n, p, d = tokens.shape
    side = round((p - 1) ** 0.5)
    return tokens[:, 1:].reshape(n, side, side, d).permute(0, 3, 1, 2)


def box_regions(batch: int, size: int) -> torch.Tensor:
    """(N, size, size) 0/1 masks: a box per sample, shifted from sample to sample."""
    region = torch.zeros(batch, size, size)
    for n in range(batch):
        top, left = (size // 8) + (n * size // 16) % (size // 4), (size // 4) + (n * size // 32) % (size // 4)
        region[n, top:top + size // 2, left:left + size // 2] = 1.0
    return region


def segmentation_objective(region: torch.Tensor, target: torch.Tensor) -> Callable[[object], torch.Tensor]:
    """sum_p region[n, p] * out[n, target[n], p], per sample (the model's dict output or its "out")."""
    index = target[:, None, None, None]

    def objective(output):
        out = output["out"] if isinstance(output, dict) else output
        picked = out.gather(1, index.expand(-1, 1, *out.shape[2:]))[:, 0]
        return (picked * region).sum((1, 2))
    return objective


def similarity_objective(reference: torch.Tensor) -> Callable[[object], torch.Tensor]:
    """cos(embedding[n], reference[n]), per sample."""
    return lambda output: F.cosine_similarity(output, reference, dim=1, eps=1e-8)


def make_task_setup(name: str, model: nn.Module, batch: int, device: torch.device) -> Setup:
    from pyattr.targets import SegmentationTarget, SimilarityTarget

    task, size, layer = TASK_MODELS[name]
    g = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    if task == "segmentation":
        region = box_regions(batch, size).to(device)
        with torch.no_grad():
            out = model(x)["out"]
            target = (out * region[:, None]).sum((2, 3)).argmax(1)
        return Setup(name, model, x, target, layer, None, device, task=task,
                     objective=segmentation_objective(region, target),
                     eager_target=SegmentationTarget(classes=target, region=region), kind=SegmentationTarget(),
                     feeds=(region.contiguous(),), peer_model=OutOnly(model),
                     objective_label=f"class score summed over a box region ({size // 2}x{size // 2}) "
                                     f"of {out.shape[1]} classes")
    xr = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1000 + batch)).to(device)
    with torch.no_grad():
        reference = model(xr).contiguous()
    target = torch.zeros(batch, dtype=torch.long, device=device)
    return Setup(name, model, x, target, layer, None, device, task=task, objective=similarity_objective(reference),
                 eager_target=SimilarityTarget(reference), kind=SimilarityTarget(), feeds=(reference,),
                 peer_model=model,
                 objective_label=f"cosine similarity to a reference embedding ({reference.shape[1]}-d)")


def make_setup(name: str, model: nn.Module, batch: int, size: int, device: torch.device) -> Setup:
    if name in TASK_MODELS:
        return make_task_setup(name, model, batch, device)
    g = torch.Generator().manual_seed(batch)
    x = torch.rand(batch, 3, size, size, generator=g).to(device)
    with torch.no_grad():
        target = model(x).argmax(1)
    if name.startswith("vit"):
        layer, reshape = VIT_LAYER, tokens_to_grid
    else:
        from pyattr.models import find_default_layer

        layer, reshape = find_default_layer(model, x[:1]), None
    return Setup(name, model, x, target, layer, reshape, device)


def build_pyattr(method: str, s: Setup) -> pyattr.AttributionMethod:
    """The pyattr method with the shared settings (module docstring)."""
    m = s.model
    if method == "saliency":
        return pyattr.Saliency(m)
    if method == "integratedgradients":
        return pyattr.IntegratedGradients(m, steps=IG_STEPS, chunk_size=points_per_pass(len(s.x)))
    if method == "smoothgrad":
        return pyattr.SmoothGrad(m, "saliency", samples=SG_SAMPLES, noise_level=SG_NOISE,
                                 chunk_size=points_per_pass(len(s.x)))
    if method in CAM_METHODS:
        options = {"reshape_transform": pyattr.methods.TokensToGrid(1)} if s.reshape is not None else {}
        if method in ("scorecam", "sscam", "iscam"):
            options["chunk_size"] = channels_per_pass(len(s.x))
        if method in ("sscam", "iscam"):
            options["samples"] = CAM_SAMPLES
        if method == "smoothgradcampp":
            options.update(samples=SMOOTH_CAMPP_SAMPLES, chunk_size=SMOOTH_CAMPP_SAMPLES)
        return METHODS[method](m, s.layer_name, **options)
    if method == "ablationcam":
        return pyattr.methods.AblationCAM(m, s.layer_name, chunk_size=ABLATION_CHUNK)
    if method == "reciprocam":
        return pyattr.methods.ReciproCAM(m, s.layer_name, chunk_size=RECIPRO_CHUNK)
    if method == "fullgrad":
        return pyattr.methods.FullGrad(m)
    if method in PERTURBATION_METHODS:
        side, chunk = s.x.shape[-1] // 4, points_per_pass(len(s.x))
        if method == "occlusion":
            return pyattr.Occlusion(m, patch=side, stride=side, chunk_size=chunk)
        if method == "featureablation":
            return pyattr.FeatureAblation(m, cell=side, chunk_size=chunk)
        return pyattr.RISE(m, masks=PERTURBATIONS, chunk_size=chunk)
    if method == "deeplift":
        return pyattr.DeepLift(m)
    if method == "deepliftshap":
        return pyattr.DeepLiftShap(m, shap_baselines(s.x), chunk_size=max(1, min(SHAP_BASELINES, 64 // len(s.x))))
    if method == "gradientshap":
        return pyattr.GradientShap(m, shap_baselines(s.x), samples=SG_SAMPLES, chunk_size=points_per_pass(len(s.x)))
    if method in METHODS:  # e.g. "lrp" once it lands: its defaults
        return pyattr.methods.build_method(method, m)
    raise KeyError(f"pyattr has no method {method!r} (registered: {', '.join(METHODS)})")


def pyattr_has(method: str) -> bool:
    return method in METHODS


# --- references: the bound and the forward pass ---------------------------------------------------


def _select(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return scores.gather(1, target[:, None]).sum()


def _input_grad(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(_select(model(x), target), x)[0]


def _layer_grad(model: nn.Module, layer: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        scores = model(x)
    finally:
        handle.remove()
    return torch.autograd.grad(_select(scores, target), captured[-1])[0]


def _objective_input_grad(model: nn.Module, objective, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(objective(model(x)).sum(), x)[0]


def _objective_layer_grad(model: nn.Module, objective, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        output = model(x)
    finally:
        handle.remove()
    return torch.autograd.grad(objective(output).sum(), captured[-1])[0]


def _layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, the layer's output) of one forward pass without gradient."""
    captured = []
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad():
            scores = model(x)
    finally:
        handle.remove()
    return scores, captured[-1]


def head_fn(s: Setup) -> Callable[[torch.Tensor], torch.Tensor]:
    """The part of the model after the CAM layer as a plain function (torchvision ResNets after ``layer4``)."""
    model = s.model
    if s.layer_name == "layer4" and hasattr(model, "avgpool") and hasattr(model, "fc"):
        return lambda a: model.fc(torch.flatten(model.avgpool(a), 1))
    raise KeyError(f"no head written for {s.name} after {s.layer_name!r} (the bound of Ablation-/Recipro-CAM)")


def bound_fn(method: str, s: Setup) -> Callable[[], object]:
    """The plain forward + backward (torch.autograd) the method needs, nothing else (no mapping, no
    normalization, no parameter gradient). Task models: the forward, the hand-written objective
    (:attr:`Setup.objective`) and its gradient."""
    model, x, t = s.model, s.x, s.target
    n = x.shape[0]
    if s.objective is not None:
        if method == "saliency":
            return lambda: _objective_input_grad(model, s.objective, x)
        if method == "gradcam":
            layer = s.layer
            return lambda: _objective_layer_grad(model, s.objective, layer, x)
        raise KeyError(f"{method} on the {s.task} model {s.name}: not in the plan (TASK_METHODS)")
    if method in ("saliency", "fullgrad", "lrp"):
        return lambda: _input_grad(model, x, t)
    if method in ("gradcam", "gradcampp"):
        layer = s.layer
        return lambda: _layer_grad(model, layer, x, t)
    if method in ("integratedgradients", "smoothgrad"):
        passes = IG_STEPS if method == "integratedgradients" else SG_SAMPLES
        chunk = points_per_pass(n)
        scale = torch.linspace(0.1, 1.0, chunk, device=x.device).view(1, -1, 1, 1, 1)

        def several():
            for _ in range(passes // chunk):
                points = (x[:, None] * scale).flatten(0, 1)
                _input_grad(model, points, t.repeat_interleave(chunk))
        return several
    if method in PERTURBATION_METHODS:
        chunk = points_per_pass(n)

        def perturbed_forwards():
            with torch.no_grad():
                model(x).gather(1, t[:, None])
                for start in range(0, PERTURBATIONS, chunk):
                    c = min(chunk, PERTURBATIONS - start)
                    model(x.repeat_interleave(c, 0)).gather(1, t.repeat_interleave(c)[:, None])
        return perturbed_forwards
    if method in ("deeplift", "deepliftshap"):
        refs = torch.zeros_like(x)[:, None] if method == "deeplift" else shap_baselines(x)[None].expand(n, -1, *x.shape[1:])
        chunk = 1 if method == "deeplift" else max(1, min(SHAP_BASELINES, 64 // n))

        def paired():
            for start in range(0, refs.shape[1], chunk):
                part = refs[:, start:start + chunk]
                pairs = torch.stack([x[:, None].expand_as(part), part], 2).flatten(0, 2)
                _input_grad(model, pairs, t.repeat_interleave(2 * part.shape[1]))
        return paired
    if method == "gradientshap":
        chunk = points_per_pass(n)
        scale = torch.linspace(0.1, 1.0, chunk, device=x.device).view(1, -1, 1, 1, 1)

        def points():
            for _ in range(SG_SAMPLES // chunk):
                _input_grad(model, (x[:, None] * scale).flatten(0, 1), t.repeat_interleave(chunk))
        return points
    if method in ("ablationcam", "reciprocam"):
        layer, head = s.layer, head_fn(s)

        def head_passes():
            with torch.no_grad():
                _, act = _layer_output(model, layer, x)
                copies = act.shape[1] if method == "ablationcam" else act.shape[2] * act.shape[3]
                chunk = ABLATION_CHUNK if method == "ablationcam" else RECIPRO_CHUNK
                for start in range(0, copies, chunk):
                    c = min(chunk, copies - start)
                    head(act.repeat_interleave(c, 0)).gather(1, t.repeat_interleave(c)[:, None])
        return head_passes
    if method in ("sscam", "iscam"):
        layer = s.layer

        def sampled_masked_forwards():
            with torch.no_grad():
                _, act = _layer_output(model, layer, x)
                channels, chunk = act.shape[1], channels_per_pass(n)
                for start in range(0, channels, chunk):
                    c = min(chunk, channels - start)
                    for _ in range(CAM_SAMPLES):
                        model(x.repeat_interleave(c, 0)).gather(1, t.repeat_interleave(c)[:, None])
        return sampled_masked_forwards
    if method == "smoothgradcampp":
        layer = s.layer

        def clean_and_noisy():
            _layer_output(model, layer, x)
            _layer_grad(model, layer, x.repeat_interleave(SMOOTH_CAMPP_SAMPLES, 0),
                        t.repeat_interleave(SMOOTH_CAMPP_SAMPLES))
        return clean_and_noisy
    if method == "eigencam":
        layer = s.layer
        return lambda: _layer_output(model, layer, x)
    if method == "eigengradcam":
        layer = s.layer
        return lambda: _layer_grad(model, layer, x, t)
    if method == "scorecam":
        layer = s.layer

        def masked_forwards():
            with torch.no_grad():
                captured = []
                handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
                try:
                    model(x)
                finally:
                    handle.remove()
                act = captured[-1] if s.reshape is None else s.reshape(captured[-1])
                channels, chunk = act.shape[1], channels_per_pass(n)
                for start in range(0, channels, chunk):
                    c = min(chunk, channels - start)
                    model(x.repeat_interleave(c, 0)).gather(1, t.repeat_interleave(c)[:, None])
        return masked_forwards
    raise KeyError(method)


def forward_fn(s: Setup) -> Callable[[], object]:
    def forward():
        with torch.no_grad():
            return s.model(s.x)
    return forward


def bound_label(method: str, s: Setup | None = None) -> str:
    if s is not None and s.objective is not None:
        return {"saliency": f"fwd + {s.task} objective + bwd to input",
                "gradcam": f"fwd + {s.task} objective + bwd to layer"}[method]
    return {"saliency": "fwd + bwd to input", "fullgrad": "fwd + bwd to input", "lrp": "fwd + bwd to input",
            "gradcam": "fwd + bwd to layer", "gradcampp": "fwd + bwd to layer",
            "integratedgradients": f"{IG_STEPS} x (fwd + bwd to input)",
            "smoothgrad": f"{SG_SAMPLES} x (fwd + bwd to input)",
            "scorecam": "fwd + C masked fwds", "occlusion": f"fwd + {PERTURBATIONS} fwds",
            "featureablation": f"fwd + {PERTURBATIONS} fwds", "rise": f"fwd + {PERTURBATIONS} fwds",
            "deeplift": "fwd + bwd to input of the 2N batch",
            "deepliftshap": f"{SHAP_BASELINES} x (fwd + bwd to input of a 2N batch)",
            "gradientshap": f"{SG_SAMPLES} x (fwd + bwd to input)",
            "ablationcam": "fwd + C head passes", "reciprocam": "fwd + h*w head passes",
            "sscam": f"fwd + {CAM_SAMPLES} x C masked fwds", "iscam": f"fwd + {CAM_SAMPLES} x C masked fwds",
            "smoothgradcampp": f"fwd + {SMOOTH_CAMPP_SAMPLES} x (fwd + bwd to layer)", "eigencam": "fwd",
            "eigengradcam": "fwd + bwd to layer"}.get(method, "fwd + bwd")


# --- pyattr's backends ----------------------------------------------------------------------------

SUFFIX = {"torchscript": ".pt", "pt2": ".pt2", "onnx": ".onnx"}


def _source_hash() -> str:
    """A hash of pyattr's Python sources and of the torch version: an exported file is reused from
    the cache only while both are unchanged."""
    h = hashlib.sha1(torch.__version__.encode())
    root = Path(pyattr.__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def export_key(method: str, method_obj: pyattr.AttributionMethod, s: Setup) -> str:
    """A file name for the exported graph: model, input size, method and a hash of its settings."""
    settings = json.dumps(method_obj.metadata(), sort_keys=True, default=str)
    return f"{s.name}-{s.x.shape[-1]}-{method}-{hashlib.sha1(settings.encode()).hexdigest()[:8]}"


def export_all(method_obj: pyattr.AttributionMethod, key: str, s: Setup, formats: list[str], cache: Path,
               log: Callable[[str], None]) -> dict[str, tuple[Path, float, bool]]:
    """Export ``method_obj`` once per format (trace once, write each format from that graph, as
    :func:`pyattr.export` does), cached under ``cache``. Returns {format: (path, seconds, cached)}."""
    from pyattr.exporting import build_metadata, checked_example_inputs, write_graph
    from pyattr.exporting.trace import trace_graph

    folder = cache / f"{_source_hash()}-{s.device.type}"
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, float, bool]] = {}
    todo = []
    for fmt in formats:
        path = folder / f"{key}{SUFFIX[fmt]}"
        info = path.with_suffix(path.suffix + ".json")
        if path.exists() and info.exists():
            out[fmt] = (path, json.loads(info.read_text())["seconds"], True)
        else:
            todo.append(fmt)
    if not todo:
        return out
    example = method_obj._check_input(s.x[:1])
    kind = s.kind
    inputs = checked_example_inputs(method_obj, example, kind) if kind is not None else None
    t0 = time.perf_counter()
    gm = trace_graph(method_obj, example, kind, inputs)
    trace_s = time.perf_counter() - t0
    if inputs is None:
        from pyattr.exporting.trace import example_inputs

        inputs = example_inputs(method_obj, example)
    meta = build_metadata(method_obj, example, kind=kind)
    for fmt in todo:
        path = folder / f"{key}{SUFFIX[fmt]}"
        tmp = path.with_name("." + path.name)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_graph(gm, fmt, inputs, tmp, meta)
        seconds = trace_s + time.perf_counter() - t0
        os.replace(tmp, path)
        path.with_suffix(path.suffix + ".json").write_text(json.dumps({"seconds": seconds}))
        out[fmt] = (path, seconds, False)
        log(f"    exported {fmt} in {seconds:.1f} s (trace {trace_s:.1f} s)")
    return out


def ort_session(path: Path, device: torch.device, threads: int, opt_level: str = "all"):
    """An onnxruntime session on the benchmark's device (CUDA provider on CUDA when available)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if device.type == "cpu" else 0
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[opt_level]
    options.log_severity_level = 3
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("this onnxruntime has no CUDAExecutionProvider "
                               f"(providers: {', '.join(ort.get_available_providers())})")
        providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def ort_runner(sess, s: Setup) -> Callable[[], object]:
    """One call of the graph. CPU: NumPy in and out. CUDA: I/O binding on the torch tensors already
    on the GPU, outputs left on the GPU (no host copy, as the torch backends)."""
    x, t = s.x.contiguous(), s.target.contiguous()
    names_in = [i.name for i in sess.get_inputs()]
    extra = dict(zip(names_in[2:], s.feeds))
    if s.device.type != "cuda":
        feeds = {"images": x.numpy(), "target": t.numpy(), **{k: v.numpy() for k, v in extra.items()}}
        return lambda: sess.run(None, feeds)
    import numpy as np

    index = s.device.index or 0
    names = [o.name for o in sess.get_outputs()]

    def run():
        binding = sess.io_binding()
        binding.bind_input("images", "cuda", index, np.float32, list(x.shape), x.data_ptr())
        binding.bind_input("target", "cuda", index, np.int64, list(t.shape), t.data_ptr())
        for key, v in extra.items():
            binding.bind_input(key, "cuda", index, np.float32, list(v.shape), v.data_ptr())
        for name in names:
            binding.bind_output(name, "cuda", index)
        sess.run_with_iobinding(binding)
        return binding
    return run


def pyattr_contenders(method: str, s: Setup, backends: list[str], cache: Path, threads: int,
                      log: Callable[[str], None]) -> tuple[list[Contender], dict[str, object]]:
    """pyattr's contenders for ``backends`` (eager, torchscript, pt2, onnx, compile), and notes
    (export and compile times, errors) for the results."""
    notes: dict[str, object] = {}
    method_obj = build_pyattr(method, s)
    x, t, feeds = s.x, s.target, s.feeds
    eager_target = t if s.eager_target is None else s.eager_target
    out = []
    if "eager" in backends:
        out.append(Contender("pyattr eager", "pyattr", "eager", "pyattr", lambda: method_obj(x, eager_target),
                             "e2e"))
    formats = [f for f in ("torchscript", "pt2", "onnx") if f in backends]
    if formats:
        key = export_key(method, method_obj, s)
        try:
            files = export_all(method_obj, key, s, formats, cache, log)
        except Exception as err:  # noqa: BLE001
            notes["export_error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
            log(f"    ! export: {notes['export_error']}")
            files = {}
        notes["export_s"] = {fmt: round(sec, 1) for fmt, (_, sec, _) in files.items()}
        if "torchscript" in files:
            ts = torch.jit.load(str(files["torchscript"][0]), map_location=s.device)
            out.append(Contender("pyattr TorchScript", "pyattr", "torchscript", "pyattr", lambda: ts(x, t, *feeds), "e2e"))
        if "pt2" in files:
            ep = torch.export.load(str(files["pt2"][0]))
            if s.device.type != "cpu":
                from torch.export.passes import move_to_device_pass

                ep = move_to_device_pass(ep, s.device)
            pt2 = ep.module()
            out.append(Contender("pyattr .pt2", "pyattr", "pt2", "pyattr", lambda: pt2(x, t, *feeds), "e2e"))
        if "onnx" in files:
            try:
                sess = ort_session(files["onnx"][0], s.device, threads)
                name = f"pyattr ONNX (onnxruntime {s.device.type.upper()})"
                out.append(Contender(name, "pyattr", f"onnxruntime-{s.device.type}", "pyattr", ort_runner(sess, s),
                                     "e2e"))
            except Exception as err:  # noqa: BLE001
                notes["onnx_error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                log(f"    ! onnxruntime: {notes['onnx_error']}")
    if "compile" in backends:
        from pyattr.exporting.trace import trace_graph

        try:
            gm = trace_graph(method_obj, method_obj._check_input(x[:1]), s.kind)
            compiled = torch.compile(gm, dynamic=False)
            t0 = time.perf_counter()
            compiled(x, t, *feeds)
            if s.device.type == "cuda":
                torch.cuda.synchronize()
            notes["compile_s"] = round(time.perf_counter() - t0, 1)
            log(f"    torch.compile: first call {notes['compile_s']} s")
            out.append(Contender("pyattr torch.compile", "pyattr", "compile", "pyattr", lambda: compiled(x, t, *feeds), "e2e"))
        except Exception as err:  # noqa: BLE001
            notes["compile_error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
            log(f"    ! torch.compile: {notes['compile_error']}")
    return out, notes


def reference_contenders(method: str, s: Setup) -> list[Contender]:
    return [Contender(f"bound: {bound_label(method, s)}", "reference", "eager", "bound", bound_fn(method, s)),
            Contender("forward only", "reference", "eager", "forward", forward_fn(s))]


# --- shared post-processing for the peers' "end to end" ------------------------------------------


def minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    lo, hi = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(maps)


def to_input_size(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) or (N, 1, h, w) -> (N, H, W), bilinear (no-op at the input size)."""
    if maps.dim() == 3:
        maps = maps[:, None]
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps[:, 0]


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
