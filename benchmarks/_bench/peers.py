"""The same work done by captum, pytorch-grad-cam, torchcam and zennit, each used as its docs show.

For every peer and method there is a *raw* contender (the library's call, returning what the
library returns: captum's (N, C, H, W) gradients or (N, 1, h, w) layer maps, torchcam's
normalized layer-resolution maps, zennit's relevance, pytorch-grad-cam's normalized input-size
NumPy maps) and, unless the library already returns normalized maps at the input's size
(pytorch-grad-cam), a *post* contender: the minimal torch post-processing on the device that
turns that raw output into pyattr's ``maps`` (channel reduction as pyattr's, bilinear resize to the
input size, per-sample min-max), timed on the cached raw output. "End to end" = raw + post.

Settings as in :mod:`_bench.cases` (targets given explicitly, same steps / samples / batching).

Task models (segmentation, similarity; :data:`_bench.cases.TASK_MODELS`): captum on a wrapped forward
(the model followed by the hand-written objective, :attr:`Setup.objective`), pytorch-grad-cam and
torchcam with per-sample target callables: pytorch-grad-cam's ``SemanticSegmentationTarget`` and the
``SimilarityToConceptTarget`` of its tutorial "Pixel Attribution for embeddings" (the package does not
ship it; defined here as there), on the segmenter's ``"out"`` tensor (:class:`_bench.cases.OutOnly`).
"""

from __future__ import annotations

import copy
import os
import types
from collections.abc import Callable

import torch
from torch import nn

from .cases import (
    ABLATION_CHUNK,
    CAM_SAMPLES,
    IG_STEPS,
    PERTURBATIONS,
    SG_NOISE,
    SG_SAMPLES,
    SMOOTH_CAMPP_SAMPLES,
    Setup,
    channels_per_pass,
    minmax,
    points_per_pass,
    to_input_size,
)
from .timing import Contender

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Score-CAM draws progress bars

PEER_LIBRARIES = ("captum", "pytorch-grad-cam", "torchcam", "zennit")


class _Last:
    """Holds the last raw output of a peer, for its post-processing contender."""

    value = None


def _pair(name: str, library: str, raw: Callable[[], object], post: Callable[[object], torch.Tensor] | None,
          after: Callable[[], object] | None = None) -> list[Contender]:
    last = _Last()

    def run():
        last.value = raw()
        return last.value

    if post is None:  # already normalized maps at the input size
        return [Contender(name, library, "eager", "peer", run, "e2e", after=after)]
    return [Contender(name, library, "eager", "peer", run, "raw", after=after),
            Contender(f"{name} + post", library, "eager", "post", lambda: post(last.value), "e2e", of=name)]


def _free_grads(model: torch.nn.Module) -> Callable[[], None]:
    return lambda: model.zero_grad(set_to_none=True)


class SimilarityToConceptTarget:
    """pytorch-grad-cam's target for embeddings, as its tutorial defines it: cos(embedding, concept)."""

    def __init__(self, features: torch.Tensor):
        self.features = features

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        cos = torch.nn.CosineSimilarity(dim=0)
        return cos(model_output, self.features)


def task_targets(s: Setup) -> list:
    """Per-sample target callables (pytorch-grad-cam's, also taken by torchcam) for a task model."""
    if s.task == "segmentation":
        from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

        region = s.feeds[0].cpu().numpy()
        return [SemanticSegmentationTarget(int(c), region[n]) for n, c in enumerate(s.target.tolist())]
    return [SimilarityToConceptTarget(r) for r in s.feeds[0]]


