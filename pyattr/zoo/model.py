"""ShapesNet: the small residual CNN that pyattr ships, trained on :mod:`pyattr.zoo.shapes`.

Layout (ResNet-like, sized for 64x64 inputs; spatial sizes at 64x64)::

    normalize (fixed mean/std buffers)                     (N, 3, 64, 64)
    stem:   conv3x3(3->24) + BN + ReLU + max-pool 2x2      (N, 24, 32, 32)
    layer1: BasicBlock(24->32)                             (N, 32, 32, 32)
    layer2: BasicBlock(32->64, stride 2)                   (N, 64, 16, 16)
    layer3: BasicBlock(64->128, stride 1) + fixed 3x3 blur  <- default CAM layer (N, 128, 16, 16)
    avgpool: global average pool (then flatten)            (N, 128, 1, 1)
    fc:     Linear(128->6)                                 (N, 6) logits

Every ReLU is out-of-place and the residual sum is a plain ``+`` so the graph is easy to trace and
export. The head is global-average-pool + one linear layer, so CAM (Zhou et al. 2016) applies.

Why the blur: without it, the class evidence of ``layer3`` peaked on the most telling local detail
-- the notch between two arms of a star, the inner corner of a cross -- which lies just outside the
object, so Grad-CAM's maximum missed the object's mask (pointing game 89.8%, stars 61%). A fixed
binomial low-pass (:class:`Blur2d`) at the end of ``layer3`` spreads each cell's evidence over its
neighbours (a global average pool of the blurred map equals that of the unblurred one, up to the
border), so the maximum moves onto the object's body. See the README's pointing-game section.

Example:
    >>> import torch
    >>> model = load_builtin()
    >>> images = torch.rand(2, 3, 64, 64)  # RGB in [0, 1]; no normalization needed
    >>> model(images).shape
    torch.Size([2, 6])
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pyattr.zoo.shapes import NUM_CLASSES

SHAPESNET_LAYER = "layer3"
"""Name of the default explanation layer (the last conv stage: 16x16 maps at 64x64 input; stride 1,
so that CAMs resolve objects 16-28 px across: at 8x8 Grad-CAM's pointing game was 75%)."""

WEIGHTS_PATH = Path(__file__).resolve().parent / "shapesnet.pt"
"""Where the shipped weights live (a plain ``state_dict`` written by :mod:`pyattr.zoo.train`)."""

# Per-channel mean/std of the training images, rounded (generate(2000, seed=0): mean 0.497, std 0.156).
_INPUT_MEAN = (0.5, 0.5, 0.5)
_INPUT_STD = (0.15, 0.15, 0.15)


class Blur2d(nn.Conv2d):
    """Fixed low-pass filter: the 3x3 binomial kernel [1, 2, 1]^T [1, 2, 1] / 16 on every channel.

    A depthwise ``nn.Conv2d`` (zero padding 1, no bias) whose weight is set here and never trained
    (``requires_grad=False``), as in anti-aliased CNNs (Zhang, "Making Convolutional Networks
    Shift-Invariant Again", ICML 2019) but without the subsampling. Being a plain convolution, every
    tool that knows ``nn.Conv2d`` (export, LRP rules, the reference libraries) handles it.

    Shapes: (N, channels, H, W) -> (N, channels, H, W).

    Example:
        >>> blur = Blur2d(1)
        >>> x = torch.zeros(1, 1, 3, 3); x[0, 0, 1, 1] = 16
        >>> blur(x)[0, 0].tolist()
        [[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.weight.requires_grad_(False)

    def reset_parameters(self) -> None:
        """(Re)set the binomial kernel. Draws no random numbers, so adding the blur leaves the random
        initialization of every other layer as it was; a model-randomization test that resets
        layers leaves this fixed filter as it is."""
        taps = torch.tensor([1.0, 2.0, 1.0])
        with torch.no_grad():
            self.weight.copy_((torch.outer(taps, taps) / 16).expand_as(self.weight))


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or 1x1 conv+BN) shortcut, as in torchvision's ResNet,
    optionally followed by a fixed :class:`Blur2d` (``blur=True``; ``blur`` is ``nn.Identity`` otherwise).

    ``dilation`` (default 1) dilates both 3x3 convolutions (padding = dilation keeps the size), as the
    segmentation model's :mod:`pyattr.zoo.segmodel` uses to see a whole object from each pixel.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride).
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, blur: bool = False, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
        )
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.downsample = nn.Identity()
        self.blur: nn.Module = Blur2d(out_channels) if blur else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.blur(self.relu2(out + self.downsample(x)))


class ShapesNet(nn.Module):
    """Multi-label classifier for the six shape classes.

    Args:
        num_classes: number of output logits (6 for :data:`pyattr.zoo.shapes.SHAPE_CLASSES`).
        widths: channels of (stem, layer1, layer2, layer3).

    Input: float (N, 3, H, W) RGB in [0, 1] (uint8 images divided by 255; normalization happens
    inside, from the fixed ``mean``/``std`` buffers). Output: logits (N, num_classes); apply
    ``sigmoid`` for per-class probabilities. ``layer3`` outputs (N, 128, H/4, W/4).

    Example:
        >>> import torch
        >>> model = ShapesNet().eval()
        >>> model(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 6])
    """

    def __init__(self, num_classes: int = NUM_CLASSES, widths: tuple[int, int, int, int] = (24, 32, 64, 128)):
        super().__init__()
        stem_width, width1, width2, width3 = widths
        self.register_buffer("mean", torch.tensor(_INPUT_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_INPUT_STD).view(1, 3, 1, 1))
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_width, 3, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=False),
            nn.MaxPool2d(2),
        )
        self.layer1 = BasicBlock(stem_width, width1)
        self.layer2 = BasicBlock(width1, width2, stride=2)
        self.layer3 = BasicBlock(width2, width3, stride=1, blur=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width3, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and not isinstance(module, Blur2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        for module in self.modules():  # zero-init the last BN of each block: blocks start as identity
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def load_builtin(device: str | torch.device = "cpu", weights: str | os.PathLike | None = None) -> ShapesNet:
    """Load the shipped ShapesNet weights, in eval mode, on ``device``.

    Args:
        device: where the model goes.
        weights: another ShapesNet ``state_dict`` file to load instead (``python -m pyattr.zoo.train
            --out FILE`` writes one), e.g. to score a retrained candidate.

    Raises:
        FileNotFoundError: when ``pyattr/zoo/shapesnet.pt`` (or ``weights``) is missing (train it with
            ``python -m pyattr.zoo.train``).

    Example:
        >>> model = load_builtin()
        >>> model.training
        False
    """
    path = WEIGHTS_PATH if weights is None else Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"ShapesNet weights not found at {path}; train them with `python -m pyattr.zoo.train`"
        )
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = ShapesNet()
    model.load_state_dict(state_dict)
    return model.to(device).eval()


def generalized_mean_pool(x: torch.Tensor, p: float = 3.0, eps: float = 1e-6) -> torch.Tensor:
    """GeM pooling (Radenović, Tolias and Chum, TPAMI 2018, arXiv:1711.02512), the pooling of image-retrieval
    embeddings: ``(mean_hw clamp(x, eps)^p)^(1/p)`` per channel, (N, C, h, w) -> (N, C). ``p = 1`` is average
    pooling, ``p -> inf`` max pooling. A function, not a layer: LRP passes its relevance by the gradient."""
    return x.clamp_min(eps).pow(p).mean((2, 3)).pow(1.0 / p)


class ShapesEmbedding(nn.Module):
    """The built-in classifier's pooled features as an embedding model: (N, 3, H, W) -> (N, 128).

    ``pool(layer3(layer2(layer1(stem(normalize(x))))))``: ShapesNet without its ``fc``, with
    ``pooling="gem"`` (default: GeM, p = 3, :func:`generalized_mean_pool`) or ``"avg"`` (the classifier's own
    average pooling: exactly the features its ``fc`` reads). GeM is the retrieval default because average
    pooling lets the background texture dominate the cosine similarity: Grad-CAM's similarity pointing game
    (``benchmarks/targets_pointing_game.py``, 300 pairs of seed 40,000) is 82.7% with average pooling, 93.7%
    with GeM (max pooling: 94.0%).
    The submodules are the wrapped :class:`ShapesNet`'s own (the same objects, not copies, under the
    same names ``stem``, ``layer1``, ``layer2``, ``layer3``, ``avgpool``), so :data:`SHAPESNET_LAYER`
    names the CAM layer here too and no weight is duplicated; building the embedding changes nothing
    in the classifier (moving or re-moding the embedding with ``.to()``/``.train()`` does move or
    re-mode the shared submodules, as with any shared module).

    Args:
        classifier: the ShapesNet whose features to use (e.g. :func:`load_builtin`).
        pooling: ``"gem"`` or ``"avg"``.

    Example:
        >>> import torch
        >>> embed = ShapesEmbedding(ShapesNet().eval())
        >>> embed(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 128])
    """

    def __init__(self, classifier: ShapesNet, pooling: str = "gem") -> None:
        super().__init__()
        if pooling not in ("gem", "avg"):
            raise ValueError(f"pooling must be 'gem' or 'avg', got {pooling!r}")
        self.register_buffer("mean", classifier.mean.detach().clone())
        self.register_buffer("std", classifier.std.detach().clone())
        self.stem = classifier.stem
        self.layer1 = classifier.layer1
        self.layer2 = classifier.layer2
        self.layer3 = classifier.layer3
        if pooling == "avg":
            self.avgpool = classifier.avgpool
        self.pooling = pooling
        self.train(classifier.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        if self.pooling == "gem":
            return generalized_mean_pool(x)
        return torch.flatten(self.avgpool(x), 1)


def load_builtin_embedding(device: str | torch.device = "cpu", pooling: str = "gem") -> ShapesEmbedding:
    """The shipped ShapesNet's pooled features (:class:`ShapesEmbedding`, GeM-pooled unless ``pooling="avg"``),
    in eval mode, on ``device``.

    Raises:
        FileNotFoundError: when ``pyattr/zoo/shapesnet.pt`` is missing (see :func:`load_builtin`).

    Example:
        >>> embed = load_builtin_embedding()
        >>> embed(torch.rand(1, 3, 64, 64)).shape
        torch.Size([1, 128])
    """
    return ShapesEmbedding(load_builtin(device), pooling).eval()
