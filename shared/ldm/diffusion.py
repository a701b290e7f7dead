"""Diffusion training loss and DDIM sampling on top of diffusers schedulers.

The loss supports DPDM's *noise multiplicity* (Dockhorn et al., "Differentially Private
Diffusion Models", TMLR 2023): each example's loss is the mean over K independent
(timestep, noise) draws. :func:`expand_draws` lays the K draws out as K rows per example;
DP code must then reduce the K rows of an example *before* clipping (see
``dpfl.shared.privacy.dpsgd``), never clip each row on its own.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from dpfl.shared.defaults import TIMESTEP_SPACINGS
from dpfl.shared.errors import ConfigError

SPACINGS = TIMESTEP_SPACINGS

def expand_draws(latents: torch.Tensor, labels: torch.Tensor, scheduler: DDPMScheduler, k: int,
                 null_class: int | None = None, cond_drop: float = 0.0,
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make K noisy rows per example, example-major: rows ``i*K .. i*K+K-1`` belong to example i.

    Returns ``(noisy, timesteps, labels, target)``, each with ``B*K`` rows. With
    ``cond_drop > 0`` each row's label is replaced by ``null_class`` with that probability
    (classifier-free guidance training).
    """
    if k < 1:
        raise ConfigError(f"noise multiplicity K must be >= 1, got {k}")
    b = latents.shape[0]
    dev = latents.device
    x0 = latents.repeat_interleave(k, dim=0)
    y = labels.repeat_interleave(k, dim=0)
    n_train = scheduler.config.num_train_timesteps
    t = torch.randint(0, n_train, (b * k,), generator=generator, device="cpu").to(dev)
    noise = torch.randn(x0.shape, generator=generator, device="cpu").to(dev, x0.dtype)
    if cond_drop > 0:
        if null_class is None:
            raise ConfigError("cond_drop > 0 needs the model's null class")
        drop = torch.rand(b * k, generator=generator, device="cpu").to(dev) < cond_drop
        y = torch.where(drop, torch.full_like(y, null_class), y)
    noisy = scheduler.add_noise(x0, noise, t)
    pred = scheduler.config.prediction_type
    if pred == "epsilon":
        target = noise
    elif pred == "v_prediction":
        target = scheduler.get_velocity(x0, noise, t)
    elif pred == "sample":
        target = x0
    else:
        raise ConfigError(f"unsupported scheduler prediction_type {pred!r}")
    return noisy, t, y, target


def row_losses(unet: torch.nn.Module, noisy: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the UNet's prediction, one value per row."""
    out = unet(noisy, t, class_labels=y).sample
    return (out.float() - target.float()).pow(2).flatten(1).mean(1)


def example_losses(unet: torch.nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor,
                   labels: torch.Tensor, k: int = 1, null_class: int | None = None,
                   cond_drop: float = 0.0,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-example loss ``(B,)``: the mean of K (timestep, noise) draws for each example."""
    noisy, t, y, target = expand_draws(latents, labels, scheduler, k, null_class, cond_drop,
                                       generator)
    return row_losses(unet, noisy, t, y, target).view(-1, k).mean(1)


@torch.no_grad()
def ddim_sample(unet: UNet2DModel, scheduler: DDPMScheduler, labels: torch.Tensor,
                latent_shape: tuple[int, int, int], null_class: int, steps: int = 50,
                guidance: float = 1.0, generator: torch.Generator | None = None,
                initial_noise: torch.Tensor | None = None,
                spacing: str | None = None) -> torch.Tensor:
    """Deterministic DDIM (eta=0) with classifier-free guidance; returns normalised latents.

    ``guidance`` 1.0 is plain conditional sampling; larger values push samples toward
    their class. ``initial_noise`` fixes the starting latents (for parity checks).
    ``spacing`` (``leading``, ``trailing``, ``linspace``; None: the scheduler's) places the
    steps: ``trailing`` starts at the last training timestep, where the starting noise
    belongs; ``leading`` (diffusers' default) starts ``1000 / steps - 1`` below it.
    """
    if steps < 1:
        raise ConfigError(f"sampling steps must be >= 1, got {steps}")
    if spacing not in (None, *SPACINGS):
        raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    dev = next(unet.parameters()).device
    ddim = DDIMScheduler.from_config(scheduler.config,
                                     **({"timestep_spacing": spacing} if spacing else {}))
    ddim.set_timesteps(steps)
    n = labels.shape[0]
    if initial_noise is None:
        initial_noise = torch.randn((n, *latent_shape), generator=generator)
    x = initial_noise.to(dev)
    labels = labels.to(dev)
    null = torch.full_like(labels, null_class)
    for t in ddim.timesteps:
        tt = torch.full((n,), int(t), device=dev, dtype=torch.long)
        if guidance == 1.0:
            out = unet(x, tt, class_labels=labels).sample
        else:
            both = unet(torch.cat([x, x]), torch.cat([tt, tt]),
                        class_labels=torch.cat([labels, null])).sample
            cond, uncond = both.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = ddim.step(out, t, x).prev_sample
    return x
