"""Image size policy: images not of the base model's size are refused, resized or
centre-cropped, by choice, never padded without a word (``fit_to_model``)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from dpfl.shared.data.readers import (
    DEFAULT_IMAGE_POLICY,
    IMAGE_POLICIES,
    ImageSet,
    fit_to_model,
    to_model_tensor,
)
from dpfl.shared.errors import ConfigError, DataError
from dpfl.shared.ldm.models import LDMSpec

SPEC = LDMSpec(image_size=32, channels=1, source_size=28, class_names=("a", "b"))
READERS_LOG = "dpfl.shared.data.readers"


def _set(h: int, w: int, n: int = 3, c: int = 1, seed: int = 0) -> ImageSet:
    x = np.random.default_rng(seed).random((n, h, w, c)).astype(np.float32)
    return ImageSet(x, np.arange(n) % 2, ("a", "b"), source=f"silo-{w}x{h}")


def _pillow_bicubic(img: np.ndarray, size: int) -> np.ndarray:
    """Reference: Pillow's bicubic resize of one (H, W) float image."""
    return np.asarray(Image.fromarray(img, mode="F").resize((size, size),
                                                            Image.Resampling.BICUBIC))


@pytest.mark.parametrize("policy", IMAGE_POLICIES)
@pytest.mark.parametrize("side", [28, 32], ids=["source-size", "canvas-size"])
def test_images_of_the_models_size_are_untouched(policy, side, caplog):
    ds = _set(side, side)
    with caplog.at_level(logging.INFO, logger=READERS_LOG):
        out = fit_to_model(ds, SPEC, policy)
    assert out is ds and out.fitted == ""
    assert not caplog.records  # no message: the designed pad is not news
    x = to_model_tensor(out, 32, 1, source_size=28)
    assert x.shape == (3, 1, 32, 32)
    pad = (32 - side) // 2
    np.testing.assert_array_equal(x[:, 0, pad:pad + side, pad:pad + side].numpy(),
                                  ds.images[..., 0] * 2 - 1)


def test_default_is_refuse():
    assert DEFAULT_IMAGE_POLICY == "refuse" and IMAGE_POLICIES[0] == "refuse"


@pytest.mark.parametrize("h, w, expected", [
    (8, 8, r"silo-8x8: images are 8x8 pixels but the model was built for 28x28 \(28x28 "
           r"images, its source_size, in a 32x32 canvas\)"),
    (40, 40, r"silo-40x40: images are 40x40 pixels but the model takes at most 32x32"),
    (20, 30, r"silo-30x20: images are 30x20 pixels but the model was built for 28x28.*"
             r"'resize' scales them to 28x28 \(their aspect ratio is not kept\), "
             r"'center-crop' cuts out the centre 20x20 square"),
], ids=["smaller", "larger", "non-square"])
def test_refuse_names_source_sizes_and_the_flag(h, w, expected):
    with pytest.raises(DataError, match=expected) as err:
        fit_to_model(_set(h, w), SPEC, "refuse")
    assert "--image-policy" in str(err.value) and "center-crop" in str(err.value)


def test_an_unfitted_set_is_refused_by_to_model_tensor_never_padded():
    with pytest.raises(DataError, match=r"8x8 pixels but the model was built for 28x28; fit "
                                        r"them first \(--image-policy"):
        to_model_tensor(_set(8, 8), 32, 1, source_size=28)


@pytest.mark.parametrize("h, w", [(8, 8), (14, 14), (56, 56), (64, 40), (20, 40)],
                         ids=["smaller-8", "smaller-14", "larger", "tall", "wide"])
def test_resize_scales_the_whole_image_like_pillows_bicubic(h, w, caplog):
    ds = _set(h, w)
    with caplog.at_level(logging.INFO, logger=READERS_LOG):
        out = fit_to_model(ds, SPEC, "resize")
    assert out.images.shape == (3, 28, 28, 1) and out.images.dtype == np.float32
    for i in range(3):
        ref = np.clip(_pillow_bicubic(ds.images[i, ..., 0], 28), 0, 1)
        np.testing.assert_allclose(out.images[i, ..., 0], ref, atol=1e-5)
    np.testing.assert_array_equal(out.labels, ds.labels)
    assert out.source == ds.source and out.class_names == ds.class_names
    note = f"resize: 3 image(s) resized from {w}x{h} to 28x28"
    assert out.fitted.startswith(note)
    assert ("aspect ratio not kept" in out.fitted) == (h != w)
    assert any(note in r.getMessage() and ds.source in r.getMessage() for r in caplog.records)
    to_model_tensor(out, 32, 1, source_size=28)  # fits the model now


