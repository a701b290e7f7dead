"""DICOM silos (pydicom): grey values, colour, labels from folders or a CSV, refusals by
name, and no patient data in any message. Files are pydicom's bundled test files (never
downloaded) and DICOMs written here with pydicom."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import (  # noqa: E402
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
)

from dpfl.shared.data.dicom import (  # noqa: E402
    read_dicom_file,
    read_dicom_folder,
    read_labelled_csv,
)
from dpfl.shared.data.readers import read_any  # noqa: E402
from dpfl.shared.errors import ConfigError, DataError  # noqa: E402

PHI_NAME = "Doe^Jane^Q7PHI"
PHI_ID = "PHIID-90210"
PHI_DATE = "19451231"
PHI_BAD_DATE = "PHIDATE-7"
PHI = (PHI_NAME, "Doe", "Q7PHI", PHI_ID, PHI_DATE, PHI_BAD_DATE, "Springfield General")


def write_dicom(path: Path, pixels: np.ndarray | None, photometric: str = "MONOCHROME2",
                bits_stored: int | None = None, **tags) -> Path:
    """A DICOM Part 10 file (Explicit VR Little Endian) with patient data in its header."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PatientName = PHI_NAME
    ds.PatientID = PHI_ID
    ds.PatientBirthDate = PHI_DATE
    ds.InstitutionName = "Springfield General"
    with warnings.catch_warnings():  # pydicom warns, here in the test, of the invalid date
        warnings.simplefilter("ignore")
        ds.add_new(0x00080020, "DA", PHI_BAD_DATE)  # StudyDate
    if pixels is not None:
        ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for key, value in tags.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def bundled(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's bundled test file {name} is missing")
    return path


# -- grey values ---------------------------------------------------------------------------
def test_16_bit_values_keep_their_precision(tmp_path):
    v = np.arange(0, 65536, 257, dtype=np.uint16)[:256].reshape(16, 16)
    x = read_dicom_file(write_dicom(tmp_path / "a.dcm", v), window="none")
    assert x.shape == (16, 16, 1) and x.dtype == np.float32
    np.testing.assert_array_equal(np.round(x[..., 0] * 65535).astype(np.uint16), v)
    assert len(np.unique(x)) == 256


def test_rescale_slope_intercept_on_signed_12_bit(tmp_path):
    v = np.array([[-2048, -1], [0, 2047]], dtype=np.int16)
    path = write_dicom(tmp_path / "s.dcm", v, bits_stored=12, RescaleSlope=2,
                       RescaleIntercept=-1000)
    x = read_dicom_file(path, window="voi")[..., 0]  # no window in the file: stored range
    # modality values 2v - 1000 in [-5096, 3094], the stored 12-bit range through the rescale
    expected = (2 * v.astype(np.float64) - 1000 + 5096) / 8190
    np.testing.assert_allclose(x, expected, atol=1e-7)
    assert x[0, 0] == 0 and x[1, 1] == 1 and abs(x[1, 0] - 4096 / 8190) < 1e-7


def _ct(tmp_path: Path, photometric: str = "MONOCHROME2", **tags) -> Path:
    hu = np.array([[-1000, 40], [140, 500]], dtype=np.int16)
    return write_dicom(tmp_path / f"{photometric}.dcm", (hu + 1024).astype(np.uint16),
                       photometric, RescaleSlope=1, RescaleIntercept=-1024, **tags)


def test_window_centre_width_is_applied_by_choice(tmp_path):
    path = _ct(tmp_path, WindowCenter=40, WindowWidth=400)
    x = read_dicom_file(path, window="voi")[..., 0]
    # DICOM's LINEAR window (PS3.3 C.11.2.1.2.1): c' = 39.5, w' = 399
    np.testing.assert_allclose(x, [[0.0, 0.5 / 399 + 0.5], [100.5 / 399 + 0.5, 1.0]],
                               atol=1e-6)
    raw = read_dicom_file(path, window="none")[..., 0]  # HU + 1024 over the 16-bit range
    np.testing.assert_allclose(raw, [[24 / 65535, 1064 / 65535], [1164 / 65535, 1524 / 65535]],
                               atol=1e-7)
    with pytest.raises(ConfigError, match="window 'auto' is not one of"):
        read_dicom_file(path, window="auto")


def test_monochrome1_is_inverted_so_that_higher_is_brighter(tmp_path):
    for window, tags in (("none", {}), ("voi", {"WindowCenter": 40, "WindowWidth": 400})):
        mono2 = read_dicom_file(_ct(tmp_path / window, **tags), window)
        mono1 = read_dicom_file(_ct(tmp_path / window, "MONOCHROME1", **tags), window)
        np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-7)


