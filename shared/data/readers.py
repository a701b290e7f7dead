"""Image data readers: IDX (MNIST format), image folders, ``.npz``, DICOM (:mod:`.dicom`).

Every reader returns an :class:`ImageSet` (float images in [0, 1], integer labels, class
names). Unreadable files raise :class:`DataError` naming each file; with ``skip_bad=True``
they are left out, and the set records every skipped file and why.

:func:`fit_to_model` brings a set to the base model's image size under an explicit policy
(:data:`IMAGE_POLICIES`); :func:`to_model_tensor` then pads it into the model's canvas.
"""

from __future__ import annotations

import gzip
import logging
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from dpfl.shared.data.labels import folder_class_name
from dpfl.shared.defaults import DEFAULT_IMAGE_POLICY, IMAGE_POLICIES
from dpfl.shared.errors import ConfigError, DataError
from dpfl.shared.ldm.models import LDMSpec, pad_center

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIX = ".dcm"
#: how images whose size is not the base model's are fitted to it (:func:`fit_to_model`);
#: every ``--image-policy`` choice reads this


@dataclass
class ImageSet:
    """Images ``(N, H, W, C)`` float32 in [0, 1], labels ``(N,)`` int64, class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: what :func:`fit_to_model` did to the images after reading ("" when nothing)
    fitted: str = ""

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
                        source or self.source, fitted=self.fitted)


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
    classes = class_folders(root)
    files = [(f, label) for label, name in enumerate(classes)
             for f in sorted((root / name).iterdir())
             if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".")]
    return read_labelled(files, _read_image, _folder_classes(root, classes), str(root),
                         f"image folder {root}", skip_bad)


def class_folders(root: Path) -> list[str]:
    """The class sub-folders of ``root`` (sorted; hidden ones left out)."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders "
                        "(expected root/<class>/*.png)")
    return classes


def read_labelled(files: Sequence[tuple[Path, int]], read: Callable[[Path], np.ndarray],
                  class_names: tuple[str, ...], source: str, what: str,
                  skip_bad: bool = False) -> ImageSet:
    """Read each ``(file, label)`` with ``read`` (an ``(H, W, C)`` array in [0, 1]) into one
    :class:`ImageSet`. All images must share the first one's size and channels; a file that
    cannot be read or differs is named (all of them, 20 listed), or left out and recorded
    with ``skip_bad``. ``what`` names the set in messages (``image folder ROOT``)."""
    images: list[np.ndarray] = []
    labels, bad = [], []
    for f, label in files:
        try:
            arr = read(f)
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
        raise DataError(f"{len(bad)} unreadable image(s) in {source}:\n  {listing}{more}\n"
                        "Fix or remove them, or pass skip_bad (--skip-bad) to leave them out.")
    if bad:
        log.warning("skipped %d unreadable image(s) in %s: %s", len(bad), source,
                    ", ".join(p for p, _ in bad[:10]))
    if not images:
        raise DataError(f"{what} holds no readable images")
    return ImageSet(np.stack(images), np.asarray(labels, dtype=np.int64), class_names,
                    source=source, skipped=bad)


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


def read_any(path: str | Path, skip_bad: bool = False, window: str = "voi") -> ImageSet:
    """Dispatch on what ``path`` is: an image folder (PNG/JPEG, or DICOM files: ``.dcm`` or
    the ``DICM`` preamble), a ``.csv`` of ``file,label`` rows, an ``.npz``, or an IDX images
    file (labels beside it, ``*-images-idx3-ubyte[.gz]`` -> ``*-labels-idx1-ubyte[.gz]``).
    ``window``: how DICOM grey values are mapped (:func:`dpfl.shared.data.dicom.read_dicom_file`).
    """
    p = Path(path)
    if p.is_dir():
        if list(p.glob("*-images-idx3-ubyte*")):
            raise DataError(f"{p} holds IDX files; pass the images file itself")
        if holds_dicom(p):
            return _dicom().read_dicom_folder(p, skip_bad=skip_bad, window=window)
        return read_image_folder(p, skip_bad=skip_bad)
    if p.suffix.lower() == ".csv":
        return _dicom().read_labelled_csv(p, skip_bad=skip_bad, window=window)
    if p.suffix == ".npz":
        return read_npz(p)
    if "idx3-ubyte" in p.name:
        labels = p.with_name(p.name.replace("images-idx3", "labels-idx1"))
        return read_idx(p, labels)
    if not p.exists():
        raise DataError(f"data source {p} does not exist")
    if is_dicom_file(p):
        raise DataError(f"{p} is one DICOM file; pass a folder with one sub-folder per class "
                        "of DICOM files, or a .csv of 'file,label' rows naming them")
    raise DataError(f"cannot tell the format of {p}: pass an image folder (PNG/JPEG or DICOM), "
                    "a .csv of 'file,label' rows, a .npz file or an IDX images file "
                    "(*-images-idx3-ubyte[.gz])")


