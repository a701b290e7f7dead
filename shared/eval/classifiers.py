"""The DPImageBench classifier protocol at CPU size: a small ResNet, WideResNet and ResNeXt.

DPImageBench (Gong et al., "DPImageBench: A Unified Benchmark for Differentially Private
Image Synthesis", 2025) trains three classifiers on the synthetic set and reports the mean of
their accuracies on the real test set. Its networks are the CIFAR-sized originals at 32x32:

- ResNet-110 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016; 6n+2
  layers, n = 18 basic blocks per stage at widths 16/32/64): about 1.7 M parameters;
- WRN-40-4 (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016; 6n+4 layers,
  pre-activation blocks at widths 16k/32k/64k, k = 4, dropout 0.3): about 8.9 M parameters;
- ResNeXt-29 8x64d (Xie et al., "Aggregated Residual Transformations for Deep Neural
  Networks", CVPR 2017; 9n+2 layers of bottlenecks with grouped 3x3 convolutions, cardinality
  8, stages 256/512/1024): about 34.4 M parameters;

each trained for 50 epochs with Adam (lr 1e-4, batch 512) and an EMA of the weights, on a GPU.

Here are the same three block designs at the smallest depth of each family (one block per
stage), sized for one CPU thread at Fashion-MNIST's 28x28 (the input :mod:`~.cnn` uses: no
padding to 32): a 3x3 stem at 28x28, then the three stages at 14, 7 and 4 pixels (one more
stride 2 than the originals' 32/16/8, to fit one CPU thread), a global average pool and a
linear head.

============  ==============================  ===========================  ==================
name          architecture                    widths                       parameters (1x28)
============  ==============================  ===========================  ==================
``resnet``    ResNet-8 (6n+2, n = 1)          16 / 32 / 64                 78,042
``wrn``       WRN-10-2 (6n+4, n = 1, k = 2)   16 stem, 32 / 64 / 128       303,418
``resnext``   ResNeXt-11 (9n+2, n = 1), C = 4  16 stem, 32 / 64 / 128 out  41,786
============  ==============================  ===========================  ==================

(parameter counts include BatchNorm's affine weights, for one input channel and ten classes;
:func:`parameter_count`; ``tests/test_classifiers.py`` pins them.) They train with the CNN's
loop (:func:`dpfl.shared.eval.cnn.train_classifier`): Adam, fixed epochs, the epoch chosen on a
held-out slice of the training set, never on the test set. :data:`CLASSIFIERS` is the one
registry of models; which names make the mean (:data:`MEAN3`) and what ``--classifiers``
may choose (:data:`CLASSIFIER_SETS`) are part of the results schema, :mod:`~.record`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dpfl.shared.errors import ConfigError
from dpfl.shared.eval.cnn import CNNConfig, SmallCNN
from dpfl.shared.eval.record import CLASSIFIER_SETS, MEAN3, mean3

__all__ = ["CLASSIFIERS", "CLASSIFIER_SETS", "MEAN3", "ResNet", "ResNeXt", "WideResNet", "build",
           "mean3", "parameter_count"]

STAGE_STRIDES = (2, 2, 2)  # stages at 14, 7 and 4 pixels (the CIFAR originals: 1, 2, 2)


def _conv3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False)


def _projection(cin: int, cout: int, stride: int, norm: bool = True) -> nn.Module:
    """The 1x1 (strided) shortcut where the width or resolution changes; else identity."""
    if cin == cout and stride == 1:
        return nn.Identity()
    conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout)) if norm else conv


def _init(model: nn.Module) -> None:
    """He initialisation of convolutions; BatchNorm starts as the identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _stem_and_stages(in_channels: int, stem: int, widths: tuple[int, ...], blocks: int,
                     block: Callable[[int, int, int], nn.Module]) -> tuple[nn.Sequential, int]:
    """conv3x3-BN-ReLU stem to ``stem`` channels, then one stage per width of ``blocks``
    blocks (``block(cin, cout, stride)``, stride :data:`STAGE_STRIDES` entering each stage),
    global average pooling; returns the body and its output width."""
    layers: list[nn.Module] = [_conv3(in_channels, stem), nn.BatchNorm2d(stem), nn.ReLU()]
    cin = stem
    for i, w in enumerate(widths):
        for b in range(blocks):
            layers.append(block(cin, w, STAGE_STRIDES[i] if b == 0 else 1))
            cin = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), cin


def _check(in_channels: int, num_classes: int) -> None:
    if in_channels < 1 or num_classes < 2:
        raise ConfigError(f"a classifier needs in_channels >= 1 and num_classes >= 2, got "
                          f"{in_channels} and {num_classes}")