def test_rgb_8_and_16_bit(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = read_dicom_file(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
    assert x.shape == (5, 7, 3)
    np.testing.assert_allclose(x, rgb / 255, atol=1e-7)
    deep = (rgb.astype(np.uint16) * 257 + 1).astype(np.uint16)
    x16 = read_dicom_file(write_dicom(tmp_path / "rgb16.dcm", deep, "RGB"))
    np.testing.assert_array_equal(np.round(x16 * 65535).astype(np.uint16), deep)


def test_pydicoms_bundled_files():
    ct = bundled("CT_small.dcm")  # signed 16-bit, intercept -1024, no window
    raw = pydicom.dcmread(ct).pixel_array.astype(np.float64)
    np.testing.assert_allclose(read_dicom_file(ct)[..., 0], (raw + 32768) / 65535, atol=1e-6)
    mr = read_dicom_file(bundled("MR_small.dcm"))  # window 600 / 1600
    assert mr.shape == (64, 64, 1) and mr.max() == 1.0 and mr.min() > 0.2
    rle = read_dicom_file(bundled("MR_small_RLE.dcm"))  # RLE Lossless, pydicom's own decoder
    np.testing.assert_array_equal(rle, mr)
    odd = read_dicom_file(bundled("SC_rgb_small_odd.dcm"))
    assert odd.shape == (3, 3, 3)


def test_jpeg_baseline_decodes_through_pillow_when_available():
    if not get_decoder(JPEGBaseline8Bit).is_available:
        pytest.skip("no JPEG Baseline decoder installed")
    jpeg = read_dicom_file(bundled("SC_rgb_jpeg_dcmtk.dcm"))  # YBR_FULL -> RGB
    lossless = read_dicom_file(bundled("SC_rgb_rle.dcm"))  # the same picture, RLE
    assert jpeg.shape == lossless.shape == (100, 100, 3)
    assert np.abs(jpeg - lossless).mean() < 0.02


# -- labels --------------------------------------------------------------------------------
def _grey(value: int, side: int = 4) -> np.ndarray:
    return np.full((side, side), value, dtype=np.uint16)


def test_folder_labels_any_depth_percent_decoded(tmp_path):
    root = tmp_path / "silo"
    write_dicom(root / "T-shirt%2Ftop" / "p1" / "study" / "a.dcm", _grey(100))
    write_dicom(root / "T-shirt%2Ftop" / "b", _grey(200))  # no suffix: the DICM preamble
    write_dicom(root / "Trouser" / "c.dcm", _grey(300))
    (root / "Trouser" / "notes.txt").write_text("not an image")
    write_dicom(root / "Trouser" / ".hidden.dcm", _grey(1))
    write_dicom(root / "Trouser" / "DICOMDIR", None)  # the export's index: no pixels
    ds = read_any(root)
    assert ds.class_names == ("T-shirt/top", "Trouser") and ds.source == str(root)
    assert list(ds.labels) == [0, 0, 1]
    np.testing.assert_allclose(ds.images[:, 0, 0, 0], [200 / 65535, 100 / 65535, 300 / 65535])
    assert ds.images.shape == (3, 4, 4, 1) and ds.skipped == []


def test_csv_labels_relative_to_the_csv(tmp_path):
    def byte(value):
        return np.full((8, 8), value, np.uint8)

    write_dicom(tmp_path / "data" / "x1.dcm", byte(10))
    write_dicom(tmp_path / "data" / "x2.dcm", byte(20))
    Image.fromarray(byte(30)).save(tmp_path / "data" / "x3.png")
    absolute = write_dicom(tmp_path / "elsewhere" / "x4.dcm", byte(40))
    csv = tmp_path / "data" / "labels.csv"
    csv.write_text(f"file,label\nx1.dcm, Pullover\nx2.dcm,Bag\n\nx3.png,Pullover\n"
                   f"{absolute},Ankle boot\n")
    ds = read_any(csv)
    assert ds.class_names == ("Ankle boot", "Bag", "Pullover") and ds.source == str(csv)
    assert list(ds.labels) == [2, 1, 2, 0]
    np.testing.assert_allclose(ds.images[:, 0, 0, 0], np.array([10, 20, 30, 40]) / 255, atol=1e-7)


@pytest.mark.parametrize("text, expected", [
    ("a.dcm,x\na.dcm,y\n", r"line 2: .*a\.dcm is already listed on line 1"),
    ("a.dcm\n", r"line 1: expected 'file,label' \(two non-empty fields\), got 1 field"),
    ("a.dcm,\n", r"line 1: expected 'file,label'"),
    ("file,label\n", "lists no files"),
], ids=["twice", "one-field", "empty-label", "header-only"])
def test_csv_rows_are_checked(tmp_path, text, expected):
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(DataError, match=expected):
        read_labelled_csv(tmp_path / "l.csv")


def test_csv_missing_file_is_named_or_skipped(tmp_path):
    write_dicom(tmp_path / "a.dcm", _grey(5))
    (tmp_path / "l.csv").write_text("a.dcm,x\ngone.dcm,y\n")
    with pytest.raises(DataError, match=r"(?s)1 unreadable image\(s\).*gone\.dcm: file does not "
                                        r"exist"):
        read_labelled_csv(tmp_path / "l.csv")
    ds = read_labelled_csv(tmp_path / "l.csv", skip_bad=True)
    assert len(ds) == 1 and ds.skipped[0][0] == str(tmp_path / "gone.dcm")


# -- refusals ------------------------------------------------------------------------------
def _compressed(tmp_path: Path, syntax) -> Path:
    path = write_dicom(tmp_path / "c.dcm", _grey(7))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8 not really compressed \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("case, expected", [
    ("jpeg-ls", r"transfer syntax JPEG-LS Lossless Image Compression \(1\.2\.840\.10008\.1\.2\."
                r"4\.80\) is not supported here: no decoder for it is installed"),
    ("private", r"transfer syntax 1\.2\.826\.0\.1\.3680043\.9\.9999\.1 .*is not supported: "
                r"pydicom has no decoder for it"),
    ("bundled-jpeg-ls", r"JPEG-LS Lossy \(Near-Lossless\) Image Compression .*not supported "
                        r"here"),
    ("multi-frame", r"multi-frame with 3 frames is not supported"),
    ("bundled-multi-frame", r"multi-frame with 15 frames"),
    ("no-pixels", r"holds no pixel data"),
    ("palette", r"photometric interpretation 'PALETTE COLOR' is not supported"),
    ("truncated", r"cannot decode its pixel data \(Explicit VR Little Endian\): .*less than "
                  r"expected"),
    ("not-dicom", r"not a DICOM file"),
], ids=["jpeg-ls", "private", "bundled-jpeg-ls", "multi-frame", "bundled-multi-frame",
        "no-pixels", "palette", "truncated", "not-dicom"])
def test_refused_by_name_naming_the_file(tmp_path, case, expected):
    if case == "jpeg-ls":
        if get_decoder(JPEGLSLossless).is_available:
            pytest.skip("a JPEG-LS decoder is installed here")
        path = _compressed(tmp_path, JPEGLSLossless)
    elif case == "private":
        path = _compressed(tmp_path, pydicom.uid.UID("1.2.826.0.1.3680043.9.9999.1"))
    elif case == "bundled-jpeg-ls":
        if get_decoder(pydicom.uid.JPEGLSNearLossless).is_available:
            pytest.skip("a JPEG-LS decoder is installed here")
        path = bundled("JPEGLSNearLossless_08.dcm")
    elif case == "multi-frame":
        path = write_dicom(tmp_path / "m.dcm", np.zeros((3, 4, 4), np.uint16))
    elif case == "bundled-multi-frame":
        path = bundled("rtdose.dcm")
    elif case == "no-pixels":
        path = write_dicom(tmp_path / "n.dcm", None)
    elif case == "palette":
        path = bundled("examples_palette.dcm")
    elif case == "truncated":
        path = write_dicom(tmp_path / "t.dcm", _grey(9, 8))
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[:-16]
        ds.save_as(path, enforce_file_format=True)
    else:
        path = tmp_path / "x.dcm"
        path.write_bytes(b"this is no DICOM file")
    with pytest.raises(DataError, match=expected) as err:
        read_dicom_file(path)
    assert str(err.value).startswith(str(path))


def test_a_set_shares_one_size(tmp_path):
    root = tmp_path / "silo"
    write_dicom(root / "a" / "1.dcm", _grey(1, 4))
    write_dicom(root / "b" / "2.dcm", _grey(1, 6))
    with pytest.raises(DataError, match=r"2\.dcm: image is 6x6 with 1 channel\(s\), but earlier "
                                        r"images are 4x4"):
        read_dicom_folder(root)
    assert len(read_dicom_folder(root, skip_bad=True)) == 1


def test_read_any_explains_what_it_needs(tmp_path):
    one = write_dicom(tmp_path / "flat" / "one.dcm", _grey(1))
    with pytest.raises(DataError, match="is one DICOM file; pass a folder"):
        read_any(one)
    with pytest.raises(DataError, match=r"has no class sub-folders.*\.csv of 'file,label' rows"):
        read_any(tmp_path / "flat")
    mixed = tmp_path / "mixed"
    write_dicom(mixed / "a" / "1.dcm", _grey(1))
    (mixed / "b").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(mixed / "b" / "2.png")
    with pytest.raises(DataError, match=r"holds both DICOM files .* and PNG/JPEG images"):
        read_any(mixed)


# -- no patient data -----------------------------------------------------------------------
def _error_cases(tmp: Path) -> dict[str, Path]:
    ok = _grey(3, 8)
    cases = {
        "no-pixels": write_dicom(tmp / "no-pixels.dcm", None),
        "multi-frame": write_dicom(tmp / "multi.dcm", np.zeros((2, 8, 8), np.uint16)),
        "transfer-syntax": _compressed(tmp / "ts", JPEGLSLossless),
        "private-syntax": _compressed(tmp / "pts", pydicom.uid.UID("1.2.3.4.5.6")),
        "bits": write_dicom(tmp / "bits.dcm", ok, BitsAllocated=32, BitsStored=32, HighBit=31),
        "window": write_dicom(tmp / "window.dcm", ok, WindowCenter=10, WindowWidth=0),
    }
    truncated = write_dicom(tmp / "truncated.dcm", ok)
    ds = pydicom.dcmread(truncated)
    ds.PixelData = ds.PixelData[:-4]
    ds.save_as(truncated, enforce_file_format=True)
    cases["truncated"] = truncated
    damaged = write_dicom(tmp / "damaged.dcm", ok)
    damaged.write_bytes(damaged.read_bytes()[:300])  # cut inside the header
    cases["damaged"] = damaged
    return cases


def _texts(exc: BaseException) -> str:
    """An exception's text and that of every exception chained to it."""
    out = []
    seen: BaseException | None = exc
    while seen is not None:
        out.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return "\n".join(out)


def test_patient_data_appears_in_no_error_log_warning_or_field(tmp_path, caplog):
    cases = _error_cases(tmp_path / "bad")
    root = tmp_path / "silo"
    for i, value in enumerate((10, 20)):
        write_dicom(root / "Pullover" / f"{i}.dcm", _grey(value, 8), WindowCenter=40,
                    WindowWidth=400, RescaleSlope=1, RescaleIntercept=0)
    (root / "Bag").mkdir()
    for name, path in cases.items():  # the bad files in a silo, read as a folder and a CSV
        (root / "Bag" / f"{name}.dcm").write_bytes(path.read_bytes())
    csv = root / "labels.csv"
    csv.write_text("".join(f"{p.relative_to(root)},Bag\n" for p in sorted(root.rglob("*.dcm"))))
    said: list[str] = []
    caplog.clear()  # writing the files above logged pydicom's warning of the invalid date
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, path in cases.items():
            with pytest.raises(DataError) as err:
                read_dicom_file(path)
            said.append(_texts(err.value))
            assert str(path) in str(err.value), name  # the file is named
        for read in (read_dicom_folder, read_labelled_csv):
            source = root if read is read_dicom_folder else csv
            with pytest.raises(DataError) as err:
                read(source)
            said.append(_texts(err.value))
            assert f"{len(cases)} unreadable image(s)" in str(err.value)
            ds = read(source, skip_bad=True)
            assert len(ds) == 2 and len(ds.skipped) == len(cases)
            said.append(repr((ds.source, ds.class_names, ds.skipped, ds.fitted)))
    said += [caplog.text, *(str(w.message) for w in caught)]
    everything = "\n".join(said)
    assert "multi-frame with 2 frames" in everything and "holds no pixel data" in everything
    for marker in PHI:
        assert marker not in everything, f"patient data {marker!r} leaked"
