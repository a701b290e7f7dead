"""A silo's latents: its images through the base model's frozen public encoder, once.

DP-LDM (Lyu et al., 2024) and DP-LoRA (Tsai et al., 2024) train in the latent space of an
autoencoder pretrained on public data; the encoder is frozen, so the silo is encoded once
before DP training (and, at a federated site, cached on the site's own disk).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from dpfl.shared.data.labels import class_index
from dpfl.shared.data.readers import ImageSet, to_model_tensor
from dpfl.shared.errors import DataError
from dpfl.shared.ldm.models import LatentDiffusion

log = logging.getLogger(__name__)


def encode_silo(ldm: LatentDiffusion, imageset: ImageSet,
                label_map: Mapping[str, str] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (frozen public encoder, posterior mean) and labels of a silo; run once.

    The labels returned are the base model's class indices, matched by class name
    (:func:`base_labels`). Raises :class:`~dpfl.shared.errors.DataError` for an empty silo or
    a class that matches none of the base model's.
    """
    labels = base_labels(ldm, imageset, label_map)
    # images of another size must have been fitted (readers.fit_to_model): never a silent pad
    x = to_model_tensor(imageset, ldm.spec.image_size, ldm.spec.channels,
                        source_size=ldm.spec.source_size)
    ldm.vae.requires_grad_(False)
    return ldm.encode(x).float().contiguous(), torch.from_numpy(labels).long()


def base_labels(ldm: LatentDiffusion, imageset: ImageSet,
                label_map: Mapping[str, str] | None = None) -> np.ndarray:
    """The silo's labels as the base model's class indices, each silo class matched to a
    base class by name or label map (:mod:`dpfl.shared.data.labels`), never by position."""
    if len(imageset) == 0:
        raise DataError(f"{imageset.source}: the silo holds no images; nothing to train on "
                        "(check the data path and that the class folders are not empty)")
    index = class_index(imageset.class_names, np.unique(imageset.labels),
                        ldm.spec.class_names, label_map, imageset.source)
    matched = {n: ldm.spec.class_names[j] for n, j in zip(imageset.class_names, index)
               if j >= 0}
    if any(n != b for n, b in matched.items()):
        log.info("%s: silo classes matched to the base model's: %s", imageset.source, matched)
    return index[imageset.labels]


def in_base_classes(ldm: LatentDiffusion, imageset: ImageSet,
                    label_map: Mapping[str, str] | None = None) -> ImageSet:
    """The silo with its labels and class names those of the base model
    (:func:`base_labels`): refused here, before anything is trained or spent."""
    return ImageSet(imageset.images, base_labels(ldm, imageset, label_map),
                    tuple(ldm.spec.class_names), imageset.source, imageset.skipped)
