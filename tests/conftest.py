"""Shared fixtures: tiny models, generated data, and the real Fashion-MNIST when installed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FMNIST_DIR = Path(os.environ.get("DPFL_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def fmnist_available() -> bool:
    return (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists()


requires_fmnist = pytest.mark.skipif(
    not fmnist_available() and not os.environ.get("CI"),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="session")
def tiny_ldm():
    from dpfl.shared.models import build_ldm

    return build_ldm("tiny", seed=0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