# -- ResNet (He et al. 2016) -----------------------------------------------------------------
class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU (post-activation)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(_conv3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(),
                                  _conv3(cout, cout), nn.BatchNorm2d(cout))
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet-(6n+2) (He et al. 2016, section 4.2): a 3x3 stem of 16 channels,
    three stages of ``blocks`` basic blocks at widths 16/32/64 (stride 2 entering each
    stage, :data:`STAGE_STRIDES`), global average pooling, a linear head. ``blocks=1``:
    ResNet-8, 78 k parameters."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, blocks: int = 1,
                 widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        _check(in_channels, num_classes)
        self.body, cout = _stem_and_stages(in_channels, widths[0], widths, blocks, BasicBlock)
        self.head = nn.Linear(cout, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# -- Wide ResNet (Zagoruyko & Komodakis 2016) ------------------------------------------------
class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus the shortcut (a
    1x1 convolution of the activated input where the width or resolution changes)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU())
        self.body = nn.Sequential(_conv3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(),
                                  nn.Dropout(dropout), _conv3(cout, cout))
        self.project = cin != cout or stride != 1
        self.shortcut = _projection(cin, cout, stride, norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pre(x)
        return self.body(a) + self.shortcut(a if self.project else x)


class WideResNet(nn.Module):
    """WRN-(6n+4)-k (Zagoruyko & Komodakis 2016): a 3x3 stem of 16 channels, three stages of
    ``blocks`` pre-activation blocks at widths 16k/32k/64k, BN-ReLU, global average pooling, a
    linear head; dropout between the convolutions of a block (0.3 as DPImageBench).
    ``blocks=1, widen=2``: WRN-10-2, 303 k parameters."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, blocks: int = 1,
                 widen: int = 2, dropout: float = 0.3):
        super().__init__()
        _check(in_channels, num_classes)
        if widen < 1 or not 0 <= dropout < 1:
            raise ConfigError(f"WideResNet needs widen >= 1 and dropout in [0, 1), got {widen} "
                              f"and {dropout}")
        layers: list[nn.Module] = [_conv3(in_channels, 16)]
        cin = 16
        for i, w in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for b in range(blocks):
                layers.append(WideBlock(cin, w, STAGE_STRIDES[i] if b == 0 else 1, dropout))
                cin = w
        self.body = nn.Sequential(*layers, nn.BatchNorm2d(cin), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(cin, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# -- ResNeXt (Xie et al. 2017) ---------------------------------------------------------------
class NeXtBlock(nn.Module):
    """Bottleneck of type C: 1x1 reduce to ``width`` channels, grouped 3x3 (``cardinality``
    groups, the block's stride), 1x1 expand, each followed by BN (ReLU after the first two),
    plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, cardinality: int, width: int):
        super().__init__()
        if width % cardinality:
            raise ConfigError(f"ResNeXt bottleneck width {width} is not a multiple of the "
                              f"cardinality {cardinality}")
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            _conv3(width, width, stride, groups=cardinality), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNeXt(nn.Module):
    """ResNeXt-(9n+2) for small images (Xie et al. 2017, section 5.3): a 3x3 stem, three
    stages of ``blocks`` bottlenecks with outputs ``widths`` (stride 2 entering each
    stage) and grouped 3x3 convolutions of ``cardinality`` groups over half the output width,
    global average pooling, a linear head. Defaults: ResNeXt-11, C = 4, 42 k parameters."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, blocks: int = 1,
                 widths: tuple[int, int, int] = (32, 64, 128), cardinality: int = 4):
        super().__init__()
        _check(in_channels, num_classes)
        self.body, cout = _stem_and_stages(
            in_channels, 16, widths, blocks,
            lambda cin, w, stride: NeXtBlock(cin, w, stride, cardinality, w // 2))
        self.head = nn.Linear(cout, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# -- the registry ----------------------------------------------------------------------------
Builder = Callable[[int, int], nn.Module]  # (in_channels, num_classes) -> an untrained model

CLASSIFIERS: dict[str, Builder] = {
    "cnn": lambda c, n: SmallCNN(CNNConfig(in_channels=c, num_classes=n)),  # our 3-conv CNN
    "resnet": lambda c, n: ResNet(c, n),  # ResNet-8
    "wrn": lambda c, n: WideResNet(c, n),  # WRN-10-2, dropout 0.3
    "resnext": lambda c, n: ResNeXt(c, n),  # ResNeXt-11, cardinality 4
}


def build(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """An untrained classifier from the registry."""
    if name not in CLASSIFIERS:
        raise ConfigError(f"classifier must be one of {sorted(CLASSIFIERS)}, got {name!r}")
    return CLASSIFIERS[name](in_channels, num_classes)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters (BatchNorm's running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
