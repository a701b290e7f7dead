"""DICOM images (pydicom): a folder of class sub-folders, or a ``.csv`` of ``file,label`` rows.

What is read: single-frame images, MONOCHROME1/MONOCHROME2 (one channel) and RGB, YBR_FULL,
YBR_FULL_422 (three channels, converted to RGB by pydicom), 8 or 16 bits allocated, signed or
unsigned, in any transfer syntax pydicom can decode with what is installed (here: the
uncompressed ones, Deflated, RLE Lossless natively; JPEG Baseline/Extended 8-bit and JPEG 2000
through Pillow). Everything else is refused by name, naming the file: a transfer syntax with no
decoder installed (its name, and what to install), a multi-frame file ("multi-frame with N
frames": a file is one example in DP-SGD's accounting, so a file's frames are not split into
several examples), another photometric interpretation, missing pixel data.

Grey values (:func:`read_dicom_file`): the Modality LUT or rescale slope/intercept first
(pydicom's ``apply_modality_lut``: Hounsfield units for CT); then ``window="voi"`` applies the
file's VOI LUT or window centre/width (``apply_voi_lut``, what a radiologist is shown), and
``window="none"`` keeps the modality values. Either way the values are scaled to [0, 1] by the
range they can take, the stored bit range (Bits Stored, Pixel Representation) through the
rescale (after a VOI LUT: its output range), never by each image's own minimum and maximum:
the same tissue keeps the same grey value in every image and at every site, and a nearly
uniform image is not stretched into full-contrast noise. MONOCHROME1 is inverted, so that a
higher value is always brighter.

No patient data in messages: each file is read with only its image tags
(``dcmread(specific_tags=...)``), so header values such as PatientName, PatientID or dates are
never parsed, and no log line, exception or :class:`ImageSet` field can carry them; messages
name file paths (which stay at the site) and image attributes (transfer syntax, photometric
interpretation, bits, frames).
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import UID

from dpfl.shared.data.readers import (
    IMAGE_SUFFIXES,
    ImageSet,
    _folder_classes,
    _read_image,
    class_folders,
    is_dicom_file,
    read_labelled,
)
from dpfl.shared.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: how grey values are mapped (:func:`read_dicom_file`); the first is the default
WINDOWS = ("voi", "none")
#: photometric interpretation -> channels read
PHOTOMETRIC = {"MONOCHROME1": 1, "MONOCHROME2": 1, "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3}
#: the only tags read from a file: what decoding and grey values need, nothing about patients
IMAGE_TAGS = ["SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
              "NumberOfFrames", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
              "PixelRepresentation", "RescaleIntercept", "RescaleSlope", "RescaleType",
              "ModalityLUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
              "VOILUTSequence", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
              "PixelData"]
#: the media index of a DICOM export: a DICOM file without an image, left out of folders
DICOMDIR = "DICOMDIR"


def read_dicom_file(path: str | Path, window: str = "voi") -> np.ndarray:
    """One single-frame DICOM image -> ``(H, W, C)`` float32 in [0, 1] (module docstring:
    what is read, how grey values are scaled). ``window``: ``"voi"`` applies the file's VOI
    LUT or window centre/width when it has one (a file without either is scaled as with
    ``"none"``); ``"none"`` keeps the modality values."""
    if window not in WINDOWS:
        raise ConfigError(f"DICOM window {window!r} is not one of {list(WINDOWS)}")
    path = Path(path)
    ds = _open(path)
    _check(ds, path)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # a decoder's failure, whatever its type
        # the dataset holds only image tags: the decoder's reason can name nothing else
        raise DataError(f"{path}: cannot decode its pixel data "
                        f"({ds.file_meta.TransferSyntaxUID.name}): {exc}") from exc
    if PHOTOMETRIC[str(ds.PhotometricInterpretation)] == 3:
        x = arr.astype(np.float64) / (2 ** int(ds.BitsStored) - 1)
    else:
        x = _grey(ds, arr, window, path)[..., None]
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _open(path: Path) -> Dataset:
    """The file's image tags; pydicom's own message is not repeated (it may quote bytes
    of the file)."""
    try:
        return pydicom.dcmread(path, specific_tags=IMAGE_TAGS)
    except FileNotFoundError:
        raise DataError(f"{path}: file does not exist") from None
    except InvalidDicomError:
        raise DataError(f"{path}: not a DICOM file (no 'DICM' preamble and file meta "
                        "information); remove it, or convert it to a DICOM Part 10 file") \
            from None
    except Exception as exc:  # a parser's failure on a damaged file, whatever its type
        raise DataError(f"{path}: cannot read it as DICOM ({type(exc).__name__}); the file "
                        "may be truncated or damaged") from None


def _check(ds: Dataset, path: Path) -> None:
    """Refuse, by name, what :func:`read_dicom_file` does not read."""
    if "PixelData" not in ds:
        raise DataError(f"{path}: holds no pixel data (no (7FE0,0010) Pixel Data element), "
                        "so it is not an image (a report, a DICOMDIR?); remove it from the "
                        "silo")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is None:
        raise DataError(f"{path}: its file meta information names no transfer syntax; "
                        "rewrite the file with one (e.g. Explicit VR Little Endian)")
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise DataError(f"{path}: transfer syntax {_named(syntax)} is not supported: "
                        "pydicom has no decoder for it; convert the file to an uncompressed "
                        "transfer syntax (e.g. 'gdcmconv --raw' or dcmtk's 'dcmdjpeg')") from None
    if not decoder.is_available:
        need = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise DataError(f"{path}: transfer syntax {_named(syntax)} is not supported "
                        f"here: no decoder for it is installed (pydicom needs one of: {need}); "
                        "install one, or convert the file to an uncompressed transfer syntax")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise DataError(f"{path}: its Number of Frames is not a number") from None
    if frames > 1:
        raise DataError(f"{path}: multi-frame with {frames} frames is not supported: a file is "
                        "one training example (one record in the privacy accounting); export "
                        "one frame per file")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in PHOTOMETRIC:
        raise DataError(f"{path}: photometric interpretation {photometric or 'missing'!r} is not "
                        f"supported; use one of {sorted(PHOTOMETRIC)}")
    bits = ds.get("BitsAllocated")
    if bits not in (8, 16):
        raise DataError(f"{path}: {bits} bits allocated per sample is not supported; 8 or 16 "
                        "(8-16 bits stored) are")


def _named(syntax: UID) -> str:
    """A transfer syntax's name and UID (only the UID when pydicom knows no name)."""
    return syntax if syntax.name == str(syntax) else f"{syntax.name} ({syntax})"


