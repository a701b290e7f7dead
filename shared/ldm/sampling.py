"""Sampling images from a :class:`~dpfl.shared.ldm.models.LatentDiffusion` with torch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from dpfl.shared.edge.grid import save_grid
from dpfl.shared.ldm.diffusion import ddim_sample
from dpfl.shared.ldm.models import LatentDiffusion


def sample_images(ldm: LatentDiffusion, labels: torch.Tensor, steps: int = 50,
                  guidance: float = 1.0, seed: int = 0, batch_size: int = 256,
                  spacing: str | None = None) -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1] for the given class labels (DDIM; ``spacing``: see
    :func:`~dpfl.shared.ldm.diffusion.ddim_sample`)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    was_training = ldm.unet.training
    ldm.unet.eval()
    try:
        for chunk in labels.split(batch_size):
            z = ddim_sample(ldm.unet, ldm.scheduler, chunk, ldm.latent_shape, ldm.spec.null_class,
                            steps=steps, guidance=guidance, generator=gen, spacing=spacing)
            out.append(ldm.decode(z))
    finally:
        ldm.unet.train(was_training)
    return torch.cat(out)


def class_grid(ldm: LatentDiffusion, path: str | Path, per_class: int = 8, steps: int = 50,
               guidance: float = 1.0, seed: int = 0, classes: Sequence[int] | None = None,
               title: str | None = None) -> Path:
    """A PNG grid with one row per class, ``per_class`` samples a row."""
    classes = list(range(ldm.spec.num_classes)) if classes is None else list(classes)
    labels = torch.tensor(classes).repeat_interleave(per_class)
    images = sample_images(ldm, labels, steps=steps, guidance=guidance, seed=seed)
    return save_grid(images.numpy(), path, nrow=per_class,
                     row_labels=[ldm.spec.class_names[c] for c in classes], title=title)
