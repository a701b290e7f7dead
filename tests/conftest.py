"""Shared fixtures: tiny models, generated data, and the real Fashion-MNIST when installed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# One intra-op thread: tests start several processes (Ray actors, SuperNodes) at once, and
# OpenMP threads spinning against each other on 2 cores slow everything down many times.
torch.set_num_threads(int(os.environ.get("DPFL_TEST_THREADS", "1")))

FMNIST_DIR = Path(os.environ.get("DPFL_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def fmnist_available() -> bool:
    return (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists()


requires_fmnist = pytest.mark.skipif(
    not fmnist_available() and not os.environ.get("CI"),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


#: the modules that take longest (real processes, real federations), run first: with the
#: README's command (``-n 2 --dist loadfile``, scripts/test.sh) a module is one unit of work
#: for a worker (its module-scoped fixture, e.g. a whole federation, is built once), and the
#: longest one started last would finish last, alone
SLOWEST_FIRST = ("test_faults", "test_federation", "test_secagg", "test_deploy",
                 "test_deploy_recovery", "test_experiment", "test_enrolment", "test_report")


def pytest_collection_modifyitems(config, items):
    """Run the slowest modules first."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__.rpartition(".")[2], len(rank)))


@pytest.fixture(scope="session")
def tiny_ldm():
    from dpfl.shared.ldm.models import build_ldm

    return build_ldm("tiny", seed=0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def task_identity():
    """Flower stamps messages with the current run; outside a run, pretend to be run 1."""
    from flwr.supercore.task_identity import TaskIdentity

    names = ("_run_id", "_task_id", "_node_id")
    old = {n: getattr(TaskIdentity, n, None) for n in names}
    for n in names:
        setattr(TaskIdentity, n, 1)
    yield
    for n, v in old.items():
        setattr(TaskIdentity, n, v)