def _grey(ds: Dataset, arr: np.ndarray, window: str, path: Path) -> np.ndarray:
    """Monochrome stored values -> [0, 1]: modality LUT/rescale, the VOI when asked and
    present, scaled by the range the values can take; MONOCHROME1 inverted."""
    values = apply_modality_lut(arr, ds)
    low, high = _modality_range(ds)
    if window == "voi" and _has_voi_lut(ds):
        if np.all(values == np.round(values)):  # a VOI LUT indexes with integers
            values = values.astype(np.int64)
        values = apply_voi_lut(values, ds)
        low, high = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    elif window == "voi" and "WindowCenter" in ds and "WindowWidth" in ds:
        try:  # output range: the modality range, as pydicom's apply_windowing takes it
            values = apply_voi_lut(values, ds)
        except ValueError as exc:  # a window width < 1, an unknown VOI LUT function
            raise DataError(f"{path}: its window centre/width cannot be applied ({exc}); "
                            "correct the file's window or remove the file") from None
    elif window == "voi":
        log.debug("%s: no VOI LUT or window; scaled by its stored bit range", path)
    if high <= low:
        raise DataError(f"{path}: its rescale maps every stored value to {low}; nothing to see")
    x = (np.asarray(values, dtype=np.float64) - low) / (high - low)
    return 1.0 - x if ds.PhotometricInterpretation == "MONOCHROME1" else x


