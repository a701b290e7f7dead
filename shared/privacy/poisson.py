"""Poisson sampling as Opacus does it: the one home of the sample-rate and step-count rule.

DP-SGD's privacy amplification by subsampling (Abadi et al., 2016; Mironov et al., 2019)
assumes each step draws every example independently with probability q. Opacus'
``make_private(poisson_sampling=True)`` replaces the data loader by a ``DPDataLoader`` with
``q = 1 / len(loader)`` (= 1 / ceil(n / B) for n examples at batch size B), whose sampler
takes ``int(1 / q)`` steps per epoch. In floating point that is not always ceil(n / B): for
n = 93, B = 1, q = 1/93 and int(1 / q) = 92.

σ is calibrated for a number of steps, and the ledger records a number of steps before
they are taken; both must be the number Opacus will take. So both come from here, and the
numbers are asked from Opacus' own loader, built the way ``make_private`` builds it
(no data is read), rather than recomputed: a site's planned steps
(``dpfl.client.site.Site.dp_config``), a call's calibration and its ledger commit
(:func:`dpfl.shared.privacy.dpsgd.dp_sgd`, which also checks the real loader against them).

In secure mode the draws themselves come from the OS CSPRNG (:func:`secure_loader`), as
Opacus' own secure mode draws them from torchcsprng (which has no release for current
torch): which examples a step used must be as unpredictable as the noise.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from opacus.data_loader import DPDataLoader
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader, TensorDataset

from dpfl.shared.errors import ConfigError


def poisson_loader(n: int, batch_size: int) -> DPDataLoader:
    """Opacus' Poisson loader over ``n`` placeholder examples at expected batch size
    ``batch_size``, as ``PrivacyEngine.make_private`` derives it from a plain loader."""
    for name, v in (("n", n), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1 to plan DP-SGD steps, got {v!r}")
    plain = DataLoader(TensorDataset(torch.empty(n, 0)), batch_size=batch_size)
    return DPDataLoader.from_data_loader(plain)


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sample rate q Opacus uses for ``n`` examples at expected batch ``batch_size``."""
    return float(poisson_loader(n, batch_size).sample_rate)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """DP-SGD steps Opacus' Poisson loader takes in one epoch over ``n`` examples."""
    return len(poisson_loader(n, batch_size))


def dp_steps(n: int, batch_size: int, epochs: int = 1) -> int:
    """DP-SGD steps of ``epochs`` epochs over ``n`` examples (one training call, or one
    federated round of ``local_epochs``)."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError(f"epochs must be an integer >= 1, got {epochs!r}")
    return epochs * steps_per_epoch(n, batch_size)


def urandom_uniform(n: int) -> np.ndarray:
    """``n`` independent uniforms in [0, 1) from ``os.urandom`` (53 random bits each)."""
    bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
    return bits.astype(np.float64) * 2.0 ** -53


class OSEntropyPoissonSampler(UniformWithReplacementSampler):
    """Opacus' Poisson batch sampler whose inclusions come from :func:`urandom_uniform`:
    each step includes every example independently with probability ``sample_rate``
    (``u < q``, as Opacus draws it); no torch or numpy generator is read or advanced."""

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            yield np.flatnonzero(urandom_uniform(self.num_samples) < self.sample_rate).tolist()


class OSEntropyPoissonLoader(DataLoader):
    """Opacus' Poisson loader ``dp_loader`` (its dataset, empty-batch collate, rate and
    steps per epoch, so :func:`steps_per_epoch` stays the one rule) drawing its batches
    with :class:`OSEntropyPoissonSampler`. ``sample_rate`` is Opacus' attribute."""

    def __init__(self, dp_loader: DPDataLoader):
        sampler = OSEntropyPoissonSampler(num_samples=len(dp_loader.dataset),  # type: ignore[arg-type]
                                          sample_rate=dp_loader.sample_rate,
                                          steps=len(dp_loader))
        # the loader's own generator seeds worker processes only; never the sampling
        super().__init__(dp_loader.dataset, batch_sampler=sampler,
                         collate_fn=dp_loader.collate_fn, num_workers=dp_loader.num_workers,
                         pin_memory=dp_loader.pin_memory, generator=dp_loader.generator)
        self.sample_rate = dp_loader.sample_rate


def secure_loader(dp_loader: DataLoader) -> OSEntropyPoissonLoader:
    """:class:`OSEntropyPoissonLoader` in place of Opacus' (single-process) Poisson loader."""
    if not isinstance(dp_loader, DPDataLoader) or dp_loader.distributed:
        raise ConfigError(f"secure Poisson sampling replaces Opacus' single-process "
                          f"DPDataLoader, got {type(dp_loader).__name__}")
    return OSEntropyPoissonLoader(dp_loader)
