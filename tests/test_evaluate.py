"""Utility metrics: Fréchet distance, precision/recall, the downstream CNN, the domain
classifier cache, the Inception loader and ``dpfl-server evaluate`` end to end (tiny, CPU)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dpfl.server.cli import main
from dpfl.shared.data.readers import ImageSet, write_npz
from dpfl.shared.errors import ConfigError, ModelError
from dpfl.shared.eval.cnn import (
    CNNConfig,
    TrainSettings,
    load_classifier,
    predict_logits,
    save_classifier,
    train_cnn,
)
from dpfl.shared.eval.evaluate import domain_classifier, downstream_accuracy, fid, synthetic_set
from dpfl.shared.eval.fid import (
    GaussianStats,
    frechet_distance,
    frechet_from_features,
    inception_path,
    precision_recall,
)
from dpfl.shared.ldm.lora import LoraSpec, save_adapter, wrap_unet
from dpfl.shared.ldm.models import FASHION_MNIST_CLASSES, build_ldm, save_ldm


def _easy(n, seed, classes=4, names=None):
    """Class c is a bright 10x10 square in quadrant c on faint noise: trivially separable."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.random((n, 28, 28, 1)).astype(np.float32) * 0.3
    for i, c in enumerate(y):
        r, col = divmod(int(c) % 4, 2)
        x[i, 2 + 14 * r:12 + 14 * r, 2 + 14 * col:12 + 14 * col] = 0.95
    names = names or tuple(f"c{i}" for i in range(classes))
    return ImageSet(x, y.astype(np.int64), names, source=f"easy-{seed}")


FAST = TrainSettings(epochs=4, batch_size=32, lr=2e-3, val_fraction=0.2, seed=0)


# -- Fréchet distance -----------------------------------------------------------------------
def test_frechet_distance_is_zero_for_identical_features():
    x = np.random.default_rng(0).normal(size=(300, 6))
    assert frechet_from_features(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    # |mu1 - mu2|^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2 = (1 + 4) + (1 + 1 + 4) = 11
    a = GaussianStats(np.zeros(3), np.diag([1.0, 4.0, 9.0]), 0)
    b = GaussianStats(np.array([1.0, 2.0, 0.0]), np.diag([4.0, 1.0, 1.0]), 0)
    assert frechet_distance(a, b) == pytest.approx(11.0, abs=1e-9)
    assert frechet_distance(b, a) == pytest.approx(11.0, abs=1e-9)
    # and from samples of those two Gaussians (estimation error only)
    rng = np.random.default_rng(1)
    xa = rng.normal(size=(40000, 3)) * np.sqrt([1.0, 4.0, 9.0])
    xb = rng.normal(size=(40000, 3)) * np.sqrt([4.0, 1.0, 1.0]) + [1.0, 2.0, 0.0]
    assert frechet_from_features(xa, xb) == pytest.approx(11.0, rel=0.03)


def test_precision_recall_identical_disjoint_and_mode_dropping():
    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) + 20])
    same = precision_recall(real, real.copy())
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = precision_recall(real, rng.normal(size=(400, 2)) + 100)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # generated covers one of the two modes: precise, but recalls about half
    one_mode = precision_recall(real, rng.normal(size=(400, 2)))
    assert one_mode["precision"] > 0.9 and 0.35 < one_mode["recall"] < 0.65


# -- downstream CNN -------------------------------------------------------------------------
def test_cnn_learns_separable_set_and_not_shuffled_labels():
    train, test = _easy(400, 0), _easy(200, 1)
    good = downstream_accuracy(train, test, FAST)
    assert good.accuracy > 0.95 and all(a > 0.9 for a in good.per_class.values())
    assert good.train_size == 320 and good.val_size == 80 and good.test_size == 200
    shuffled = ImageSet(train.images, np.random.default_rng(5).permutation(train.labels),
                        train.class_names, "shuffled")
    chance = downstream_accuracy(shuffled, test, FAST)
    assert chance.accuracy < 0.45  # 4 classes: chance is 0.25


def test_epoch_selection_never_looks_at_the_test_set():
    train, test = _easy(400, 0), _easy(200, 1)
    flipped = ImageSet(test.images, (test.labels + 1) % 4, test.class_names, "flipped")
    a = downstream_accuracy(train, test, FAST)
    b = downstream_accuracy(train, flipped, FAST)
    # same training run and same chosen epoch whatever the test labels are ...
    assert a.selected_epoch == b.selected_epoch and a.history == b.history
    # ... so a test set with wrong labels scores low instead of steering the choice
    assert a.accuracy > 0.95 and b.accuracy < 0.05
    last = downstream_accuracy(train, test, TrainSettings(epochs=2, val_fraction=0.0))
    assert last.selected_epoch == 2 and last.val_size == 0