def captum_task(method: str, s: Setup) -> list[Contender]:
    import captum.attr as ca

    model, x, objective = s.model, s.x, s.objective
    size = tuple(x.shape[-2:])

    def wrapped(inp):
        return objective(model(inp))

    if method == "saliency":
        sal = ca.Saliency(wrapped)
        return _pair("captum Saliency (wrapped forward)", "captum", lambda: sal.attribute(x, abs=True),
                     lambda a: minmax(a.amax(1)), after=_free_grads(model))
    if method == "gradcam":
        gc = ca.LayerGradCam(wrapped, s.layer)
        return _pair("captum LayerGradCam (wrapped forward)", "captum",
                     lambda: gc.attribute(x, relu_attributions=True),
                     lambda a: minmax(to_input_size(a, size)), after=_free_grads(model))
    return []


def pytorch_grad_cam_task(method: str, s: Setup) -> list[Contender]:
    import pytorch_grad_cam as pgc

    if method != "gradcam":
        return []
    model, x = s.peer_model, s.x
    targets = task_targets(s)

    def run():
        with pgc.GradCAM(model=model, target_layers=[s.layer]) as cam:
            return cam(input_tensor=x, targets=targets)

    label = "SemanticSegmentationTarget" if s.task == "segmentation" else "SimilarityToConceptTarget"
    return _pair(f"pytorch-grad-cam GradCAM ({label})", "pytorch-grad-cam", run, None, after=_free_grads(model))


def torchcam_task(method: str, s: Setup) -> list[Contender]:
    import torchcam.methods as tcm

    if method != "gradcam":
        return []
    model, x = s.peer_model, s.x
    size = tuple(x.shape[-2:])
    targets = task_targets(s)

    def run():
        with tcm.GradCAM(model, s.layer, input_shape=tuple(x.shape[1:])) as extractor:
            return extractor(scores=model(x), targets=targets)

    return _pair("torchcam GradCAM (targets)", "torchcam", run, lambda cams: minmax(to_input_size(cams[0], size)),
                 after=_free_grads(model))


# --- captum -------------------------------------------------------------------------------------


