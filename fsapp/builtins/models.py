"""Built-in models: ``wrn``, ``preact-resnet18``, ``small-cnn`` and ``mlp``.

Every model takes images in [0, 1] shaped [B, channels, size, size], normalises them inside as
``(x - mean) / std`` (``mean`` and ``std`` are non-persistent buffers, so a ``state_dict`` holds
only learned weights and BatchNorm statistics) and returns logits [B, num_classes].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fsapp.hookspecs import Register, hookimpl
from fsapp.registry import ModelParams, ranged

__all__ = [
    "BuiltinModelParams",
    "MLP",
    "MLPParams",
    "Normalized",
    "PreActResNet18",
    "PreActResNet18Params",
    "SmallCNN",
    "SmallCNNParams",
    "WideResNet",
    "WRNParams",
    "check_model_params",
    "parameter_count",
]

MAX_CLASSES = 100_000
"""Class counts up to ImageNet-21k and beyond; 10**12 classes is not a dataset."""
MAX_CHANNELS = 64
MAX_SIZE = 1024
"""Image side in pixels: ImageNet's 224 and more, not a terapixel."""


@dataclass
class BuiltinModelParams(ModelParams):
    """The shared fields with the valid ranges of the built-in models."""

    num_classes: int = ranged(10, 1, MAX_CLASSES)
    channels: int = ranged(3, 1, MAX_CHANNELS)
    size: int = ranged(32, 1, MAX_SIZE)


def check_model_params(p: ModelParams) -> None:
    """Validate the fields every model shares; ValueError with one line if wrong."""
    p.mean = tuple(float(m) for m in p.mean)
    p.std = tuple(float(s) for s in p.std)
    if p.num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {p.num_classes}")
    if p.channels < 1:
        raise ValueError(f"channels must be at least 1, got {p.channels}")
    if p.size < 1:
        raise ValueError(f"size must be at least 1, got {p.size}")
    for label, values in (("mean", p.mean), ("std", p.std)):
        if len(values) not in (1, p.channels):
            raise ValueError(
                f"{label} needs 1 or {p.channels} (channels) values, got {len(values)}"
            )
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{label} must be finite, got {values}")
    if not all(s > 0 for s in p.std):
        raise ValueError(f"std values must be positive, got {p.std}")


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


class Normalized(nn.Module):
    """Base of the built-in models: holds ``mean``/``std`` and applies them to inputs in [0, 1]."""

    mean: Tensor
    std: Tensor

    def __init__(self, params: ModelParams) -> None:
        super().__init__()
        mean = torch.tensor(params.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(params.std, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.num_classes = params.num_classes
        self.input_shape = (params.channels, params.size, params.size)

    def normalize(self, x: Tensor) -> Tensor:
        """Map inputs in [0, 1] to the normalised space the weights see."""
        return (x - self.mean) / self.std


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


# --------------------------------------------------------------------------- wide resnet


@dataclass
class WRNParams(BuiltinModelParams):
    """Pre-activation Wide ResNet: ``depth`` = 6n + 4 layers, widths 16k, 32k, 64k for k = widen."""

    depth: int = ranged(28, 10, 1000)
    widen: int = ranged(10, 1, 64)
    dropout: float = ranged(0.0, 0.0, 1.0)

    def __post_init__(self) -> None:
        check_model_params(self)
        if self.depth < 10 or (self.depth - 4) % 6 != 0:
            raise ValueError(
                f"depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), got {self.depth}"
            )
        _positive("widen", self.widen)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class _WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, plus the identity or a 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + residual


class WideResNet(Normalized):
    """Pre-activation WRN as in Madry et al. and Feature Scattering (WRN-28-10: 36.5 M params)."""

    def __init__(self, p: WRNParams) -> None:
        super().__init__(p)
        n = (p.depth - 4) // 6
        widths = [16, 16 * p.widen, 32 * p.widen, 64 * p.widen]
        self.conv1 = _conv3x3(p.channels, widths[0])
        groups = []
        cin = widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2), strict=True):
            blocks = []
            for i in range(n):
                blocks.append(_WideBlock(cin, width, stride if i == 0 else 1, p.dropout))
                cin = width
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, p.num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# --------------------------------------------------------------------------- preact resnet-18


@dataclass
class PreActResNet18Params(BuiltinModelParams):
    """PreAct ResNet-18 (He et al. 2016): no parameters beyond the dataset's."""

    def __post_init__(self) -> None:
        check_model_params(self)


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, shortcut 1x1 on the pre-activated input when needed."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + residual


