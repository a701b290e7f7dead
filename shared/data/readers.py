"""Image data readers: IDX (MNIST format), image folders and ``.npz``.

Every reader returns an :class:`ImageSet` (float images in [0, 1], integer labels, class
names). Unreadable files raise :class:`DataError` naming each file; with ``skip_bad=True``
they are left out, and the set records every skipped file and why.
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dpfl.shared.data.labels import folder_class_name
from dpfl.shared.errors import DataError
from dpfl.shared.ldm.models import pad_center

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImageSet:
    """Images ``(N, H, W, C)`` float32 in [0, 1], labels ``(N,)`` int64, class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"{self.source}: images must be (N, H, W, C), got shape "
                            f"{self.images.shape}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.source}: {len(self.images)} images but "
                            f"{len(self.labels)} labels")
        n_cls = len(self.class_names)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= n_cls):
            bad = int(self.labels[(self.labels < 0) | (self.labels >= n_cls)][0])
            raise DataError(f"{self.source}: label {bad} out of range 0..{n_cls - 1} "
                            f"({n_cls} classes)")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray, source: str | None = None) -> ImageSet:
        return ImageSet(self.images[index], self.labels[index], self.class_names,
                        source or self.source)


# -- IDX -----------------------------------------------------------------------------------
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx_array(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped when its name ends in .gz)."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{path}: header promises shape {shape} ({expected} bytes) but the file "
                        f"holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def read_idx(images_path: str | Path, labels_path: str | Path,
             class_names: tuple[str, ...] | None = None) -> ImageSet:
    """An MNIST-format pair of IDX files -> :class:`ImageSet`. Without ``class_names`` the
    classes are named ``0``, ``1``, ...: the labels keep index semantics."""
    x = read_idx_array(images_path)
    y = read_idx_array(labels_path)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or y.ndim != 1:
        raise DataError(f"{images_path}: expected images (N, H, W) and labels (N,), got "
                        f"{x.shape} and {y.shape}")
    if class_names is None:
        class_names = tuple(str(i) for i in range(int(y.max()) + 1 if len(y) else 0))
    return ImageSet(_to_unit(x, str(images_path)), y.astype(np.int64), class_names,
                    source=str(images_path))


def _to_unit(x: np.ndarray, source: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if x.dtype == np.uint16:
        return x.astype(np.float32) / 65535.0
    if np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise DataError(f"{source}: float images must be finite and within [0, 1]")
        return x
    raise DataError(f"{source}: unsupported image dtype {x.dtype}; use uint8, uint16 or float")


# -- image folders -------------------------------------------------------------------------
def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float32)
                arr = arr / 65535.0 if mode.startswith("I;16") or arr.max() > 255 else arr / 255.0
                arr = arr[..., None]
            elif mode in ("L", "1", "P"):
                arr = np.asarray(im.convert("L"), dtype=np.float32)[..., None] / 255.0
            elif mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            elif mode == "LA":
                arr = np.asarray(im.convert("L"), dtype=np.float32)[..., None] / 255.0
            else:
                raise DataError(f"{path}: unsupported image mode {mode!r}")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from exc
    return np.clip(arr, 0.0, 1.0)


