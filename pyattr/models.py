"""Models named on the command line: the built-in model, torchvision models, TorchScript files.

A :class:`ModelBundle` carries what an explanation needs besides the module: input size,
normalization, class names and a default layer for CAM methods.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelBundle:
    """A model with its preprocessing and labels.

    Attributes:
        model: the module, in eval mode.
        name: how it was named (``builtin``, ``torchvision:resnet18``, a file).
        input_size: (H, W) images are resized to.
        mean, std: per-channel normalization applied to RGB in [0, 1].
        class_names: one name per output, or None.
        default_layer: the layer CAM methods use when none is named, or None.
        multilabel: scores are per-class sigmoids (True) or a softmax (False).
        task: what the model outputs: ``classification`` (N, K) scores, ``segmentation`` per-pixel scores
            (N, K, H, W) (or torchvision's dict), ``similarity`` an embedding (N, D).
    """

    model: nn.Module
    name: str
    input_size: tuple[int, int]
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    class_names: list[str] | None = None
    default_layer: str | None = None
    multilabel: bool = False
    extra: dict = field(default_factory=dict)
    task: str = "classification"

    def preprocessing(self) -> dict:
        """The preprocessing as stored in exported files' metadata."""
        return {"color": "RGB", "scale": 1 / 255, "mean": list(self.mean), "std": list(self.std),
                "size": list(self.input_size), "resize": "bilinear", "layout": "NCHW"}

    def normalize(self, images01: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) RGB in [0, 1] -> model input."""
        mean = torch.tensor(self.mean, dtype=images01.dtype, device=images01.device)[:, None, None]
        std = torch.tensor(self.std, dtype=images01.dtype, device=images01.device)[:, None, None]
        return (images01 - mean) / std

    def probabilities(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(scores) if self.multilabel else torch.softmax(scores, 1)

    def class_name(self, k: int) -> str:
        if self.class_names is not None and 0 <= k < len(self.class_names):
            return self.class_names[k]
        return f"class {k}"


# modules whose output is their input (or a resampling of it for the head): never the layer to explain
_PASS_THROUGH = (nn.Identity, nn.Dropout, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _layer_outputs(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, module, output shape) of every submodule with a tensor output, in the order they returned.

    The probe runs in eval mode on a per-call view of ``model`` (:mod:`pyattr._callview`): the model
    itself gets no hook and keeps its training flags, so other threads may use it meanwhile.
    TorchScript submodules (shared by the view, their hooks would be seen by other threads) are not
    candidates."""
    from ._callview import call_view, is_view

    seen: list[tuple[str, nn.Module, tuple[int, ...]]] = []
    handles = []
    with call_view(model) as view:
        for name, module in view.root.named_modules():
            if not name or not is_view(module) or isinstance(module, _PASS_THROUGH):
                continue

            def hook(m, _i, out, name=name):
                if isinstance(out, torch.Tensor):
                    seen.append((name, m, tuple(out.shape)))
            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                view.root(example)
        finally:
            for h in handles:
                h.remove()
    return seen


def _channels_last(module: nn.Module, shape: tuple[int, ...]) -> bool:
    """A 4-d output laid out (N, h, w, C): a plain LayerNorm normalizes the last dim (Swin's blocks, the
    NHWC stretch of a ConvNeXt block). LayerNorm2d variants permute to NCHW themselves."""
    return len(shape) == 4 and type(module) is nn.LayerNorm


def default_layer_choice(model: nn.Module, example: torch.Tensor) -> tuple[str | None, str | None]:
    """(layer, why not): the last module, in execution order, whose output is an (N, C, h, w) map with
    h*w > 1, or (None, a hint naming what to use instead) when there is no such map or when the model
    goes on in tokens (N, T, D) or channels-last (N, h, w, C) after it (a transformer: its last
    (N, C, h, w) output is the patch embedding or a layer inside attention, meaningless to explain).

    Identity/Dropout layers and adaptive pooling are skipped (VGG's ``avgpool`` turns 2x2 maps into 7x7
    at 64x64 input: a resampling for the head, not new features)."""
    outputs = _layer_outputs(model, example)
    spatial = [i for i, (_, m, shape) in enumerate(outputs)
               if len(shape) == 4 and shape[2] * shape[3] > 1 and not _channels_last(m, shape)]
    if not spatial:
        return None, None
    last = spatial[-1]
    after = outputs[last + 1:]
    tokens = [(n, m, shape) for n, m, shape in after if len(shape) == 3 and shape[1] > 1]
    nhwc = [(n, m, shape) for n, m, shape in after if _channels_last(m, shape)]
    if not tokens and not nhwc:
        return outputs[last][0], None
    name, _, shape = outputs[last]
    if nhwc:
        layer, _, nhwc_shape = nhwc[-1]
        return None, (f"the model works channels-last (Swin-style stages): layer {layer!r} outputs (N, h, w, C) = "
                      f"{nhwc_shape}, and a 4-d output before it such as {name!r} need not be (N, C, h, w). Name "
                      f"the layer and pass reshape_transform=lambda t: t.permute(0, 3, 1, 2), e.g. layer={layer!r}")
    grid = shape[2] * shape[3]
    norms = [n for n, m, s in tokens if isinstance(m, nn.LayerNorm) and s[1] >= grid]
    block_norms = [n for n in norms if n.rsplit(".", 1)[-1] in ("ln_1", "norm1")]
    suggestion = (block_norms or norms or [tokens[-1][0]])[-1]
    count = next(s[1] for n, m, s in tokens if n == suggestion)
    prefix = count - grid
    if prefix >= 0:
        transform = f"TokensToGrid(prefix_tokens={prefix})"
        example_call = f"e.g. layer={suggestion!r}, reshape_transform={transform}"
    else:
        transform = "TokensToGrid(prefix_tokens=P, grid=(h, w))"
        example_call = f"e.g. layer={suggestion!r} with its token grid"
    return None, (f"the model goes on in tokens after its last (N, C, h, w) layer {name!r} (the patch embedding "
                  f"or a layer inside attention): layer {tokens[-1][0]!r} outputs (N, T, D) = {tokens[-1][2]}. Name "
                  f"a token layer and pass reshape_transform={transform}, {example_call}")


def find_default_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The last module, in execution order, whose output is (N, C, h, w) with h*w > 1; None when there
    is none or the model is a transformer (see :func:`default_layer_choice`, which also says why)."""
    return default_layer_choice(model, example)[0]


def _imagenet_categories(name: str) -> list[str] | None:
    try:
        from torchvision.models import get_model_weights

        weights = get_model_weights(name)
        return list(next(iter(weights)).meta["categories"])
    except (ValueError, KeyError, StopIteration, ImportError):
        return None


def _torchvision_model(name: str, weights: str | None, device: str, module, kind: str, **options) -> nn.Module:
    """torchvision's model ``name`` from ``module`` (its ``kind`` of models), random (with a warning) or loaded
    from a local state_dict file, in eval mode on ``device``; an unknown name names close ones."""
    import torchvision

    available = torchvision.models.list_models(module=module)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=4)
        hint = f" Did you mean {', '.join(close)}?" if close else f" Available: {', '.join(available)}"
        raise InputError(f"torchvision has no {kind} model {name!r}.{hint}")
    model = torchvision.models.get_model(name, weights=None, **options)
    if weights is None:
        warnings.warn(f"torchvision:{name} has random weights (give torchvision:{name}:WEIGHTS.pth to load a "
                      "state_dict); its explanations show an untrained model", stacklevel=3)
    else:
        load_state_dict_file(model, weights)
    return model.eval().to(device)


def load_torchvision(name: str, weights: str | None = None, device: str = "cpu") -> ModelBundle:
    """A torchvision classification model by name, with weights from a local state_dict file
    (nothing is downloaded; without a file the model is randomly initialized, with a warning)."""
    import torchvision

    model = _torchvision_model(name, weights, device, torchvision.models, "classification")
    size = (224, 224)
    n_out = _num_outputs(model, size, device)
    categories = _imagenet_categories(name) if n_out == 1000 else None
    layer = find_default_layer(model, torch.zeros(1, 3, *size, device=device))
    return ModelBundle(model, f"torchvision:{name}", size, IMAGENET_MEAN, IMAGENET_STD, categories, layer)


def _num_outputs(model: nn.Module, size, device) -> int:
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, *size, device=device)).shape[1])


def load_state_dict_file(model: nn.Module, path: str) -> None:
    """Load a state_dict file into ``model``, with a clear error when it does not fit."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"weights file not found: {path}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"{path} is not a PyTorch state_dict file ({type(err).__name__})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path} does not hold a state_dict (a dict of tensors)")
    problems = weights_mismatch(model, state)
    if problems:
        raise InputError(f"the weights in {path} do not fit the model: {problems}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # anything weights_mismatch did not foresee
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise InputError(f"the weights in {path} do not fit the model: {'; '.join(lines[1:4]) or lines[0]}") from err


def weights_mismatch(model: nn.Module, state: dict) -> str:
    """A summary of how ``state`` fails to fit ``model`` ("" when it fits): counts and the first few
    missing keys, unexpected keys and shape mismatches, each name whole."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})" for k in expected
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    for one, many, names in (("missing key", "missing keys", missing), ("unexpected key", "unexpected keys", unexpected),
                             ("shape mismatch", "shape mismatches", shapes)):
        if names:
            shown = ", ".join(names[:3]) + (f", ... ({len(names) - 3} more)" if len(names) > 3 else "")
            parts.append(f"{len(names)} {one if len(names) == 1 else many}: {shown}")
    if not parts:
        return ""
    hint = ""
    if unexpected and all(k.startswith("module.") for k in unexpected):
        hint = " (the keys start with 'module.': saved from DataParallel; strip that prefix)"
    return "; ".join(parts) + hint + f". The model has {len(expected)} entries, the file {len(state)}."


TASKS = ("classification", "segmentation", "similarity", "detection")
"""What a model named on the command line does (``--task``)."""

_TASK_OUTPUT = {"classification": "(1, K) class scores", "segmentation": "(1, K, H, W) per-pixel class scores",
                "similarity": "a (1, D) embedding", "detection": "candidate boxes and class scores"}


def load_builtin_bundle(device: str = "cpu", task: str = "classification") -> ModelBundle:
    """The built-in model of ``task``: the shapes classifier, the shapes segmenter (background + 6 shapes),
    the classifier's pooled features as an embedding model, or the shapes detector (``extra``: its
    ``decode`` (candidates for :class:`~pyattr.targets.DetectionTarget`) and ``detect`` (boxes after NMS))."""
    from . import zoo

    try:
        if task == "segmentation":
            return ModelBundle(zoo.load_builtin_segmenter(device), "builtin", (64, 64),
                               class_names=list(zoo.SEG_CLASSES), default_layer=zoo.SHAPESSEG_LAYER, task=task)
        if task == "similarity":
            return ModelBundle(zoo.load_builtin_embedding(device), "builtin", (64, 64),
                               default_layer=zoo.SHAPESNET_LAYER, task=task)
        if task == "detection":
            return ModelBundle(zoo.load_builtin_detector(device), "builtin", (64, 64),
                               class_names=list(zoo.DET_CLASSES), default_layer=zoo.DETMODEL_LAYER,
                               multilabel=True, task=task,
                               extra={"decode": zoo.decode_detections, "detect": zoo.detect})
        model = zoo.load_builtin(device)
    except FileNotFoundError as err:
        raise InputError(str(err)) from err
    return ModelBundle(model, "builtin", (64, 64), class_names=list(zoo.SHAPE_CLASSES),
                       default_layer=zoo.SHAPESNET_LAYER, multilabel=True)


def _task_output_ok(out, task: str) -> bool:
    if task == "segmentation" and isinstance(out, dict) and "out" in out:
        out = out["out"]
    if not isinstance(out, torch.Tensor) or out.shape[0] != 1:
        return False
    return out.dim() == (4 if task == "segmentation" else 2)


def check_image_model(bundle: ModelBundle, spec: str, size: int | None, device: str) -> None:
    """A model named on the command line must map (1, 3, H, W) images to what its task explains: (1, K)
    scores, (1, K, H, W) per-pixel scores, or a (1, D) embedding."""
    h, w = (size, size) if size is not None else bundle.input_size
    what = {"classification": "an image classifier", "segmentation": "a segmentation model",
            "similarity": "an embedding model"}[bundle.task]
    try:
        with torch.no_grad():
            out = bundle.model(torch.zeros(1, 3, h, w, device=device))
    except Exception as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[-1][:300] if lines else type(err).__name__
        raise InputError(f"{spec} is not {what}: it fails on a (1, 3, {h}, {w}) image ({detail})") from err
    if not _task_output_ok(out, bundle.task):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        hint = ""
        for other in TASKS:
            if other != bundle.task and _task_output_ok(out, other):
                hint = f"; for a model that outputs {_TASK_OUTPUT[other]} use --task {other}"
                break
        raise InputError(f"{spec} is not {what}: a (1, 3, {h}, {w}) image gives {shape}, not "
                         f"{_TASK_OUTPUT[bundle.task]}{hint}")


def load_torchvision_segmentation(name: str, weights: str | None = None, device: str = "cpu") -> ModelBundle:
    """A torchvision segmentation model (``torchvision.models.segmentation``) by name, random or from a local
    state_dict file; its output dict's ``"out"`` holds the per-pixel scores."""
    import torchvision

    model = _torchvision_model(name, weights, device, torchvision.models.segmentation, "segmentation",
                               weights_backbone=None)
    size = (224, 224)
    categories = _imagenet_categories(name)
    layer = segmentation_layer(model, torch.zeros(1, 3, *size, device=device))
    return ModelBundle(model, f"torchvision:{name}", size, IMAGENET_MEAN, IMAGENET_STD, categories, layer,
                       task="segmentation")