def test_resize_keeps_constant_images_and_layout():
    x = np.zeros((1, 20, 40, 1), np.float32)
    x[:, :, 20:] = 1.0  # right half bright
    out = fit_to_model(ImageSet(x, np.array([0]), ("a",), "halves"), SPEC, "resize").images
    assert out[0, :, :12].max() < 0.01 and out[0, :, 16:].min() > 0.99  # squashed, not cut
    flat = np.full((2, 8, 8, 1), 0.25, np.float32)
    out = fit_to_model(ImageSet(flat, np.array([0, 1]), ("a", "b"), "flat"), SPEC, "resize")
    np.testing.assert_allclose(out.images, 0.25, atol=1e-6)


@pytest.mark.parametrize("h, w", [(28, 48), (56, 28)], ids=["wide", "tall"])
def test_center_crop_cuts_the_centre_square_exactly(h, w):
    x = np.ones((2, h, w, 1), np.float32)
    top, left = (h - 28) // 2, (w - 28) // 2
    rng = np.random.default_rng(1)
    centre = rng.random((2, 28, 28, 1)).astype(np.float32)
    x[:, top:top + 28, left:left + 28] = centre
    out = fit_to_model(ImageSet(x, np.array([0, 1]), ("a", "b"), "cut"), SPEC, "center-crop")
    np.testing.assert_array_equal(out.images, centre)  # the centre 28x28, nothing scaled
    assert out.fitted == f"center-crop: 2 image(s) of {w}x{h} cut to their centre 28x28"


@pytest.mark.parametrize("h, w", [(10, 20), (64, 40), (56, 56), (8, 8)],
                         ids=["small-wide", "large-tall", "large-square", "small-square"])
def test_center_crop_then_resize(h, w):
    ds = _set(h, w)
    out = fit_to_model(ds, SPEC, "center-crop")
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    for i in range(3):
        crop = np.ascontiguousarray(ds.images[i, top:top + side, left:left + side, 0])
        np.testing.assert_allclose(out.images[i, ..., 0],
                                   np.clip(_pillow_bicubic(crop, 28), 0, 1), atol=1e-5)
    if h != w:
        assert out.fitted.startswith(f"center-crop: 3 image(s) of {w}x{h} cut to their centre "
                                     f"{side}x{side}, then resized to 28x28")
    else:  # a square is only scaled
        assert out.fitted.startswith(f"center-crop: 3 image(s) resized from {w}x{h} to 28x28")


