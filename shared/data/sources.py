"""Naming a data source on the command line.

``fmnist:public`` / ``fmnist:private`` / ``fmnist:test`` select the standard Fashion-MNIST
split (optionally ``fmnist:private@SEED``); anything else is a path read by
:func:`dpfl.shared.data.readers.read_any` (image folder, ``.npz`` or IDX images file).
"""

from __future__ import annotations

from dpfl.shared.data.fmnist import standard_split
from dpfl.shared.data.readers import ImageSet, read_any
from dpfl.shared.errors import DataError


def load_source(spec: str, skip_bad: bool = False) -> ImageSet:
    if spec.startswith("fmnist:"):
        part, _, seed = spec[len("fmnist:"):].partition("@")
        if part not in ("public", "private", "test"):
            raise DataError(f"data source {spec!r}: use fmnist:public, fmnist:private or "
                            "fmnist:test")
        try:
            split = standard_split(int(seed) if seed else 0)
        except ValueError:
            raise DataError(f"data source {spec!r}: seed after '@' must be an integer") from None
        return getattr(split, part)
    return read_any(spec, skip_bad=skip_bad)
