"""The autoencoder ceiling (issue #15): reconstructions, their MSE and grid, the evaluation that
trains the CNN on them, and the one schema of a committed results row (``docs/results/``)."""

import json
from pathlib import Path

import numpy as np
import pytest

from dpfl.shared.data.readers import ImageSet, write_npz
from dpfl.shared.errors import ConfigError, DataError
from dpfl.shared.eval.autoencoder import mse_summary, reconstruct, reconstruction_grid
from dpfl.shared.eval.evaluate import EvalConfig, evaluate
from dpfl.shared.eval.record import FORMAT, ResultRecord
from dpfl.shared.ldm.models import FASHION_MNIST_CLASSES, build_ldm, save_ldm

ROOT = Path(__file__).resolve().parent.parent


def _images(n, seed=0, size=28):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size, 1), np.float32)
    y = np.arange(n) % 10
    for i, c in enumerate(y):
        x[i, 2 * c:2 * c + 8, 4:20] = 0.5 + 0.5 * rng.random()
    return ImageSet(x, y.astype(np.int64), FASHION_MNIST_CLASSES, source=f"squares-{seed}")


def test_reconstructions_are_8_bit_and_their_mse_is_the_squared_error(tiny_ldm):
    data = _images(23)
    rec, mse = reconstruct(tiny_ldm, data, batch_size=5)
    assert rec.images.shape == data.images.shape and (rec.labels == data.labels).all()
    assert np.allclose(rec.images * 255, np.round(rec.images * 255), atol=1e-3)
    assert rec.images.min() >= 0 and rec.images.max() <= 1
    # the MSE is measured before quantisation: within half a grey level of the quantised one
    direct = ((rec.images - data.images) ** 2).mean(axis=(1, 2, 3))
    assert mse.shape == (23,) and np.allclose(mse, direct, atol=2 / 255)
    # an untrained autoencoder does not reproduce the squares
    assert mse.mean() > 0.01
    summary = mse_summary(mse, data)
    assert summary["mse"] == pytest.approx(float(mse.mean())) and summary["images"] == 23
    assert summary["mse_per_class"]["Trouser"] == pytest.approx(float(mse[1::10].mean()))
    one_class = data.subset(np.flatnonzero(data.labels == 0))
    assert mse_summary(mse[:3], one_class)["mse_per_class"]["Bag"] is None


def test_wrong_image_size_is_refused_naming_both_sizes(tiny_ldm):
    with pytest.raises(DataError, match=r"32x32.*28x28"):
        reconstruct(tiny_ldm, _images(4, size=32))


def test_grid_shows_every_class_twice(tiny_ldm, tmp_path):
    from PIL import Image

    path = reconstruction_grid(tiny_ldm, _images(40), tmp_path / "g.png", per_class=4)
    im = Image.open(path)
    assert im.height > 20 * 28 * 2 and im.width > 4 * 28 * 2  # 20 rows of 4 images, scale 2
    with pytest.raises(DataError, match="no class holds 9"):
        reconstruction_grid(tiny_ldm, _images(40), tmp_path / "h.png", per_class=9)


def test_autoencoder_needs_a_real_training_set():
    with pytest.raises(ConfigError, match="train_real"):
        EvalConfig(model="m", autoencoder="m")


def test_evaluation_trains_on_reconstructions_and_never_writes_them(tmp_path):
    ldm = build_ldm("tiny", seed=0)
    save_ldm(ldm, tmp_path / "base")
    write_npz(tmp_path / "train.npz", _images(60, 1))
    write_npz(tmp_path / "test.npz", _images(40, 2))
    write_npz(tmp_path / "public.npz", _images(30, 3))
    cfg = EvalConfig(train_real=str(tmp_path / "train.npz"), autoencoder=str(tmp_path / "base"),
                     test=str(tmp_path / "test.npz"), epochs=1,
                     classifier_dir=str(tmp_path / "clf"),
                     classifier_data=str(tmp_path / "public.npz"), classifier_epochs=1)
    rec = evaluate(cfg, tmp_path / "out", progress=False)
    assert rec["kind"] == "reconstructed" and rec["train_set"]["size"] == 60
    ae = rec["autoencoder"]
    assert ae["fingerprint"] == ae["card_fingerprint"] == ldm.fingerprint()
    assert ae["train"]["images"] == 60 and ae["test"]["images"] == 40
    assert ae["train"]["mse"] > 0 and ae["latent_shape"] == [4, 8, 8]
    assert Path(rec["grid"]).name == "reconstructions.png" and Path(rec["grid"]).exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "evaluation.json", "reconstructions.png"]  # no image set is written


def _record(**kw):
    base = dict(setting="ae-ceiling", sites=1, epsilon=None, delta=None, seed=0,
                accuracy_cnn=0.833, accuracy_mean3=None, per_class={"Coat": 0.67, "Bag": None},
                wall_s=300.0, command="dpfl-server experiment --setting ae-ceiling",
                base_model_fingerprint="sha256:" + "0" * 64)
    return ResultRecord(**{**base, **kw})