def test_classifier_save_load_round_trip_gives_identical_features(tmp_path):
    data = _easy(64, 0)
    trained = train_cnn(data, TrainSettings(epochs=1, batch_size=16, val_fraction=0),
                        CNNConfig(num_classes=4, widths=(4, 8, 8), hidden=16))
    trained.meta = {"data": "easy"}
    save_classifier(trained, tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    assert loaded.model.cfg == trained.model.cfg and loaded.meta["data"] == "easy"
    assert torch.equal(predict_logits(trained.model, data, features=True),
                       predict_logits(loaded.model, data, features=True))
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    del meta["arch"]
    (tmp_path / "clf" / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="classifier.json.*'arch'"):
        load_classifier(tmp_path / "clf")


def test_domain_classifier_is_trained_once_then_loaded(tmp_path, monkeypatch):
    public = tmp_path / "public.npz"
    write_npz(public, _easy(80, 0, classes=2, names=("a", "b", "c", "d")))
    settings = TrainSettings(epochs=1, batch_size=16)
    first = domain_classifier(tmp_path / "clf", str(public), settings, progress=False)
    assert first.meta["seen_classes"] == [0, 1] and first.meta["data"] == str(public)

    def no_training(*a, **k):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr("dpfl.shared.eval.evaluate.train_cnn", no_training)
    again = domain_classifier(tmp_path / "clf", str(public), settings, progress=False)
    data = _easy(8, 1)
    assert torch.equal(predict_logits(first.model, data, features=True),
                       predict_logits(again.model, data, features=True))
    with pytest.raises(ModelError, match="field 'data'"):
        domain_classifier(tmp_path / "clf", "other.npz", settings, progress=False)
    with pytest.raises(ConfigError, match="public data only"):
        domain_classifier(tmp_path / "new", "fmnist:private", settings, progress=False)


# -- Inception / FID ------------------------------------------------------------------------
def test_missing_inception_file_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.delenv("DPFL_INCEPTION", raising=False)
    assert inception_path(None) is None  # not requested: no FID
    with pytest.raises(ModelError,
                       match=r"inception-2015-12-05\.pt.*--inception PATH.*DPFL_INCEPTION"):
        inception_path(tmp_path / "nowhere.pt")
    monkeypatch.setenv("DPFL_INCEPTION", str(tmp_path / "also-nowhere.pt"))
    with pytest.raises(ModelError, match="also-nowhere.pt"):
        inception_path(None)


class _FakeInception(torch.nn.Module):
    """Stands in for NVIDIA's TorchScript file: insists on its input convention."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if x.dtype != torch.uint8 or x.shape[1] != 3 or x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("expected uint8 (N, 3, 299, 299)")
        if not return_features:
            raise RuntimeError("expected return_features=True")
        f = x.float() / 255.0
        return torch.cat([f.mean(dim=(2, 3)), f[:, :, 100:200, 100:200].mean(dim=(2, 3))], 1)


def test_fid_uses_the_torchscript_convention(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_FakeInception()), str(path))
    a, b = _easy(40, 0), _easy(40, 1)
    assert fid(a, a, path, progress=False) == pytest.approx(0.0, abs=1e-6)
    darker = ImageSet(b.images * 0.5, b.labels, b.class_names, "darker")
    assert fid(a, darker, path, progress=False) > 1e-3
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ModelError, match="TorchScript"):
        fid(a, a, tmp_path / "junk.pt", progress=False)


# -- sampling and the CLI -------------------------------------------------------------------
def test_synthetic_set_is_class_balanced_at_data_resolution(tiny_ldm):
    ds = synthetic_set(tiny_ldm, per_class=2, steps=1, batch_size=7, progress=False)
    assert ds.images.shape == (20, 28, 28, 1)
    assert np.bincount(ds.labels).tolist() == [2] * 10
    assert ds.images.min() >= 0 and ds.images.max() <= 1
    assert np.allclose(ds.images * 255, np.round(ds.images * 255), atol=1e-3)  # 8-bit levels


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    ldm = build_ldm("tiny", seed=0)
    save_ldm(ldm, root / "base")
    save_adapter(wrap_unet(ldm.unet, LoraSpec(rank=2)), root / "run" / "adapter")
    write_npz(root / "test.npz", _easy(60, 1, classes=10, names=FASHION_MNIST_CLASSES))
    write_npz(root / "public.npz", _easy(60, 2, classes=5, names=FASHION_MNIST_CLASSES))
    return root


def _evaluate(setup, out, *extra):
    args = ["evaluate", "--test", str(setup / "test.npz"), "--out", str(out), "--epochs", "1",
            "--classifier-data", str(setup / "public.npz"),
            "--classifier-dir", str(setup / "clf"), "--no-progress", "--threads", "1", *extra]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res, json.loads((out / "evaluation.json").read_text())


def test_cli_evaluates_a_tiny_model_end_to_end(setup, tmp_path):
    res, rec = _evaluate(setup, tmp_path / "base", "--model", str(setup / "base"),
                         "--per-class", "3", "--steps", "2")
    assert "downstream accuracy" in res.output and "domain FD" in res.output
    assert (tmp_path / "base" / "samples.png").exists() and rec["grid"]
    assert rec["kind"] == "synthetic" and rec["train_set"]["per_class"] == [3] * 10
    assert 0 <= rec["downstream"]["accuracy"] <= 1 and rec["downstream"]["test_size"] == 60
    assert rec["domain"]["fd"] >= 0 and 0 <= rec["domain"]["precision"] <= 1
    assert rec["classifier"]["data"] == str(setup / "public.npz") and rec["fid"] is None
    assert (setup / "clf" / "classifier.safetensors").exists()
    # with an adapter, and a real set for the ceiling (never copied into the output)
    _, with_adapter = _evaluate(setup, tmp_path / "lora", "--model", str(setup / "base"),
                                "--adapter", str(setup / "run" / "adapter"),
                                "--per-class", "2", "--steps", "1")
    assert with_adapter["generator"]["adapter"].endswith("adapter")
    assert with_adapter["generator"]["privacy"]["status"] == "unknown"
    assert rec["generator"]["sampling"] == {"steps": 2, "guidance": 1.0, "spacing": "leading"}
    _, trailing = _evaluate(setup, tmp_path / "trailing", "--model", str(setup / "base"),
                            "--per-class", "1", "--steps", "2", "--spacing", "trailing")
    assert trailing["generator"]["sampling"]["spacing"] == "trailing"
    assert "(trailing spacing)" in trailing["train_set"]["source"]
    _, real = _evaluate(setup, tmp_path / "real", "--train-real", str(setup / "test.npz"),
                        "--train-per-class", "4")
    assert real["kind"] == "real" and real["grid"] is None
    assert real["train_set"]["per_class"] == [4] * 10
    assert not (tmp_path / "real" / "samples.npz").exists()


def test_generator_privacy_is_read_with_the_one_reader(tmp_path):
    from dpfl.shared.eval.evaluate import _adapter_privacy
    from dpfl.shared.privacy.accountant import PersistentAccountant
    from dpfl.shared.privacy.guarantee import SCOPE_ADAPTER, PrivacyGuarantee

    run, model = tmp_path / "run", tmp_path / "model"
    (run / "adapter").mkdir(parents=True)
    model.mkdir()
    assert _adapter_privacy(str(run / "adapter"))["status"] == "unknown"
    acc = PersistentAccountant.open(run / "accountant.json", delta=1e-5, budget=8.0)
    acc.commit(1.1, 0.01, 100)  # a central run of older dpfl: only the ledger beside it
    old = _adapter_privacy(str(run / "adapter"))
    assert (old["status"], old["epsilon"], old["source"]) == \
        ("stated", acc.epsilon(), str(run / "accountant.json"))
    acc.commit(1.1, 0.01, 100)
    PrivacyGuarantee.from_accountant(acc, scope=SCOPE_ADAPTER).write(
        run / "adapter" / "privacy.json")
    new = _adapter_privacy(str(run / "adapter"))
    assert (new["status"], new["epsilon"], new["delta"], new["accountant"]) == \
        ("stated", acc.epsilon(), 1e-5, "prv")
    assert _adapter_privacy(None, str(model)) is None  # a public base model states nothing
    PrivacyGuarantee.from_values(2.0, 1e-6).write(model / "privacy.json")
    assert _adapter_privacy(None, str(model))["epsilon"] == 2.0
    (model / "privacy.json").write_text("{")
    assert _adapter_privacy(None, str(model))["status"] == "unreadable"


def test_cli_refuses_model_and_real_set_together(setup, tmp_path):
    res = CliRunner().invoke(main, ["evaluate", "--model", str(setup / "base"), "--train-real",
                                    str(setup / "test.npz"), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "not both" in res.output
    res = CliRunner().invoke(main, ["evaluate", "--model", str(setup / "base"), "--out",
                                    str(tmp_path / "y"), "--inception", str(tmp_path / "no.pt")])
    assert res.exit_code != 0 and "DPFL_INCEPTION" in res.output


def test_cli_scores_the_three_dpimagebench_classifiers_on_request(setup, tmp_path):
    res, rec = _evaluate(setup, tmp_path / "mean3", "--train-real", str(setup / "test.npz"),
                         "--train-per-class", "4", "--classifiers", "all")
    members = rec["mean3"]["classifiers"]
    assert set(members) == {"resnet", "wrn", "resnext"}  # (JSON keys are written sorted)
    assert rec["mean3"]["accuracy"] == pytest.approx(
        sum(m["accuracy"] for m in members.values()) / 3)
    assert all(m["test_size"] == 60 and m["parameters"] > 0 for m in members.values())
    assert rec["downstream"]["classifier"] == "cnn" and "3-classifier mean" in res.output
    _, cnn_only = _evaluate(setup, tmp_path / "cnn", "--train-real", str(setup / "test.npz"),
                            "--train-per-class", "4")
    assert cnn_only["mean3"] is None  # the default scores the CNN alone
