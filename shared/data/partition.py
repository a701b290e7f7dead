"""Splitting one labelled data set into client silos.

Each function returns a list of index arrays, one per client: disjoint, together covering
every example exactly once, and the same for the same seed.
"""

from __future__ import annotations

import numpy as np

from dpfl.shared.errors import ConfigError

#: partition schemes by name (:func:`partition` dispatches on them)
SCHEMES = ("iid", "class", "dirichlet")


def _check(labels: np.ndarray, num_clients: int) -> None:
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if len(labels) < num_clients:
        raise ConfigError(f"cannot split {len(labels)} examples among {num_clients} clients")


def partition_iid(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Uniformly random, equal-size (±1) silos."""
    _check(labels, num_clients)
    perm = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def partition_by_class(labels: np.ndarray, num_clients: int, seed: int = 0) -> list[np.ndarray]:
    """Pathological non-IID: classes are dealt out to clients, a class never shared.

    With more clients than classes, the classes' examples are split among several clients.
    """
    _check(labels, num_clients)
    rng = np.random.default_rng(seed)
    classes = rng.permutation(np.unique(labels))
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    if len(classes) >= num_clients:
        for i, c in enumerate(classes):
            parts[i % num_clients].append(np.flatnonzero(labels == c))
    else:
        owners = np.array_split(rng.permutation(num_clients), len(classes))
        for c, group in zip(classes, owners):
            idx = rng.permutation(np.flatnonzero(labels == c))
            for client, chunk in zip(group, np.array_split(idx, len(group))):
                parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0,
                        min_size: int = 1, max_tries: int = 100) -> list[np.ndarray]:
    """Non-IID by class proportions drawn from Dirichlet(alpha) per class.

    Small ``alpha`` (e.g. 0.1) gives very skewed silos; large alpha approaches IID.
    Re-draws until every client holds at least ``min_size`` examples.
    """
    _check(labels, num_clients)
    if not alpha > 0:
        raise ConfigError(f"dirichlet alpha must be > 0, got {alpha}")
    if min_size * num_clients > len(labels):
        raise ConfigError(f"min_size {min_size} x {num_clients} clients exceeds "
                          f"{len(labels)} examples")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise ConfigError(f"no Dirichlet(alpha={alpha}) split gave every one of {num_clients} clients "
                      f"{min_size}+ examples in {max_tries} tries; raise alpha or lower min_size")


def partition(labels: np.ndarray, num_clients: int, scheme: str, seed: int = 0,
              alpha: float = 0.5) -> list[np.ndarray]:
    """Dispatch by name, one of :data:`SCHEMES`: ``iid``, ``class`` or ``dirichlet``."""
    if scheme == "iid":
        return partition_iid(labels, num_clients, seed)
    if scheme == "class":
        return partition_by_class(labels, num_clients, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha, seed)
    raise ConfigError(f"unknown partition scheme {scheme!r}; use one of {list(SCHEMES)}")
