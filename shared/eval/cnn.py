"""A small image classifier: the downstream-accuracy CNN and the domain feature extractor.

The utility protocol of DPDM (Dockhorn et al., "Differentially Private Diffusion Models",
TMLR 2023) and the DP generative-model literature before it: train a small CNN on the
synthetic set, with a fixed number of epochs, and report its accuracy on the *real* test set.
Model selection here never looks at the test set: the epoch kept is the best one on a held-out
slice of the *training* set (``val_fraction``), or the last epoch when that is 0. The one
training loop, :func:`train_classifier`, takes any model factory; the DPImageBench-style
ResNet, WideResNet and ResNeXt (:mod:`dpfl.shared.eval.classifiers`) train with it too.

The same network, trained once on public data only, gives the feature space of the domain
Fréchet distance and of precision/recall (:mod:`dpfl.shared.eval.fid`); its penultimate layer
(the first fully connected layer, before its ReLU) is the feature vector.

Saved as ``classifier.safetensors`` (weights) + ``classifier.json`` (architecture, classes,
how it was trained) in one folder; nothing is pickled.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from dpfl.shared.data.readers import ImageSet
from dpfl.shared.errors import ConfigError, DataError, ModelError
from dpfl.shared.io import atomic_write_json

log = logging.getLogger(__name__)

WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"
FORMAT = "dpfl-classifier/1"


@dataclass(frozen=True)
class CNNConfig:
    """Architecture: three 3x3 conv layers (ReLU; max-pooling after the first two), global
    average pooling to 4x4, then two fully connected layers.

    Attributes:
        in_channels: image channels (1 grayscale, 3 RGB).
        num_classes: output classes.
        widths: channels of the three conv layers (default 16, 32, 64).
        hidden: width of the first fully connected layer = the feature dimension (default 128).
        dropout: dropout before the last layer while training (0 <= p < 1, default 0.25).
    """

    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 128
    dropout: float = 0.25

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.num_classes < 2 or self.hidden < 1:
            raise ConfigError(f"CNN needs in_channels >= 1, num_classes >= 2, hidden >= 1; got "
                              f"{self.in_channels}, {self.num_classes}, {self.hidden}")
        if len(self.widths) != 3 or min(self.widths) < 1:
            raise ConfigError(f"CNN widths must be three positive integers, got {self.widths!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"CNN dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))


class SmallCNN(nn.Module):
    """3 conv + 2 FC; :meth:`features` is the penultimate layer before its ReLU (after it,
    units that are dead on the whole domain would make every feature covariance singular)."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        a, b, c = cfg.widths
        self.body = nn.Sequential(
            nn.Conv2d(cfg.in_channels, a, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(a, b, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(b, c, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(c * 16, cfg.hidden))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(cfg.dropout),
                                  nn.Linear(cfg.hidden, cfg.num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass(frozen=True)
class TrainSettings:
    """How the CNN is trained (Adam, fixed epochs, selection on a training-set slice).

    Attributes:
        epochs: fixed number of passes over the training images (>= 1, default 10).
        lr: Adam learning rate (> 0, default 1e-3).
        batch_size: minibatch size (>= 1, default 128).
        val_fraction: share of the training set held out for choosing the epoch (0 <= f < 1,
            default 0.1); 0 keeps the final epoch. The test set is never used for selection.
        seed: seeds initialisation, the held-out split and shuffling (default 0).
        device: torch device string (default "cpu").
    """

    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError(f"classifier training needs epochs >= 1, batch_size >= 1, lr > 0; "
                              f"got {self.epochs}, {self.batch_size}, {self.lr}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")


M = TypeVar("M", bound=nn.Module)


@dataclass
class TrainedClassifier(Generic[M]):
    """A trained classifier with its training record."""

    model: M
    class_names: tuple[str, ...]
    history: list[dict[str, Any]] = field(default_factory=list)
    selected_epoch: int = 0
    train_size: int = 0
    val_size: int = 0
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)


TrainedCNN = TrainedClassifier[SmallCNN]


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) float in [0, 1] -> (N, C, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return x.permute(0, 3, 1, 2) * 2 - 1


@torch.no_grad()
def predict_logits(model: nn.Module, data: ImageSet, batch_size: int = 512,
                   features: bool = False) -> torch.Tensor:
    """Logits of every image (or, for a :class:`SmallCNN`, its penultimate features), in eval
    mode, on CPU."""
    if features and not isinstance(model, SmallCNN):
        raise ConfigError(f"penultimate features come from the SmallCNN, not a "
                          f"{type(model).__name__}")
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(data), batch_size):
            x = to_input(data.images[i:i + batch_size]).to(dev)
            out.append((model.features(x) if features else model(x)).cpu())
    finally:
        model.train(was_training)
    if out:
        return torch.cat(out)
    return torch.empty(0, model.cfg.hidden if isinstance(model, SmallCNN) and features
                       else len(data.class_names))


def accuracy(model: nn.Module, data: ImageSet,
             batch_size: int = 512) -> tuple[float, list[float | None]]:
    """Overall accuracy and per-class accuracy (None for classes absent from ``data``)."""
    pred = predict_logits(model, data, batch_size).argmax(1).numpy()
    correct = pred == data.labels
    per_class: list[float | None] = []
    for c in range(len(data.class_names)):
        mask = data.labels == c
        per_class.append(float(correct[mask].mean()) if mask.any() else None)
    return float(correct.mean()) if len(correct) else float("nan"), per_class


def _split(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and (n_val < 1 or n - n_val < 1):
        raise DataError(f"a training set of {n} images is too small to hold out "
                        f"{val_fraction:.0%} for validation; use more images or val_fraction 0")
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def train_cnn(data: ImageSet, settings: TrainSettings = TrainSettings(),
              arch: CNNConfig | None = None, progress: bool = False,
              desc: str = "classifier") -> TrainedCNN:
    """Train a :class:`SmallCNN` on ``data`` with :func:`train_classifier`."""
    n_classes = len(data.class_names)
    cfg = arch or CNNConfig(in_channels=data.images.shape[3], num_classes=n_classes)
    if cfg.in_channels != data.images.shape[3] or cfg.num_classes != n_classes:
        raise ConfigError(f"CNN config ({cfg.in_channels} channel(s), {cfg.num_classes} "
                          f"classes) does not fit {data.source} "
                          f"({data.images.shape[3]} channel(s), {n_classes} classes)")
    return train_classifier(data, lambda: SmallCNN(cfg), settings, progress, desc)


def train_classifier(data: ImageSet, make_model: Callable[[], M],
                     settings: TrainSettings = TrainSettings(), progress: bool = False,
                     desc: str = "classifier") -> TrainedClassifier[M]:
    """Train the model ``make_model()`` builds on ``data`` (only ``data``; no test set is
    involved): Adam, ``settings.epochs`` passes in a seeded random order.

    The epoch kept is the one with the best accuracy on the held-out slice of ``data``
    (``settings.val_fraction``), or the last one when the slice is empty. ``make_model`` is
    called once, after ``torch.manual_seed(settings.seed)``, so the initialisation is seeded.
    """
    if len(data) == 0:
        raise DataError(f"{data.source}: cannot train a classifier on an empty set")
    start = time.perf_counter()
    rng = np.random.default_rng(settings.seed)
    train_idx, val_idx = _split(len(data), settings.val_fraction, rng)
    train, val = data.subset(train_idx), data.subset(val_idx)
    torch.manual_seed(settings.seed)
    model = make_model().to(torch.device(settings.device))
    opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    bar = tqdm(total=settings.epochs, desc=desc, disable=not progress)
    for epoch in range(1, settings.epochs + 1):
        rec = {"epoch": epoch, "loss": _train_epoch(model, opt, train, settings, rng)}
        if len(val):
            rec["val_accuracy"] = accuracy(model, val)[0]
            if best is None or rec["val_accuracy"] > best[0]:
                best = (rec["val_accuracy"], epoch, copy.deepcopy(model.state_dict()))
        history.append(rec)
        bar.update(1)
        bar.set_postfix({k: round(v, 4) for k, v in rec.items() if k != "epoch"})
    bar.close()
    selected = settings.epochs
    if best is not None:
        selected = best[1]
        model.load_state_dict(best[2])
    model.eval()
    return TrainedClassifier(model, data.class_names, history, selected, len(train), len(val),
                             time.perf_counter() - start)


def _train_epoch(model: nn.Module, opt: torch.optim.Optimizer, train: ImageSet,
                 settings: TrainSettings, rng: np.random.Generator) -> float:
    """One pass over ``train`` in a random order; returns the mean training loss."""
    dev = torch.device(settings.device)
    x_all, y_all = to_input(train.images), torch.from_numpy(train.labels)
    model.train()
    total, seen = 0.0, 0
    for idx in torch.from_numpy(rng.permutation(len(train))).split(settings.batch_size):
        x, y = x_all[idx].to(dev), y_all[idx].to(dev)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return total / seen


def save_classifier(trained: TrainedCNN, folder: str | Path) -> Path:
    """Write ``classifier.safetensors`` + ``classifier.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in trained.model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    atomic_write_json(folder / META_FILE, {
        "format": FORMAT, "arch": {**asdict(trained.model.cfg),
                                   "widths": list(trained.model.cfg.widths)},
        "class_names": list(trained.class_names), "history": trained.history,
        "selected_epoch": trained.selected_epoch, "train_size": trained.train_size,
        "val_size": trained.val_size, "seconds": trained.seconds, **trained.meta})
    return folder


def load_classifier(folder: str | Path, device: str = "cpu") -> TrainedCNN:
    """Read a folder written by :func:`save_classifier`."""
    folder = Path(folder)
    meta_path, weights = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.exists() or not weights.exists():
        raise ModelError(f"classifier folder {folder} needs {META_FILE} and {WEIGHTS_FILE}; "
                         "train one with dpfl.shared.eval.evaluate.domain_classifier")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{meta_path} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{meta_path}: field 'format' must be {FORMAT!r}, got "
                         f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    for key in ("arch", "class_names"):
        if key not in meta:
            raise ModelError(f"{meta_path}: missing field {key!r}")
    try:
        cfg = CNNConfig(**{**meta["arch"], "widths": tuple(meta["arch"]["widths"])})
    except (TypeError, KeyError) as exc:
        raise ModelError(f"{meta_path}: field 'arch' is not a CNN configuration ({exc})") from exc
    model = SmallCNN(cfg)
    try:
        model.load_state_dict(load_file(str(weights)))
    except (RuntimeError, OSError) as exc:
        raise ModelError(f"{weights} does not match the architecture in {meta_path}: "
                         f"{exc}") from exc
    model.to(device).eval()
    known = {"format", "arch", "class_names", "history", "selected_epoch", "train_size",
             "val_size", "seconds"}
    return TrainedCNN(model, tuple(meta["class_names"]), meta.get("history", []),
                      int(meta.get("selected_epoch", 0)), int(meta.get("train_size", 0)),
                      int(meta.get("val_size", 0)), float(meta.get("seconds", 0.0)),
                      {k: v for k, v in meta.items() if k not in known})