class PreActResNet18(Normalized):
    """PreAct ResNet-18 for small images: 3x3 stem, stages 64-128-256-512, final BN-ReLU."""

    def __init__(self, p: PreActResNet18Params) -> None:
        super().__init__(p)
        self.conv1 = _conv3x3(p.channels, 64)
        cin = 64
        stages = []
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks = [_PreActBlock(cin, width, stride), _PreActBlock(width, width, 1)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, p.num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# --------------------------------------------------------------------------- small cnn


@dataclass
class SmallCNNParams(BuiltinModelParams):
    """Three conv-BN-ReLU layers (width, 2*width, 2*width; two of stride 2) and an MLP head."""

    width: int = ranged(32, 1, 4096)
    hidden: int = ranged(128, 1, 65536)

    def __post_init__(self) -> None:
        check_model_params(self)
        _positive("width", self.width)
        _positive("hidden", self.hidden)


class SmallCNN(Normalized):
    """A fast CNN for the digits demo (about 90 k parameters at 8x8); also fits 32x32 inputs.

    conv3x3(c->w)-BN-ReLU, conv3x3/2(w->2w)-BN-ReLU, conv3x3/2(2w->2w)-BN-ReLU, adaptive average
    pool to 2x2, linear(8w->hidden)-ReLU, linear(hidden->classes). BatchNorm is there on purpose:
    Feature Scattering attacks in eval mode and updates in train mode, and this exercises it.
    """

    def __init__(self, p: SmallCNNParams) -> None:
        super().__init__(p)
        w = p.width
        self.features = nn.Sequential(
            nn.Conv2d(p.channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(8 * w, p.hidden),
            nn.ReLU(),
            nn.Linear(p.hidden, p.num_classes),
        )
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(self.normalize(x)))


# --------------------------------------------------------------------------- mlp


@dataclass
class MLPParams(BuiltinModelParams):
    """A multilayer perceptron on the flattened image: ``layers`` hidden layers of ``hidden``."""

    hidden: int = ranged(256, 1, 65536)
    layers: int = ranged(2, 0, 1000)

    def __post_init__(self) -> None:
        check_model_params(self)
        _positive("hidden", self.hidden)
        if self.layers < 0:
            raise ValueError(f"layers must be 0 or more, got {self.layers}")


class MLP(Normalized):
    """Flatten, ``layers`` x (linear-ReLU), linear to logits (``layers=0``: a linear classifier)."""

    def __init__(self, p: MLPParams) -> None:
        super().__init__(p)
        dims = [p.channels * p.size * p.size] + [p.hidden] * p.layers
        body: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:], strict=True):
            body += [nn.Linear(a, b), nn.ReLU()]
        body.append(nn.Linear(dims[-1], p.num_classes))
        self.net = nn.Sequential(*body)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize(x))


# --------------------------------------------------------------------------- sizes


def _bn(c: int) -> int:
    return 2 * c


def _block(cin: int, cout: int, stride: int) -> int:
    """Learnable parameters of a pre-activation block (WRN and PreAct ResNet share the layout)."""
    shortcut = cin * cout if stride != 1 or cin != cout else 0
    return _bn(cin) + 9 * cin * cout + _bn(cout) + 9 * cout * cout + shortcut


def parameter_count(p: object) -> int | None:
    """The learnable parameters of a built-in model with params ``p``, by formula (no tensors are
    made: exact, instant, and safe for absurd values); None for a params class it does not know."""
    if isinstance(p, WRNParams):
        n = (p.depth - 4) // 6
        widths = [16, 16 * p.widen, 32 * p.widen, 64 * p.widen]
        total, cin = 9 * p.channels * widths[0], widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2), strict=True):
            total += _block(cin, width, stride) + (n - 1) * _block(width, width, 1)
            cin = width
        return total + _bn(cin) + cin * p.num_classes + p.num_classes
    if isinstance(p, PreActResNet18Params):
        total, cin = 9 * p.channels * 64, 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            total += _block(cin, width, stride) + _block(width, width, 1)
            cin = width
        return total + _bn(cin) + cin * p.num_classes + p.num_classes
    if isinstance(p, SmallCNNParams):
        w = p.width
        convs = 9 * (p.channels * w + w * 2 * w + 2 * w * 2 * w) + _bn(w) + 2 * _bn(2 * w)
        return convs + 8 * w * p.hidden + p.hidden + p.hidden * p.num_classes + p.num_classes
    if isinstance(p, MLPParams):
        dims = [p.channels * p.size * p.size] + [p.hidden] * p.layers + [p.num_classes]
        return sum(a * b + b for a, b in zip(dims[:-1], dims[1:], strict=True))
    return None


# --------------------------------------------------------------------------- registration


@hookimpl
def register_models(register: Register) -> None:
    """Register the built-in models."""
    register(
        "wrn",
        WideResNet,
        params=WRNParams,
        description="pre-activation Wide ResNet (WRN-28-10 = the paper's model, 36.5 M params)",
    )
    register(
        "preact-resnet18",
        PreActResNet18,
        params=PreActResNet18Params,
        description="PreAct ResNet-18 (11.2 M params on CIFAR-10)",
    )
    register(
        "small-cnn",
        SmallCNN,
        params=SmallCNNParams,
        description="small fast conv-BN-ReLU net for the digits demo (~90 k params at 8x8)",
    )
    register(
        "mlp",
        MLP,
        params=MLPParams,
        description="multilayer perceptron on the flattened image",
    )
