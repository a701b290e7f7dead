"""DP-SGD noise from the operating system's CSPRNG: Opacus' secure mode without torchcsprng.

Opacus' ``secure_mode`` draws its Gaussian noise through torchcsprng's ``/dev/urandom``
generator and, against floating-point attacks on the noise's low bits (Jin et al. 2021,
arXiv 2107.10138; Haney et al. 2022, arXiv 2112.05307), returns the sum of four draws divided
by two (section 5.1 of the first paper, n = 2). torchcsprng has no release for current torch,
so :class:`OSEntropyDPOptimizer` keeps Opacus' :class:`~opacus.optimizers.DPOptimizer`
(clipping, accumulation, scaling, step hooks, accounting) and replaces only the noise source:

* uniforms from ``os.urandom`` (the kernel CSPRNG), 53 random bits each, in the open
  interval (0, 1);
* standard normals by the Box-Muller transform in float64;
* the same four-draw construction as Opacus' secure mode, then scaled to ``sigma * C``.

No torch or numpy generator state is read or advanced, so no seed anywhere can reproduce it.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from dpfl.shared.errors import ConfigError

_DRAWS = 4  # Opacus' secure mode: sum of 2n draws / sqrt(2n), n = 2


def urandom_standard_normal(n: int) -> np.ndarray:
    """``n`` independent N(0, 1) float64 samples from ``os.urandom``."""
    if n <= 0:
        return np.zeros(0)
    pairs = (n + 1) // 2
    bits = np.frombuffer(os.urandom(16 * pairs), dtype=np.uint64) >> np.uint64(11)
    u = (bits.astype(np.float64) + 0.5) * 2.0 ** -53  # in (0, 1), never 0 or 1
    u1, u2 = u[:pairs], u[pairs:]
    radius = np.sqrt(-2.0 * np.log(u1))
    angle = 2.0 * math.pi * u2
    return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]


def secure_noise(std: float, reference: torch.Tensor) -> torch.Tensor:
    """N(0, std^2) noise shaped like ``reference`` (its dtype and device)."""
    if std == 0:
        return torch.zeros_like(reference)
    n = reference.numel()
    draws = urandom_standard_normal(_DRAWS * n).reshape(_DRAWS, n).sum(axis=0)
    noise = draws / math.sqrt(_DRAWS) * std
    return torch.from_numpy(noise).to(dtype=reference.dtype,
                                      device=reference.device).view_as(reference)


class OSEntropyDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer whose Gaussian noise comes from :func:`secure_noise`."""

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + secure_noise(std, p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


def make_secure(optimizer: DPOptimizer) -> OSEntropyDPOptimizer:
    """Switch an Opacus DPOptimizer (flat clipping, one process) to OS-entropy noise."""
    if type(optimizer) is not DPOptimizer:
        raise ConfigError(f"secure noise supports Opacus' DPOptimizer, got "
                          f"{type(optimizer).__name__}")
    optimizer.__class__ = OSEntropyDPOptimizer
    optimizer.secure_mode = True
    optimizer.generator = None
    return optimizer
