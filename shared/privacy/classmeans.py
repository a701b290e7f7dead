"""DP class means ("central images", DP-FETA) of a site's latents: one Gaussian mechanism.

Paper: DP-FETA (Li et al., "From Easy to Hard: Building a Shortcut for Differentially
Private Image Synthesis", IEEE S&P 2025) warms a diffusion model up on DP "central images",
class means released with a small share of the budget, before DP-SGD. Here a site releases,
for every class, the noisy sum of its clipped latents and the noisy count of its examples;
the coordinator adds the sites' releases and divides (post-processing) and warms the global
adapter up on the means (:mod:`dpfl.shared.ldm.warmup`).

The mechanism, under add/remove-one-example adjacency. Example ``i`` (latent ``z_i``, class
``y_i``) contributes the vector ``u_i = [clip(z_i, C) / C at block y_i, e_{y_i}]``: its
latent scaled to norm at most 1 in its class's block of the sum part, and a 1 in its class's
count. Adding or removing one example changes ``sum_i u_i`` by at most
``sqrt(1 + 1) = sqrt(2)`` in L2. Releasing ``sum_i u_i + N(0, (sigma * sqrt(2))^2 I)`` is the
Gaussian mechanism with noise multiplier ``sigma``: for an accountant exactly one DP-SGD step
at sampling rate 1 with noise multiplier ``sigma``, which is how it is recorded, before the
release exists (:func:`release_class_means` commits first). The noise is drawn from the
kernel CSPRNG like dpfl's DP-SGD noise (:mod:`dpfl.shared.privacy.securenoise`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from dpfl.shared.errors import ConfigError, DataError
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.securenoise import secure_noise

#: L2 sensitivity of the released vector, in units of the clip norm (sum part) and of one
#: example (count part)
SENSITIVITY = math.sqrt(2.0)


@dataclass(frozen=True)
class ClassMeans:
    """One DP release (or the sum of several sites' releases).

    Attributes:
        sums: (num_classes, *latent_shape) noisy sums of the clipped latents, in units of
            ``clip`` (multiply by ``clip`` for latent units).
        counts: (num_classes,) noisy example counts.
        clip: the clip norm C the latents were clipped to.
        count_std: standard deviation of the noise on each count (public: it follows from
            the noise multiplier), which decides which counts are too noisy to divide by.
    """

    sums: np.ndarray
    counts: np.ndarray
    clip: float
    count_std: float = 0.0

    def __post_init__(self) -> None:
        if self.sums.shape[0] != self.counts.shape[0] or self.counts.ndim != 1:
            raise DataError(f"class means: sums {self.sums.shape} and counts "
                            f"{self.counts.shape} do not describe the same classes")
        if not (np.isfinite(self.sums).all() and np.isfinite(self.counts).all()):
            raise DataError("class means: non-finite sums or counts")
        if not self.clip > 0:
            raise DataError(f"class means: clip must be > 0, got {self.clip}")

    def __add__(self, other: ClassMeans) -> ClassMeans:
        if self.sums.shape != other.sums.shape or self.clip != other.clip:
            raise DataError(f"cannot add class means of shape {other.sums.shape} (clip "
                            f"{other.clip}) to {self.sums.shape} (clip {self.clip})")
        return ClassMeans(self.sums + other.sums, self.counts + other.counts, self.clip,
                          math.hypot(self.count_std, other.count_std))

    def means(self, min_count: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(means, classes)``: the mean latent of every class whose noisy count is at least
        ``min_count`` (default: three count-noise standard deviations, and at least 1; a
        noisy count near 0 would divide noise by noise), and those classes."""
        if min_count is None:
            min_count = max(1.0, 3.0 * self.count_std)
        keep = np.flatnonzero(self.counts >= min_count)
        means = self.sums[keep] * self.clip / self.counts[keep].reshape(-1, *[1] * (
            self.sums.ndim - 1))
        return means.astype(np.float32), keep.astype(np.int64)


def clip_rows(latents: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row scaled to L2 norm at most ``clip``, then divided by ``clip`` (norm <= 1)."""
    flat = latents.reshape(latents.shape[0], -1).double()
    norms = flat.norm(dim=1, keepdim=True)
    scale = torch.clamp(clip / norms.clamp_min(1e-12), max=1.0)
    return (flat * scale / clip).reshape(latents.shape)


def exact_sums(latents: torch.Tensor, labels: torch.Tensor, num_classes: int,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The noiseless ``sum_i u_i``: per-class sums of the clipped, C-normalised latents and
    per-class counts (float64). Never released as such."""
    sums = torch.zeros((num_classes, *latents.shape[1:]), dtype=torch.float64)
    sums.index_add_(0, labels.long(), clip_rows(latents, clip))
    return sums, torch.bincount(labels.long(), minlength=num_classes).double()


def release_class_means(latents: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        clip: float, sigma: float,
                        accountant: PersistentAccountant) -> ClassMeans:
    """Commit one Gaussian mechanism at noise multiplier ``sigma`` to ``accountant`` (durably,
    refusing if it would pass the budget), then return the noisy class sums and counts.

    ``latents`` (N, ...) and ``labels`` (N,) in ``0..num_classes-1`` are the site's examples.
    """
    if not (clip > 0 and math.isfinite(clip)):
        raise ConfigError(f"class-means clip must be a finite number > 0, got {clip}")
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ConfigError(f"class-means noise multiplier must be a finite number > 0, got "
                          f"{sigma}")
    if latents.shape[0] != labels.shape[0]:
        raise DataError(f"{latents.shape[0]} latents but {labels.shape[0]} labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(f"labels outside 0..{num_classes - 1}")
    accountant.commit(sigma, 1.0, 1)  # recorded and saved before anything is computed
    sums, counts = exact_sums(latents, labels, num_classes, clip)
    std = sigma * SENSITIVITY
    sums = sums + secure_noise(std, sums)
    counts = counts + secure_noise(std, counts)
    return ClassMeans(sums.numpy(), counts.numpy(), float(clip), count_std=std)
