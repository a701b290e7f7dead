"""Naming a data source on the command line.

``fmnist:public`` / ``fmnist:private`` / ``fmnist:test`` select the standard Fashion-MNIST
split (optionally ``fmnist:private@SEED``); anything else is a path read by
:func:`dpfl.shared.data.readers.read_any` (image folder of PNG/JPEG or DICOM files, ``.csv``
of ``file,label`` rows, ``.npz`` or IDX images file).

The split's seed decides which images are public, so private data must come from the split
whose public part trained the base model (its model card's ``data``, e.g. ``fmnist:public``
is seed 0): given a base model's card, ``fmnist:private`` resolves to that seed and another
``@SEED`` is refused (:func:`tie_split`); another seed's private part holds images the base
model saw.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpfl.shared.data.fmnist import standard_split
from dpfl.shared.data.readers import ImageSet, read_any
from dpfl.shared.errors import DataError, ModelError
from dpfl.shared.ldm.models import CARD_FILE

FMNIST = "fmnist:"


def parse_fmnist(spec: str) -> tuple[str, int | None]:
    """``fmnist:PART[@SEED]`` -> (part, seed or None when not given)."""
    part, at, seed = spec[len(FMNIST):].partition("@")
    if part not in ("public", "private", "test"):
        raise DataError(f"data source {spec!r}: use fmnist:public, fmnist:private or "
                        "fmnist:test")
    if not at:
        return part, None
    try:
        return part, int(seed)
    except ValueError:
        raise DataError(f"data source {spec!r}: seed after '@' must be an integer") from None


def pretrain_split_seed(card: Mapping[str, Any]) -> int | None:
    """Seed of the standard split whose public part trained the base model with ``card``
    (its ``data``: ``fmnist:public`` is seed 0, ``fmnist:public@3`` seed 3); ``None`` when
    the card names other data, or none."""
    data = str(card.get("data") or "")
    if not data.startswith(FMNIST):
        return None
    part, seed = parse_fmnist(data)
    return (seed or 0) if part == "public" else None


def tie_split(spec: str, base_card: Mapping[str, Any] | None) -> int:
    """The split seed to read ``spec`` (an ``fmnist:`` source) with, for training against
    the base model with ``base_card``: the private part must be the base model's split."""
    part, seed = parse_fmnist(spec)
    card = base_card or {}
    public_seed = pretrain_split_seed(card)
    if part != "private" or public_seed is None:
        return seed or 0
    if seed is not None and seed != public_seed:
        raise DataError(
            f"data source {spec!r}: the base model was pretrained on "
            f"{card.get('data')!r} (its model card), the public part of the split with "
            f"seed {public_seed}; the private part of seed {seed} holds images the base model "
            f"saw. Use fmnist:private@{public_seed} (or fmnist:private, which follows the "
            "base model's card)")
    return public_seed


def model_card(model_dir: str | Path) -> dict[str, Any]:
    """A base model directory's ``model_card.json`` ({} when it has none)."""
    path = Path(model_dir) / CARD_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"model card {path} is unreadable ({exc}); restore the base "
                         "model directory") from exc


def load_source(spec: str, skip_bad: bool = False,
                base_card: Mapping[str, Any] | None = None, window: str = "voi") -> ImageSet:
    """Read ``spec``; ``base_card``: the card of the base model it will train, which ties
    ``fmnist:private`` to the base model's split (:func:`tie_split`); ``window``: how DICOM
    grey values are mapped (:func:`dpfl.shared.data.dicom.read_dicom_file`).

    The images come as read: bring them to the base model's size with
    :func:`dpfl.shared.data.readers.fit_to_model` (the ``--image-policy`` of the commands
    that train) before encoding them."""
    if spec.startswith(FMNIST):
        part, _ = parse_fmnist(spec)
        return getattr(standard_split(tie_split(spec, base_card)), part)
    return read_any(spec, skip_bad=skip_bad, window=window)