def read_image_folder(root: str | Path, skip_bad: bool = False) -> ImageSet:
    """A folder with one sub-folder per class of PNG/JPEG images -> :class:`ImageSet`.

    Class names are the sub-folders' names, percent-decoded (``T-shirt%2Ftop`` is the class
    ``T-shirt/top``), in sorted folder order; labels index them.

    All images must share one size and channel count. 8- and 16-bit grayscale and RGB are
    read; 16-bit values keep their precision in the float result.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders "
                        "(expected root/<class>/*.png)")
    images, labels, bad = [], [], []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES or f.name.startswith("."):
                continue
            try:
                arr = _read_image(f)
                if images and arr.shape != images[0].shape:
                    raise DataError(f"{f}: image is {arr.shape[1]}x{arr.shape[0]} with "
                                    f"{arr.shape[2]} channel(s), but earlier images are "
                                    f"{images[0].shape[1]}x{images[0].shape[0]} with "
                                    f"{images[0].shape[2]}")
            except DataError as exc:
                bad.append((str(f), str(exc)))
                continue
            images.append(arr)
            labels.append(label)
    if bad and not skip_bad:
        listing = "\n  ".join(reason for _, reason in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise DataError(f"{len(bad)} unreadable image(s) in {root}:\n  {listing}{more}\n"
                        "Fix or remove them, or pass skip_bad (--skip-bad) to leave them out.")
    if bad:
        log.warning("skipped %d unreadable image(s) in %s: %s", len(bad), root,
                    ", ".join(p for p, _ in bad[:10]))
    if not images:
        raise DataError(f"image folder {root} holds no readable images")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64),
                    _folder_classes(root, classes), source=str(root), skipped=bad)


def _folder_classes(root: Path, folders: list[str]) -> tuple[str, ...]:
    """Class names of the sub-folders, percent-decoded (``T-shirt%2Ftop`` holds
    ``T-shirt/top``: :mod:`dpfl.shared.data.labels`)."""
    names = tuple(folder_class_name(f) for f in folders)
    if len(set(names)) < len(names):
        dup = sorted(n for n in set(names) if names.count(n) > 1)
        raise DataError(f"image folder {root}: several sub-folders decode to the class(es) "
                        f"{dup} ({folders}); keep one folder per class")
    return names


# -- npz -----------------------------------------------------------------------------------
def read_npz(path: str | Path) -> ImageSet:
    """``.npz`` with ``images`` (N, H, W[, C]) and ``labels`` (N,), optional ``class_names``
    (matched to the base model's by name; without them the classes are named ``0``, ``1``,
    ... and keep index semantics, :mod:`dpfl.shared.data.labels`).

    Loaded with ``allow_pickle=False``: object arrays are refused, never unpickled.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            if "images" not in keys or "labels" not in keys:
                raise DataError(f"{path}: needs arrays 'images' and 'labels', found {sorted(keys)}")
            x, y = z["images"], z["labels"]
            names = tuple(str(s) for s in z["class_names"]) if "class_names" in keys else None
    except FileNotFoundError:
        raise DataError(f"npz file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read npz file {path}: {exc}") from exc
    if x.ndim == 3:
        x = x[..., None]
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: 'labels' must be a 1-D integer array, got {y.dtype} {y.shape}")
    if names is None:
        names = tuple(str(i) for i in range(int(y.max()) + 1 if len(y) else 0))
    return ImageSet(_to_unit(x, str(path)), y.astype(np.int64), names, source=str(path))


def write_npz(path: str | Path, data: ImageSet) -> None:
    """Save an :class:`ImageSet` as uint8 ``.npz`` readable by :func:`read_npz`."""
    x = np.round(data.images * 255).astype(np.uint8)
    np.savez_compressed(path, images=x, labels=data.labels,
                        class_names=np.asarray(data.class_names, dtype=str))


def read_any(path: str | Path, skip_bad: bool = False) -> ImageSet:
    """Dispatch on what ``path`` is: an image folder, an ``.npz``, or an IDX images file
    (labels beside it, ``*-images-idx3-ubyte[.gz]`` -> ``*-labels-idx1-ubyte[.gz]``)."""
    p = Path(path)
    if p.is_dir():
        if list(p.glob("*-images-idx3-ubyte*")):
            raise DataError(f"{p} holds IDX files; pass the images file itself")
        return read_image_folder(p, skip_bad=skip_bad)
    if p.suffix == ".npz":
        return read_npz(p)
    if "idx3-ubyte" in p.name:
        labels = p.with_name(p.name.replace("images-idx3", "labels-idx1"))
        return read_idx(p, labels)
    if not p.exists():
        raise DataError(f"data source {p} does not exist")
    raise DataError(f"cannot tell the format of {p}: pass an image folder, a .npz file or an "
                    "IDX images file (*-images-idx3-ubyte[.gz])")


def to_model_tensor(data: ImageSet, image_size: int, channels: int) -> torch.Tensor:
    """Images -> float tensor (N, C, S, S) in [-1, 1], centred and padded with black."""
    n, h, w, c = data.images.shape
    if c != channels:
        raise DataError(f"{data.source}: images have {c} channel(s) but the model expects "
                        f"{channels}; convert them (e.g. to "
                        f"{'grayscale' if channels == 1 else 'RGB'})")
    if h > image_size or w > image_size:
        raise DataError(f"{data.source}: images are {w}x{h} pixels but the model takes at most "
                        f"{image_size}x{image_size}; resize them first")
    x = torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2) * 2 - 1
    return pad_center(x, image_size).contiguous()
