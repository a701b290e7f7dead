import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from dpfl.shared.data.readers import (
    read_any,
    read_idx,
    read_image_folder,
    read_npz,
    to_model_tensor,
    write_npz,
)
from dpfl.shared.errors import DataError

from .conftest import requires_fmnist


def _write_idx(path, arr, gz):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim]) \
        + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.tobytes()
    (gzip.open(path, "wb") if gz else open(path, "wb")).write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, rng, gz):
    x = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    y = rng.integers(0, 3, 7).astype(np.uint8)
    sfx = ".gz" if gz else ""
    _write_idx(tmp_path / f"a-images-idx3-ubyte{sfx}", x, gz)
    _write_idx(tmp_path / f"a-labels-idx1-ubyte{sfx}", y, gz)
    ds = read_any(tmp_path / f"a-images-idx3-ubyte{sfx}")
    assert ds.images.shape == (7, 5, 4, 1)
    np.testing.assert_allclose(ds.images[..., 0], x / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(ds.labels, y)


def test_idx_truncated_file_is_named(tmp_path, rng):
    x = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
    _write_idx(tmp_path / "t-images-idx3-ubyte", x, False)
    raw = (tmp_path / "t-images-idx3-ubyte").read_bytes()
    (tmp_path / "t-images-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="t-images-idx3-ubyte"):
        read_idx(tmp_path / "t-images-idx3-ubyte", tmp_path / "t-labels-idx1-ubyte")
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk", tmp_path / "junk")


def _folder(tmp_path, rng):
    root = tmp_path / "silo"
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            img = Image.fromarray(rng.integers(0, 256, (12, 10), dtype=np.uint8))
            img.save(root / cls / f"{i}.png")
    return root


def test_image_folder_reads_classes_and_16_bit(tmp_path, rng):
    root = _folder(tmp_path, rng)
    arr16 = (np.arange(120, dtype=np.uint16).reshape(12, 10) * 500)
    Image.fromarray(arr16).save(root / "malignant" / "deep.png")
    assert Image.open(root / "malignant" / "deep.png").mode.startswith("I;16")
    ds = read_image_folder(root)
    assert ds.class_names == ("benign", "malignant")
    assert len(ds) == 7 and list(np.bincount(ds.labels)) == [3, 4]
    deep = ds.images[list(ds.labels).index(1)]  # sorted: 0.png, 1.png, 2.png, deep.png
    deep = ds.images[-1, ..., 0]
    np.testing.assert_allclose(deep, arr16 / 65535.0, atol=1e-6)  # 16-bit precision kept


def test_image_folder_rgb_and_jpeg(tmp_path, rng):
    root = tmp_path / "rgb"
    (root / "a").mkdir(parents=True)
    for i in range(2):
        img = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        img.save(root / "a" / f"{i}.jpg")
    ds = read_image_folder(root)
    assert ds.images.shape == (2, 8, 8, 3)


def test_corrupt_image_is_reported_by_name_or_skipped_with_count(tmp_path, rng):
    root = _folder(tmp_path, rng)
    (root / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match="broken.png"):
        read_image_folder(root)
    ds = read_image_folder(root, skip_bad=True)
    assert len(ds) == 6
    assert [p.endswith("broken.png") for p, _ in ds.skipped] == [True]


def test_image_of_wrong_size_is_named(tmp_path, rng):
    root = _folder(tmp_path, rng)
    big = Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8))
    big.save(root / "benign" / "big.png")
    with pytest.raises(DataError, match="big.png"):
        read_image_folder(root)


def test_npz_round_trip_and_no_pickles(tmp_path, rng):
    from dpfl.shared.data.readers import ImageSet

    ds = ImageSet(rng.integers(0, 256, (4, 6, 6, 1)).astype(np.float32) / 255,
                  np.array([0, 1, 2, 1]), ("x", "y", "z"), "gen")
    write_npz(tmp_path / "s.npz", ds)
    back = read_npz(tmp_path / "s.npz")
    np.testing.assert_allclose(back.images, ds.images, atol=1 / 255)
    assert back.class_names == ("x", "y", "z")
    np.savez(tmp_path / "evil.npz", images=np.array([object()], dtype=object), labels=np.array([0]))
    with pytest.raises(DataError, match="evil.npz"):
        read_npz(tmp_path / "evil.npz")


def test_labels_out_of_range_rejected(tmp_path):
    np.savez(tmp_path / "l.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 5]),
             class_names=np.array(["a", "b"]))
    with pytest.raises(DataError, match="label 5 out of range"):
        read_npz(tmp_path / "l.npz")


def test_to_model_tensor_pads_and_checks_channels(rng):
    from dpfl.shared.data.readers import ImageSet

    ds = ImageSet(np.ones((2, 28, 28, 1), np.float32), np.array([0, 1]), ("a", "b"), "ones")
    x = to_model_tensor(ds, 32, 1)
    assert x.shape == (2, 1, 32, 32)
    assert x[:, :, 2:30, 2:30].eq(1).all() and x[:, :, :2].eq(-1).all()
    with pytest.raises(DataError, match="3"):
        to_model_tensor(ds, 32, 3)
    with pytest.raises(DataError, match="resize"):
        to_model_tensor(ds, 16, 1)


@requires_fmnist
def test_real_fashion_mnist_and_standard_split():
    from dpfl.shared.data.fmnist import load_fashion_mnist, standard_split

    test = load_fashion_mnist("test")
    assert test.images.shape == (10000, 28, 28, 1)
    assert list(np.bincount(test.labels)) == [1000] * 10
    s = standard_split(seed=0)
    assert (len(s.public), len(s.private), len(s.test)) == (15000, 45000, 10000)
    assert set(np.unique(s.public.labels)) == {0, 1, 2, 3, 4}
    assert list(np.bincount(s.public.labels)) == [3000] * 5
    assert list(np.bincount(s.private.labels)) == [3000] * 5 + [6000] * 5
    # seeded: same seed same split, other seed another split
    again = standard_split(seed=0)
    np.testing.assert_array_equal(again.public.images[:50], s.public.images[:50])
    other = standard_split(seed=1)
    assert not np.array_equal(other.public.images[:50], s.public.images[:50])