def test_record_round_trips_through_its_file(tmp_path):
    rec = _record(extra={"reconstruction_mse": 0.011})
    path = rec.write(tmp_path / "r.json")
    d = json.loads(path.read_text())
    assert d["format"] == FORMAT and d["epsilon"] is None and d["accuracy_cnn"] == 0.833
    assert ResultRecord.read(path) == rec


@pytest.mark.parametrize("field,value,words", [
    ("accuracy_cnn", 83.3, "fraction"), ("epsilon", float("inf"), "finite"),
    ("sites", -1, ">= 0"), ("per_class", {"Coat": 67.0}, "fractions"),
    ("base_model_fingerprint", "abc", "sha256"), ("delta", 1.0, r"\[0, 1\)")])
def test_bad_record_field_is_named_with_the_file(tmp_path, field, value, words):
    with pytest.raises(DataError, match=f"'{field}'.*{words}"):
        _record(**{field: value})
    d = {**_record().to_json(), field: value}
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=f"bad.json: field '{field}'"):
        ResultRecord.read(tmp_path / "bad.json")


def test_record_file_with_missing_or_unknown_fields_is_refused(tmp_path):
    d = _record().to_json()
    del d["seed"]
    (tmp_path / "r.json").write_text(json.dumps({**d, "acc": 1}))
    with pytest.raises(DataError, match=r"r.json: missing field\(s\) \['seed'\], unknown.*'acc'"):
        ResultRecord.read(tmp_path / "r.json")
    (tmp_path / "o.json").write_text(json.dumps({**_record().to_json(), "format": "other/1"}))
    with pytest.raises(DataError, match="o.json: field 'format'"):
        ResultRecord.read(tmp_path / "o.json")


def test_every_committed_record_reads_back():
    files = sorted((ROOT / "docs" / "results").glob("*.json"))
    for f in files:
        rec = ResultRecord.read(f)
        assert rec.command.startswith(("dpfl-server", "dpfl-client", "python")), f


def test_lat8_preset_doubles_the_latent_channels_only():
    from dpfl.shared.ldm.models import PRESETS

    lat8, base = build_ldm("fmnist-lat8"), PRESETS["fmnist"]
    assert lat8.latent_shape == (8, 8, 8)
    assert lat8.unet.config.in_channels == lat8.unet.config.out_channels == 8
    assert {k: v for k, v in PRESETS["fmnist-lat8"].vae.items() if k != "latent_channels"} \
        == {k: v for k, v in base.vae.items() if k != "latent_channels"}
    assert PRESETS["fmnist-lat8"].unet == base.unet


def test_wide_ae_preset_widens_the_autoencoder_and_keeps_the_latents_and_unet():
    from dpfl.shared.ldm.models import PRESETS

    wide, base = build_ldm("fmnist-wide-ae"), build_ldm("fmnist")
    assert wide.latent_shape == base.latent_shape == (4, 8, 8)
    assert wide.vae.config.block_out_channels[0] == 2 * base.vae.config.block_out_channels[0]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(wide.vae) > n(base.vae)
    assert PRESETS["fmnist-wide-ae"].unet == PRESETS["fmnist"].unet


@pytest.mark.skipif(not (ROOT / "models" / "fmnist-base" / "model_card.json").exists(),
                    reason="needs the shipped base model")
def test_shipped_base_model_still_loads_with_its_fingerprint():
    from dpfl.shared.ldm.models import load_ldm

    card = json.loads((ROOT / "models" / "fmnist-base" / "model_card.json").read_text())
    ldm = load_ldm(ROOT / "models" / "fmnist-base", verify_fingerprint=card["fingerprint"])
    assert ldm.latent_shape == (4, 8, 8)


def test_table_is_recomputed_from_the_record_files(tmp_path):
    from dpfl.shared.eval.record import read_records, records_table

    _record().write(tmp_path / "b.json")
    members = {"resnet": {"accuracy": 0.69}, "wrn": {"accuracy": 0.72},
               "resnext": {"accuracy": 0.69}}
    _record(setting="federated", sites=3, epsilon=9.99, delta=2.1e-6, accuracy_cnn=0.748,
            accuracy_mean3=(0.69 + 0.72 + 0.69) / 3, extra={"classifiers": members}
            ).write(tmp_path / "a.json")
    lines = records_table(read_records(tmp_path)).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| federated | 3 | 9.99 | 2.1e-06 | 0 |")
    assert "| 74.8 % | 70.0 % (resnet 69.0, wrn 72.0, resnext 69.0) | Coat 67 |" in lines[2]
    assert "| ae-ceiling | 1 | ∞ | - | 0 | 83.3 % | - |" in lines[3]
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(DataError, match="c.json"):
        read_records(tmp_path)
