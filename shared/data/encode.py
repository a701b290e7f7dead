"""A silo's latents: its images through the base model's frozen public encoder, once.

DP-LDM (Lyu et al., 2024) and DP-LoRA (Tsai et al., 2024) train in the latent space of an
autoencoder pretrained on public data; the encoder is frozen, so the silo is encoded once
before DP training (and, at a federated site, cached on the site's own disk).
"""

from __future__ import annotations

import logging

import torch

from dpfl.shared.data.readers import ImageSet, to_model_tensor
from dpfl.shared.errors import DataError
from dpfl.shared.ldm.models import LatentDiffusion

log = logging.getLogger(__name__)


def encode_silo(ldm: LatentDiffusion, imageset: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents (frozen public encoder, posterior mean) and labels of a silo; run once.

    Raises :class:`~dpfl.shared.errors.DataError` for an empty silo or a label outside the
    base model's classes; class names that differ from the base model's are matched by
    index, with a warning.
    """
    check_labels(ldm, imageset)
    x = to_model_tensor(imageset, ldm.spec.image_size, ldm.spec.channels)
    ldm.vae.requires_grad_(False)
    return ldm.encode(x).float().contiguous(), torch.from_numpy(imageset.labels).long()


def check_labels(ldm: LatentDiffusion, imageset: ImageSet) -> None:
    """The silo holds images, and its labels are classes of the base model."""
    n_cls = ldm.spec.num_classes
    if len(imageset) == 0:
        raise DataError(f"{imageset.source}: the silo holds no images; nothing to train on "
                        "(check the data path and that the class folders are not empty)")
    if int(imageset.labels.max()) >= n_cls:
        raise DataError(f"{imageset.source}: label {int(imageset.labels.max())} is out of range "
                        f"for the base model's {n_cls} classes {list(ldm.spec.class_names)}")
    names = tuple(imageset.class_names)
    if names[:n_cls] != tuple(ldm.spec.class_names[:len(names)]):
        log.warning("silo class names %s differ from the base model's %s; labels are matched "
                    "by index", imageset.class_names, ldm.spec.class_names)