def _dicom() -> ModuleType:
    """:mod:`dpfl.shared.data.dicom`, which needs pydicom (the ``dicom`` extra)."""
    try:
        from dpfl.shared.data import dicom
    except ImportError as exc:
        raise DataError(f"reading DICOM needs pydicom, which is not installed ({exc}); install "
                        "it with: pip install 'dpfl[dicom]' (scripts/setup.sh does)") from exc
    return dicom


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble (``DICM`` at byte 128)."""
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def holds_dicom(root: Path) -> bool:
    """True when the files under ``root`` (any depth, hidden ones left out) are DICOM; a
    folder holding both DICOM files and PNG/JPEG images is refused, naming one of each."""
    dicom = image = None
    for f in sorted(root.rglob("*")):
        if any(part.startswith(".") for part in f.relative_to(root).parts) or not f.is_file():
            continue
        if f.suffix.lower() in IMAGE_SUFFIXES:
            image = image or f
        elif is_dicom_file(f):
            dicom = dicom or f
        if dicom and image:
            raise DataError(f"{root} holds both DICOM files ({dicom}) and PNG/JPEG images "
                            f"({image}); keep one kind per folder, or list them all in a .csv "
                            "of 'file,label' rows")
    return dicom is not None


# -- fitting images to the base model ------------------------------------------------------
def fit_to_model(data: ImageSet, spec: LDMSpec, policy: str = DEFAULT_IMAGE_POLICY) -> ImageSet:
    """``data`` at the size the base model was built for, ``spec.source_size``, under
    ``policy`` (one of :data:`IMAGE_POLICIES`); never a silent change.

    Images of ``source_size`` (padded to the canvas by design, e.g. 28 in 32) or already of
    the canvas ``image_size`` are returned as they are, whatever the policy. Any other size:

    * ``refuse`` (the default, :data:`DEFAULT_IMAGE_POLICY` says why): a :class:`DataError`
      naming the source, its size, the model's sizes and the choices;
    * ``resize``: the whole image scaled to ``source_size`` x ``source_size``; a non-square
      image is squashed (its aspect ratio is not kept);
    * ``center-crop``: the centre square (side: the shorter side) cut out, then scaled to
      ``source_size`` (a square image is only scaled).

    Scaling: bicubic, antialiased (as Pillow's), on the float values, clipped to [0, 1].
    What was done is logged and kept in :attr:`ImageSet.fitted`, for the run's records.
    """
    if policy not in IMAGE_POLICIES:
        raise ConfigError(f"image policy {policy!r} is not one of {list(IMAGE_POLICIES)}")
    h, w = data.images.shape[1:3]
    size, canvas = spec.source_size, spec.image_size
    if (h == w and h in (size, canvas)) or len(data) == 0:
        return data
    side = min(h, w)
    if policy == "refuse":
        model = f"takes at most {canvas}x{canvas}" if max(h, w) > canvas \
            else f"was built for {size}x{size}"
        raise DataError(
            f"{data.source}: images are {w}x{h} pixels but the model {model} ({size}x{size} "
            f"images, its source_size, in a {canvas}x{canvas} canvas). "
            f"Choose how to fit them with --image-policy: 'resize' scales them to {size}x{size}"
            f"{' (their aspect ratio is not kept)' if h != w else ''}, 'center-crop' cuts out "
            f"the centre {side}x{side} square and scales it to {size}x{size}; or resize them "
            "yourself")
    x = torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2)
    if policy == "center-crop" and h != w:
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, :, top:top + side, left:left + side]
        note = (f"center-crop: {len(data)} image(s) of {w}x{h} cut to their centre "
                f"{side}x{side}" + (f", then resized to {size}x{size}" if side != size else ""))
    else:
        note = (f"{policy}: {len(data)} image(s) resized from {w}x{h} to {size}x{size}"
                + (" (aspect ratio not kept)" if h != w else ""))
    if x.shape[-1] != size:
        x = _resize_square(x, size)
        note += " (bicubic, antialiased)"
    log.info("%s: image policy %s", data.source, note)
    images = x.clamp(0, 1).permute(0, 2, 3, 1).contiguous().numpy()
    return ImageSet(images, data.labels, data.class_names, data.source, data.skipped,
                    fitted=note)


def _resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size), bicubic with antialiasing, in chunks."""
    return torch.cat([torch.nn.functional.interpolate(chunk, size=(size, size), mode="bicubic",
                                                      antialias=True, align_corners=False)
                      for chunk in x.split(1024)])


def to_model_tensor(data: ImageSet, image_size: int, channels: int,
                    source_size: int | None = None) -> torch.Tensor:
    """Images -> float tensor (N, C, S, S) in [-1, 1], centred and padded with black.

    With ``source_size`` (the model's :attr:`~dpfl.shared.ldm.models.LDMSpec.source_size`)
    only images of that size (the designed pad) or of ``image_size`` are taken: any other
    size must pass :func:`fit_to_model` first, so nothing is padded without a word."""
    n, h, w, c = data.images.shape
    if c != channels:
        raise DataError(f"{data.source}: images have {c} channel(s) but the model expects "
                        f"{channels}; convert them (e.g. to "
                        f"{'grayscale' if channels == 1 else 'RGB'})")
    if h > image_size or w > image_size:
        raise DataError(f"{data.source}: images are {w}x{h} pixels but the model takes at most "
                        f"{image_size}x{image_size}; resize them first (--image-policy)")
    if source_size is not None and not (h == w and h in (source_size, image_size)):
        raise DataError(f"{data.source}: images are {w}x{h} pixels but the model was built "
                        f"for {source_size}x{source_size}; fit them first (--image-policy "
                        "resize or center-crop)")
    x = torch.from_numpy(np.ascontiguousarray(data.images)).permute(0, 3, 1, 2) * 2 - 1
    return pad_center(x, image_size).contiguous()