def one_relu_per_use(model: nn.Module) -> nn.Module:
    """A copy of a torchvision resnet whose blocks call one ReLU module per use (captum's DeepLift needs it);
    other models are copied as they are."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    def basic(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu_out(self.bn2(self.conv2(out)) + identity)

    def bottleneck(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu_mid(self.bn2(self.conv2(out)))
        return self.relu_out(self.bn3(self.conv3(out)) + identity)

    copied = copy.deepcopy(model)
    for block in copied.modules():
        if isinstance(block, (BasicBlock, Bottleneck)):
            block.relu_out = nn.ReLU(inplace=True)
            block.relu_mid = nn.ReLU(inplace=True)
            block.forward = types.MethodType(bottleneck if isinstance(block, Bottleneck) else basic, block)
    return copied


def captum(method: str, s: Setup) -> list[Contender]:
    if s.task != "class":
        return captum_task(method, s)
    import captum.attr as ca

    model, x, t = s.model, s.x, s.target
    size = tuple(x.shape[-2:])
    if method == "saliency":
        sal = ca.Saliency(model)
        return _pair("captum Saliency", "captum", lambda: sal.attribute(x, target=t, abs=True),
                     lambda a: minmax(a.amax(1)))
    if method == "integratedgradients":
        ig = ca.IntegratedGradients(model)
        batch = len(x) * points_per_pass(len(x))
        return _pair("captum IntegratedGradients", "captum",
                     lambda: ig.attribute(x, target=t, n_steps=IG_STEPS, method="gausslegendre",
                                          internal_batch_size=batch),
                     lambda a: minmax(a.sum(1)))
    if method == "smoothgrad":
        nt = ca.NoiseTunnel(ca.Saliency(model))
        stdev = float(SG_NOISE * (x.max() - x.min()))
        return _pair("captum NoiseTunnel(Saliency)", "captum",
                     lambda: nt.attribute(x, nt_type="smoothgrad", nt_samples=SG_SAMPLES,
                                          nt_samples_batch_size=points_per_pass(len(x)), stdevs=stdev, target=t,
                                          abs=True),
                     lambda a: minmax(a.amax(1)))
    if method == "gradcam" and s.reshape is None:
        gc = ca.LayerGradCam(model, s.layer)
        return _pair("captum LayerGradCam", "captum", lambda: gc.attribute(x, target=t, relu_attributions=True),
                     lambda a: minmax(to_input_size(a, size)))
    if method in ("deeplift", "deepliftshap"):
        from .cases import shap_baselines

        oracle = one_relu_per_use(model)  # captum refuses a ReLU module used twice (torchvision's blocks)
        if method == "deeplift":
            dl = ca.DeepLift(oracle)
            run = lambda: dl.attribute(x, baselines=torch.zeros_like(x), target=t)
        else:
            dls, refs = ca.DeepLiftShap(oracle), shap_baselines(x)
            run = lambda: dls.attribute(x, baselines=refs, target=t)
        return _pair(f"captum {'DeepLift' if method == 'deeplift' else 'DeepLiftShap'}", "captum", run,
                     lambda a: minmax(a.sum(1)))
    if method == "gradientshap":
        from .cases import SG_SAMPLES, shap_baselines

        gs, refs = ca.GradientShap(model), shap_baselines(x)
        return _pair("captum GradientShap", "captum", lambda: gs.attribute(x, refs, n_samples=SG_SAMPLES, target=t),
                     lambda a: minmax(a.sum(1)))
    if method == "lrp":
        lrp = ca.LRP(model)
        return _pair("captum LRP", "captum", lambda: lrp.attribute(x, target=t), lambda a: minmax(a.sum(1)))
    if method in ("occlusion", "featureablation"):
        side, per_pass = x.shape[-1] // 4, points_per_pass(len(x))
        assert (x.shape[-1] // side) * (x.shape[-2] // side) == PERTURBATIONS
        if method == "occlusion":
            occ = ca.Occlusion(model)
            return _pair("captum Occlusion", "captum",
                         lambda: occ.attribute(x, sliding_window_shapes=(x.shape[1], side, side),
                                               strides=(1, side, side), baselines=0.0, target=t,
                                               perturbations_per_eval=per_pass),
                         lambda a: minmax(a.mean(1)))
        rows = torch.arange(x.shape[-2], device=x.device) // side
        grid = rows[:, None] * (x.shape[-1] // side) + torch.arange(x.shape[-1], device=x.device)[None] // side
        fa = ca.FeatureAblation(model)
        return _pair("captum FeatureAblation", "captum",
                     lambda: fa.attribute(x, feature_mask=grid[None, None], baselines=0.0, target=t,
                                          perturbations_per_eval=per_pass),
                     lambda a: minmax(a.mean(1)))
    return []


# --- pytorch-grad-cam ----------------------------------------------------------------------------


def pytorch_grad_cam(method: str, s: Setup) -> list[Contender]:
    if s.task != "class":
        return pytorch_grad_cam_task(method, s)
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = {"gradcam": pgc.GradCAM, "gradcampp": pgc.GradCAMPlusPlus, "scorecam": pgc.ScoreCAM,
               "fullgrad": pgc.FullGrad, "ablationcam": pgc.AblationCAM, "eigencam": pgc.EigenCAM,
               "eigengradcam": pgc.EigenGradCAM}
    if method not in classes:
        return []
    cls = classes[method]
    model, x = s.model, s.x
    targets = [ClassifierOutputTarget(int(c)) for c in s.target.tolist()]
    layers = [] if method == "fullgrad" else [s.layer]

    def run():
        with cls(model=model, target_layers=layers, reshape_transform=s.reshape) as cam:
            if method == "scorecam":
                cam.batch_size = channels_per_pass(len(x))
            if method == "ablationcam":  # its copies run through the whole model, one input at a time
                cam.batch_size = ABLATION_CHUNK
            return cam(input_tensor=x, targets=targets)

    return _pair(f"pytorch-grad-cam {cls.__name__}", "pytorch-grad-cam", run, None, after=_free_grads(model))


# --- torchcam ------------------------------------------------------------------------------------


def torchcam(method: str, s: Setup) -> list[Contender]:
    if s.task != "class":
        return torchcam_task(method, s)
    import torchcam.methods as tcm

    classes = {"gradcam": tcm.GradCAM, "gradcampp": tcm.GradCAMpp, "scorecam": tcm.ScoreCAM, "sscam": tcm.SSCAM,
               "iscam": tcm.ISCAM, "smoothgradcampp": tcm.SmoothGradCAMpp}
    if method not in classes:
        return []
    cls = classes[method]
    model, x = s.model, s.x
    size = tuple(x.shape[-2:])
    class_idx = [int(c) for c in s.target.tolist()]
    options = {"reshape_transform": s.reshape} if s.reshape is not None else {}
    if method in ("scorecam", "sscam", "iscam"):
        options["batch_size"] = len(x) * channels_per_pass(len(x))
    if method in ("sscam", "iscam"):
        options["num_samples"] = CAM_SAMPLES
    if method == "smoothgradcampp":
        options["num_samples"] = SMOOTH_CAMPP_SAMPLES

    def run():
        with cls(model, s.layer_name, input_shape=tuple(x.shape[1:]), **options) as extractor:
            if method in ("scorecam", "sscam", "iscam"):
                with torch.no_grad():
                    model(x)
                return extractor(class_idx=class_idx)
            scores = model(x)
            return extractor(class_idx=class_idx, scores=scores)

    return _pair(f"torchcam {cls.__name__}", "torchcam", run, lambda cams: minmax(to_input_size(cams[0], size)))


# --- zennit --------------------------------------------------------------------------------------


def zennit(method: str, s: Setup) -> list[Contender]:
    if s.task != "class":  # its attributors take a one-hot output gradient of a classifier
        return []
    import zennit.attribution as za

    model, x, t = s.model, s.x, s.target
    with torch.no_grad():
        classes = model(x[:1]).shape[1]
    one_hot = torch.eye(classes, device=x.device)[t]
    if method == "saliency":
        attributor, reduce, name = za.Gradient(model=model), lambda r: r.abs().amax(1), "Gradient"
    elif method == "integratedgradients":
        attributor = za.IntegratedGradients(model=model, n_iter=IG_STEPS)
        reduce, name = (lambda r: r.sum(1)), "IntegratedGradients"
    elif method == "smoothgrad":
        attributor = za.SmoothGrad(model=model, noise_level=SG_NOISE, n_iter=SG_SAMPLES)
        reduce, name = (lambda r: r.abs().amax(1)), "SmoothGrad"
    elif method == "lrp":
        from zennit.composites import EpsilonPlus
        from zennit.torchvision import ResNetCanonizer, VGGCanonizer

        canonizers = [ResNetCanonizer()] if s.name.startswith("resnet") else (
            [VGGCanonizer()] if s.name.startswith("vgg") else [])
        attributor = za.Gradient(model=model, composite=EpsilonPlus(canonizers=canonizers))
        reduce, name = (lambda r: r.sum(1)), "EpsilonPlus"
    else:
        return []

    def run():
        with attributor:
            return attributor(x, one_hot)[1]

    return _pair(f"zennit {name}", "zennit", run, lambda r: minmax(reduce(r)))


PEERS: dict[str, Callable[[str, Setup], list[Contender]]] = {
    "captum": captum, "pytorch-grad-cam": pytorch_grad_cam, "torchcam": torchcam, "zennit": zennit,
}


def peer_contenders(method: str, s: Setup, libraries: list[str], log: Callable[[str], None]) -> list[Contender]:
    out = []
    for library in libraries:
        try:
            out += PEERS[library](method, s)
        except Exception as err:  # noqa: BLE001 -- a peer that cannot be set up is reported and skipped
            log(f"    ! {library}: {type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
    return out
