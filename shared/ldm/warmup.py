"""Warm-up of LoRA adapters on DP class means before DP-SGD (DP-FETA's "central images").

The means come from :mod:`dpfl.shared.privacy.classmeans`, already differentially private;
training on them is post-processing and spends no further budget, so it runs without clipping
or noise, wherever the means are (the coordinator, for a federation). What it can teach is
coarse: where in latent space each class sits, which is what a public model lacks for classes
it never saw; DP-SGD then refines it on the real examples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dpfl.shared.errors import ConfigError
from dpfl.shared.ldm.diffusion import expand_draws, row_losses

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WarmupConfig:
    """Warm-up settings.

    Attributes:
        steps: optimiser steps (>= 0, default 200; 0: no warm-up).
        batch_size: rows per step, drawn with replacement from the means (>= 1, default 64).
        lr: Adam learning rate (> 0, default 1e-3).
        cond_drop: share of rows trained with the null class, as in pretraining, so guided
            sampling keeps working (0 <= p < 1, default 0.1).
        seed: draws of means, timesteps and noise (default 0).
    """

    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    cond_drop: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or \
                not 0 <= self.cond_drop < 1:
            raise ConfigError(f"warm-up needs steps >= 0, batch_size >= 1, lr > 0 and "
                              f"0 <= cond_drop < 1, got {self}")


def warm_up(model: torch.nn.Module, scheduler, means: torch.Tensor, classes: torch.Tensor,
            null_class: int, cfg: WarmupConfig) -> list[float]:
    """Train ``model``'s trainable parameters (its adapters) on ``(means, classes)`` with the
    diffusion loss; returns the loss of every step. ``means`` (M, *latent_shape) are in the
    model's (normalised) latent space."""
    if means.shape[0] != classes.shape[0] or means.shape[0] == 0:
        raise ConfigError(f"warm-up needs one class per mean, got {means.shape[0]} means and "
                          f"{classes.shape[0]} classes")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("warm-up: the model has no trainable parameters (adapters)")
    dev = params[0].device
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    means, classes = means.to(dev, torch.float32), classes.to(dev, torch.long)
    was_training = model.training
    model.train()
    losses = []
    try:
        for _ in range(cfg.steps):
            idx = torch.randint(0, means.shape[0], (cfg.batch_size,), generator=gen)
            noisy, t, y, target = expand_draws(means[idx], classes[idx], scheduler, 1,
                                               null_class, cfg.cond_drop, gen)
            loss = row_losses(model, noisy, t, y, target).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        model.train(was_training)
    if losses:
        log.info("warm-up on %d DP class means: %d steps, loss %.4f -> %.4f", means.shape[0],
                 cfg.steps, losses[0], losses[-1])
    return losses
