"""The real Fashion-MNIST and dpfl's standard public / private / test split.

The files come from Debian's package ``dataset-fashion-mnist``
(``/usr/share/datasets/fashion-mnist``); set ``DPFL_FASHION_MNIST`` to use another folder
with the same four ``*-ubyte.gz`` files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dpfl.shared.data.readers import ImageSet, read_idx
from dpfl.shared.errors import DataError
from dpfl.shared.ldm.models import FASHION_MNIST_CLASSES

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
PUBLIC_CLASSES = (0, 1, 2, 3, 4)


def fashion_mnist_dir() -> Path:
    d = Path(os.environ.get("DPFL_FASHION_MNIST", DEFAULT_DIR))
    if not (d / "train-images-idx3-ubyte.gz").exists():
        raise DataError(f"Fashion-MNIST not found in {d}; install it with "
                        "'apt-get install dataset-fashion-mnist' or set DPFL_FASHION_MNIST "
                        "to a folder holding the four *-ubyte.gz files")
    return d


def load_fashion_mnist(split: str) -> ImageSet:
    """``split`` is ``train`` (60,000 images) or ``test`` (10,000)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    d = fashion_mnist_dir()
    data = read_idx(d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz",
                    class_names=FASHION_MNIST_CLASSES)
    return data


@dataclass
class StandardSplit:
    public: ImageSet
    private: ImageSet
    test: ImageSet


def standard_split(seed: int = 0) -> StandardSplit:
    """public = half the training images of classes 0-4 (15,000), drawn per class with
    ``seed``; private = the other 45,000 training images (all ten classes); test = 10,000.

    Public data may train the base model; private data is only touched under DP.
    """
    train = load_fashion_mnist("train")
    rng = np.random.default_rng(seed)
    public_idx = []
    for c in PUBLIC_CLASSES:
        idx = rng.permutation(np.flatnonzero(train.labels == c))
        public_idx.append(idx[: len(idx) // 2])
    public = np.sort(np.concatenate(public_idx))
    private = np.setdiff1d(np.arange(len(train)), public)
    return StandardSplit(
        public=train.subset(public, source=f"fashion-mnist public (seed {seed})"),
        private=train.subset(private, source=f"fashion-mnist private (seed {seed})"),
        test=load_fashion_mnist("test"),
    )
