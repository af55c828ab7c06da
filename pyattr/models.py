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


def find_default_layer(model: nn.Module, example: torch.Tensor) -> str | None:
    """The last module, in execution order, whose output is (N, C, h, w) with h*w > 1.

    Adaptive pooling layers are skipped: they resample the features for the head (VGG's
    ``avgpool`` turns 2x2 maps into 7x7 at 64x64 input) rather than compute new ones.
    The probe runs in eval mode on a per-call view of ``model`` (:mod:`pyattr._callview`): the model
    itself gets no hook and keeps its training flags, so other threads may use it meanwhile.
    TorchScript submodules (shared by the view, their hooks would be seen by other threads) are not
    candidates.
    """
    from ._callview import call_view, is_view

    last: list[str] = []
    handles = []
    with call_view(model) as view:
        for name, module in view.root.named_modules():
            if not name or not is_view(module) or isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                continue

            def hook(_m, _i, out, name=name):
                if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[2] * out.shape[3] > 1:
                    last.append(name)
            handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                view.root(example)
        finally:
            for h in handles:
                h.remove()
    return last[-1] if last else None


def _imagenet_categories(name: str) -> list[str] | None:
    try:
        from torchvision.models import get_model_weights

        weights = get_model_weights(name)
        return list(next(iter(weights)).meta["categories"])
    except (ValueError, KeyError, StopIteration, ImportError):
        return None


def load_torchvision(name: str, weights: str | None = None, device: str = "cpu") -> ModelBundle:
    """A torchvision classification model by name, with weights from a local state_dict file
    (nothing is downloaded; without a file the model is randomly initialized, with a warning)."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, available, n=4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise InputError(f"torchvision has no classification model {name!r}.{hint}")
    model = torchvision.models.get_model(name, weights=None)
    if weights is None:
        warnings.warn(f"torchvision:{name} has random weights (give torchvision:{name}:WEIGHTS.pth to load a "
                      "state_dict); its explanations show an untrained model", stacklevel=2)
    else:
        load_state_dict_file(model, weights)
    model = model.eval().to(device)
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


def load_builtin_bundle(device: str = "cpu") -> ModelBundle:
    from .zoo import SHAPE_CLASSES, SHAPESNET_LAYER, load_builtin

    try:
        model = load_builtin(device)
    except FileNotFoundError as err:
        raise InputError(str(err)) from err
    return ModelBundle(model, "builtin", (64, 64), class_names=list(SHAPE_CLASSES),
                       default_layer=SHAPESNET_LAYER, multilabel=True)


def check_image_model(bundle: ModelBundle, spec: str, size: int | None, device: str) -> None:
    """A model named on the command line must map (1, 3, H, W) images to (1, K) scores."""
    h, w = (size, size) if size is not None else bundle.input_size
    try:
        with torch.no_grad():
            out = bundle.model(torch.zeros(1, 3, h, w, device=device))
    except Exception as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[-1][:300] if lines else type(err).__name__
        raise InputError(f"{spec} is not an image classifier: it fails on a (1, 3, {h}, {w}) image ({detail})") from err
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[0] == 1):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"{spec} is not an image classifier: a (1, 3, {h}, {w}) image gives {shape}, "
                         "not (1, K) class scores")


def load_model(spec: str, device: str = "cpu", size: int | None = None) -> ModelBundle:
    """``builtin`` | ``torchvision:NAME[:WEIGHTS.pth]`` | ``FILE.pt`` (a TorchScript module)."""
    if spec == "builtin":
        bundle = load_builtin_bundle(device)
    elif spec.startswith("torchvision:"):
        parts = spec.split(":", 2)
        if len(parts) < 2 or not parts[1]:
            raise InputError("write torchvision models as torchvision:NAME or torchvision:NAME:WEIGHTS.pth")
        bundle = load_torchvision(parts[1], parts[2] if len(parts) == 3 else None, device)
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
        bundle = ModelBundle(model.eval(), str(path), (224, 224))
        check_image_model(bundle, spec, size, device)
    if size is not None:
        bundle.input_size = (size, size)
    return bundle