def _modality_range(ds: Dataset) -> tuple[float, float]:
    """The values the Modality LUT or rescale can give: a LUT's output depth, else the stored
    bit range (Bits Stored, signed or not) through slope and intercept."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    bits = int(ds.BitsStored)
    stored = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation == 1 \
        else (0, 2 ** bits - 1)
    ends = apply_modality_lut(np.asarray(stored, dtype=np.float64), ds)
    return float(ends.min()), float(ends.max())


def _has_voi_lut(ds: Dataset) -> bool:
    """A usable VOI LUT Sequence (pydicom prefers it to the window when both are given)."""
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def read_dicom_folder(root: str | Path, skip_bad: bool = False, window: str = "voi"
                      ) -> ImageSet:
    """A folder with one sub-folder per class of DICOM files -> :class:`ImageSet`.

    Class names are the sub-folders' names, percent-decoded as for image folders
    (:func:`~dpfl.shared.data.readers.read_image_folder`). A class folder's DICOM files
    (``.dcm``, or any file with the ``DICM`` preamble) are read at any depth (exports nest
    patient/study/series folders), in sorted path order; ``DICOMDIR`` index files and hidden
    files are left out. All images must share one size and channel count. ``window``:
    :func:`read_dicom_file`.
    """
    root = Path(root)
    try:
        classes = class_folders(root)
    except DataError as exc:
        if root.is_dir():  # DICOM files without class sub-folders: labels must come from a CSV
            raise DataError(f"{exc}; or list the DICOM files with their labels in a .csv of "
                            "'file,label' rows and pass that") from None
        raise
    files = [(f, label) for label, name in enumerate(classes)
             for f in sorted((root / name).rglob("*"))
             if f.is_file() and f.name != DICOMDIR and is_dicom_file(f)
             and not any(p.startswith(".") for p in f.relative_to(root).parts)]
    return read_labelled(files, lambda f: read_dicom_file(f, window),
                         _folder_classes(root, classes), str(root), f"DICOM folder {root}",
                         skip_bad)


def read_labelled_csv(path: str | Path, skip_bad: bool = False, window: str = "voi"
                      ) -> ImageSet:
    """A ``.csv`` of ``file,label`` rows -> :class:`ImageSet`.

    ``file``: a DICOM file, or a PNG/JPEG image (read as in image folders), relative to the
    CSV's folder unless absolute; ``label``: its class name, exactly as written (no percent
    decoding; spaces around either field are ignored). A first row ``file,label`` is a header.
    Class names are the labels in sorted order. A file named twice, a row without two fields
    or with an empty one is refused, naming the line. ``window``: :func:`read_dicom_file`.
    """
    path = Path(path)
    rows = _csv_rows(path)
    classes = tuple(sorted({label for _, label in rows}))
    index = {name: i for i, name in enumerate(classes)}
    files = [(f, index[label]) for f, label in rows]
    return read_labelled(files, lambda f: _read_listed(f, window), classes, str(path),
                         f"CSV file {path}", skip_bad)


def _read_listed(path: Path, window: str) -> np.ndarray:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _read_image(path)
    return read_dicom_file(path, window)


def _csv_rows(path: Path) -> list[tuple[Path, str]]:
    """(file, label) of each row of a labels CSV, files resolved against its folder."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            lines = list(csv.reader(fh, skipinitialspace=True))
    except FileNotFoundError:
        raise DataError(f"CSV file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read CSV file {path} ({exc}); it must be UTF-8 text of "
                        "'file,label' rows") from exc
    rows: list[tuple[Path, str]] = []
    seen: dict[Path, int] = {}
    for number, fields in enumerate(lines, start=1):
        fields = [f.strip() for f in fields]
        if not any(fields):
            continue
        if number == 1 and [f.lower() for f in fields] == ["file", "label"]:
            continue
        if len(fields) != 2 or not all(fields):
            raise DataError(f"{path}, line {number}: expected 'file,label' (two non-empty "
                            f"fields), got {len(fields)} field(s)")
        file = path.parent / fields[0]
        if file in seen:
            raise DataError(f"{path}, line {number}: {file} is already listed on line "
                            f"{seen[file]}; list each file once")
        seen[file] = number
        rows.append((file, fields[1]))
    if not rows:
        raise DataError(f"CSV file {path} lists no files; write one 'file,label' row per image")
    return rows
