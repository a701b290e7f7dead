"""The autoencoder ceiling: how much of a real set survives the LDM's autoencoder.

Only the UNet is fine-tuned on private data; the frozen public autoencoder decodes every
synthetic image. A downstream CNN trained on the autoencoder's reconstructions of the real
private set therefore bounds what any DP recipe for the denoiser can reach with this
autoencoder (issue #15). Reconstructions use the posterior mean, as the latent cache of the
fine-tuning does (Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion
Models", CVPR 2022, judge their first stage the same way: reconstruction error of the frozen
autoencoder).

Nothing here writes a reconstructed private image anywhere: the grid a person looks at is
drawn from the (public) test set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpfl.shared.data.readers import ImageSet, to_model_tensor
from dpfl.shared.edge.grid import save_grid
from dpfl.shared.errors import ConfigError, DataError
from dpfl.shared.ldm.models import LatentDiffusion, crop_center

log = logging.getLogger(__name__)


@torch.no_grad()
def reconstruct(ldm: LatentDiffusion, data: ImageSet, batch_size: int = 256,
                progress: bool = False) -> tuple[ImageSet, np.ndarray]:
    """Encode (posterior mean) and decode every image of ``data``.

    Returns the reconstructions at the data's resolution, quantised to 8 bits like real
    images (and like :func:`~dpfl.shared.eval.evaluate.synthetic_set`), and the per-image mean
    squared error on the [0, 1] scale, measured before quantisation.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    h, w = data.images.shape[1:3]
    if h != w or h != ldm.spec.source_size:
        raise DataError(f"{data.source}: images are {w}x{h} pixels but the model's autoencoder "
                        f"reconstructs {ldm.spec.source_size}x{ldm.spec.source_size} images "
                        f"(source_size in its dpfl_ldm.json)")
    out, errors = [], []
    bar = tqdm(total=len(data), desc="reconstructing", unit="img", disable=not progress)
    for start in range(0, len(data), batch_size):
        part = data.subset(np.arange(start, min(start + batch_size, len(data))))
        x = to_model_tensor(part, ldm.spec.image_size, ldm.spec.channels)
        rec = crop_center(ldm.decode(ldm.encode(x, batch_size), batch_size), h)
        rec01 = (rec.clamp(-1, 1) + 1) / 2
        real01 = torch.from_numpy(np.ascontiguousarray(part.images)).permute(0, 3, 1, 2)
        errors.append(((rec01 - real01) ** 2).mean(dim=(1, 2, 3)).numpy())
        out.append((rec01 * 255).round().div(255).permute(0, 2, 3, 1).numpy())
        bar.update(len(part))
    bar.close()
    images = np.concatenate(out).astype(np.float32) if out else data.images[:0]
    mse = np.concatenate(errors) if errors else np.zeros(0)
    return (ImageSet(images, data.labels.copy(), data.class_names,
                     source=f"autoencoder reconstructions of {data.source}"), mse)


def mse_summary(mse: np.ndarray, data: ImageSet) -> dict[str, Any]:
    """Mean reconstruction MSE overall and per class (None for a class with no image)."""
    per_class = {name: (float(mse[data.labels == c].mean()) if (data.labels == c).any()
                        else None) for c, name in enumerate(data.class_names)}
    return {"mse": float(mse.mean()) if len(mse) else None, "mse_per_class": per_class,
            "images": int(len(mse))}


def reconstruction_grid(ldm: LatentDiffusion, data: ImageSet, path: str | Path,
                        per_class: int = 8, title: str | None = None) -> Path:
    """A PNG: for every class, a row of ``per_class`` images of ``data`` and below it the
    row of their reconstructions. Pass a public set (e.g. the test set), never private data."""
    rows, labels = [], []
    for c, name in enumerate(data.class_names):
        idx = np.flatnonzero(data.labels == c)[:per_class]
        if len(idx) < per_class:
            continue
        part = data.subset(idx)
        rec, _ = reconstruct(ldm, part)
        rows += [part.images, rec.images]
        labels += [name, "  recon."]
    if not rows:
        raise DataError(f"{data.source}: no class holds {per_class} images for the grid")
    images = np.concatenate(rows).transpose(0, 3, 1, 2) * 2 - 1
    return save_grid(images, path, nrow=per_class, row_labels=labels, title=title)