def test_rgb_and_16_bit_values_survive_a_resize():
    x = np.zeros((1, 14, 14, 3), np.float32)
    x[..., 0] = 1.0
    x[..., 2] = 12345 / 65535
    rgb = LDMSpec(32, 3, 28, ("a",))
    out = fit_to_model(ImageSet(x, np.array([0]), ("a",), "rgb"), rgb, "resize").images
    assert out.shape == (1, 28, 28, 3)
    np.testing.assert_allclose(out[..., 0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[..., 1], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[..., 2] * 65535, 12345, atol=1e-2)  # finer than 8 bits


def test_bicubic_overshoot_is_clipped_to_the_unit_range():
    x = np.zeros((1, 56, 56, 1), np.float32)
    x[:, :, ::2] = 1.0  # stripes ring under a cubic filter
    out = fit_to_model(ImageSet(x, np.array([0]), ("a",), "stripes"), SPEC, "resize").images
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_unknown_policy_and_subset_keep_the_note():
    with pytest.raises(ConfigError, match="image policy 'stretch' is not one of"):
        fit_to_model(_set(8, 8), SPEC, "stretch")
    out = fit_to_model(_set(8, 8), SPEC, "resize")
    assert out.subset(np.array([0])).fitted == out.fitted


# -- where the policy is chosen ------------------------------------------------------------
def _npz_silo(path, side: int, n: int = 6):
    x = (np.random.default_rng(0).random((n, side, side)) * 255).astype(np.uint8)
    np.savez(path, images=x, labels=np.arange(n) % 2,
             class_names=np.array(["T-shirt/top", "Trouser"]))
    return path


def test_central_training_refuses_or_resizes_before_the_ledger(tmp_path, tiny_ldm):
    from dpfl.client.train import TrainJob, open_silo_and_ledger
    from dpfl.shared.privacy.dpsgd import DPConfig
    from dpfl.shared.rundir import RunDir

    silo = _npz_silo(tmp_path / "silo.npz", 8)
    dp = DPConfig(noise_multiplier=1.0, target_epsilon=None, delta=1e-3, batch_size=2,
                  device="cpu")
    rd = RunDir(tmp_path / "run")
    job = TrainJob(data=str(silo), model="unused", run_dir=str(rd.path), budget=10.0)
    assert job.image_policy == "refuse"
    with pytest.raises(DataError, match="8x8 pixels but the model was built for 28x28"):
        open_silo_and_ledger(job, dp, rd, tiny_ldm)
    assert not (rd.path / "accountant.json").exists()  # refused before the ledger opened
    job = TrainJob(data=str(silo), model="unused", run_dir=str(rd.path), budget=10.0,
                   image_policy="center-crop")
    ds, _, _ = open_silo_and_ledger(job, dp, rd, tiny_ldm)
    assert ds.images.shape == (6, 28, 28, 1) and "center-crop" in ds.fitted
    with pytest.raises(ConfigError, match="image_policy must be one of"):
        TrainJob(data="x", model="m", run_dir="r", image_policy="pad")


def test_a_site_fits_with_its_own_policy_and_caches_per_policy(tmp_path, caplog):
    from dpfl.client.site import Site
    from dpfl.shared.federation.config import SiteConfig
    from dpfl.shared.ldm.models import build_ldm, save_ldm

    ldm = build_ldm("tiny", seed=0)
    base = save_ldm(ldm, tmp_path / "base")
    cfg = SiteConfig(site_id="h", data=str(_npz_silo(tmp_path / "silo.npz", 40)),
                     base_model=str(base), state_dir=str(tmp_path / "state"), device="cpu")
    refusing = Site(cfg)
    with caplog.at_level(logging.ERROR, logger="dpfl.client.site"):
        with pytest.raises(DataError, match="site's own log"):
            refusing.local_silo(refusing.base_model(ldm.fingerprint()))
    assert "40x40 pixels but the model takes at most 32x32" in caplog.text
    assert "--image-policy" in caplog.text
    site = Site(dataclasses.replace(cfg, image_policy="resize"))
    with caplog.at_level(logging.INFO, logger=READERS_LOG):
        z, y = site.silo(site.base_model(ldm.fingerprint()))
    assert len(z) == 6 and "resized from 40x40 to 28x28" in caplog.text
    (cache,) = (tmp_path / "state").glob("latents-*")
    other = Site(dataclasses.replace(cfg, image_policy="center-crop"))
    with caplog.at_level(logging.INFO, logger=READERS_LOG):
        caplog.clear()
        other.silo(other.base_model(ldm.fingerprint()))
    assert "center-crop" in caplog.text  # encoded again, not read from the resize cache
    assert len(list((tmp_path / "state").glob("latents-*"))) == 2
    # the site's own node config key, as a deployed site sets it
    from_node = SiteConfig.from_node_config({"site-id": "h", "data": "x",
                                             "image-policy": "center-crop"})
    assert Site(dataclasses.replace(cfg, image_policy="center-crop")).image_policy == \
        from_node.image_policy == "center-crop"
    with pytest.raises(ConfigError, match="image-policy must be one of"):
        SiteConfig(site_id="h", data="x", image_policy="pad")


def test_pretraining_refuses_before_training(tmp_path):
    from dpfl.shared.ldm.pretrain import PretrainConfig, pretrain

    data = ImageSet(np.zeros((4, 8, 8, 1), np.float32), np.array([0, 1, 0, 1]), ("a", "b"),
                    "public-8x8")
    with pytest.raises(DataError, match="public-8x8: images are 8x8 pixels.*--image-policy"):
        pretrain(PretrainConfig(preset="tiny", ae_steps=1, unet_steps=1, device="cpu"), data,
                 tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    with pytest.raises(ConfigError, match="image_policy must be one of"):
        PretrainConfig(image_policy="pad")


@pytest.mark.parametrize("cli, args", [("client", ["train", "--help"]),
                                       ("client", ["train-full", "--help"]),
                                       ("client", ["audit", "--help"]),
                                       ("server", ["pretrain", "--help"])])
def test_the_commands_that_read_data_offer_the_policy(cli, args):
    if cli == "client":
        from dpfl.client.cli import main
    else:
        from dpfl.server.cli import main
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "--image-policy [refuse|resize|center-crop]" in out.output
    assert "default: refuse" in " ".join(out.output.split())