def segmentation_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The default CAM layer of a segmenter: the last module, in execution order, whose output is an
    (N, C, h, w) map with h*w > 1 and C other than the number of classes K (the layers that output the
    per-pixel class scores themselves are the head's last, not features)."""
    from .targets.segmentation import segmentation_logits

    with torch.no_grad():
        k = int(segmentation_logits(model(example)).shape[1])
    maps = [name for name, _, shape in _layer_outputs(model, example)
            if len(shape) == 4 and shape[2] * shape[3] > 1 and shape[1] != k]
    return maps[-1] if maps else None


def load_model(spec: str, device: str = "cpu", size: int | None = None, task: str = "classification") -> ModelBundle:
    """``builtin`` | ``torchvision:NAME[:WEIGHTS.pth]`` | ``FILE.pt`` (a TorchScript module), for ``task``
    (:data:`TASKS`): a classifier, a segmenter (torchvision's segmentation models by name) or an embedding
    model (a torchvision classifier's output serves as its embedding)."""
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    if task == "detection" and spec != "builtin":
        raise InputError("--task detection runs the built-in detector on the command line; explain other detectors "
                         "from Python with pyattr.targets.DetectionTarget (docs/detection.md: torchvision's RetinaNet, "
                         "FCOS and SSD through pyattr.detection.DenseCandidates, any detector through a decode function)")
    if spec == "builtin":
        bundle = load_builtin_bundle(device, task)
    elif spec.startswith("torchvision:"):
        parts = spec.split(":", 2)
        if len(parts) < 2 or not parts[1]:
            raise InputError("write torchvision models as torchvision:NAME or torchvision:NAME:WEIGHTS.pth")
        weights = parts[2] if len(parts) == 3 else None
        if task == "segmentation":
            bundle = load_torchvision_segmentation(parts[1], weights, device)
        else:
            bundle = load_torchvision(parts[1], weights, device)
            if task == "similarity":
                bundle.task, bundle.class_names = task, None
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(
                f"unknown model {spec!r}: use 'builtin', 'torchvision:NAME[:WEIGHTS.pth]' or a TorchScript .pt file"
            )
        try:
            model = torch.jit.load(str(path), map_location=device)
        except Exception as err:
            raise InputError(f"{spec} is not a TorchScript model file (save one with torch.jit.save)") from err
        bundle = ModelBundle(model.eval(), str(path), (224, 224), task=task)
        check_image_model(bundle, spec, size, device)
    if size is not None:
        bundle.input_size = (size, size)
    return bundle
