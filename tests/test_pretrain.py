import json

import numpy as np
import pytest
import torch

from dpfl.shared.data.readers import ImageSet
from dpfl.shared.errors import ConfigError, StateError
from dpfl.shared.ldm.models import load_ldm
from dpfl.shared.ldm.pretrain import PretrainConfig, pretrain


def _toy_data(n=256):
    """Two easy classes: bright squares top-left vs bottom-right on black."""
    rng = np.random.default_rng(0)
    x = np.zeros((n, 28, 28, 1), np.float32)
    y = rng.integers(0, 2, n)
    for i, c in enumerate(y):
        o = 4 if c == 0 else 14
        x[i, o:o + 10, o:o + 10] = 0.8 + 0.2 * rng.random()
    names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
             "Sneaker", "Bag", "Ankle boot")
    return ImageSet(x, y.astype(np.int64), names, "toy")


def test_tiny_pretraining_lowers_loss_and_writes_run_dir(tmp_path):
    cfg = PretrainConfig(preset="tiny", ae_steps=60, unet_steps=120, batch_size=32, log_every=10,
                         checkpoint_every=50, ema_decay=0.0, device="cpu")
    ldm = pretrain(cfg, _toy_data(), tmp_path / "run")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    metrics = [json.loads(line) for line in lines]
    ae = [m["rec_l1"] for m in metrics if m.get("stage") == "ae"]
    un = [m["loss"] for m in metrics if m.get("stage") == "unet"]
    assert ae[-1] < ae[0] * 0.8
    assert np.mean(un[-3:]) < np.mean(un[:2])
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0
    cfgjson = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfgjson["config"]["preset"] == "tiny" and "torch" in cfgjson["versions"]
    loaded = load_ldm(tmp_path / "run" / "model")
    assert loaded.fingerprint() == ldm.fingerprint()
    assert loaded.vae.config.latents_std is not None  # per-channel latent normalisation
    z = loaded.encode(torch.rand(64, 1, 32, 32) * 2 - 1)
    assert z.shape[1] == 4


def test_resume_continues_from_checkpoint(tmp_path):
    cfg = PretrainConfig(preset="tiny", ae_steps=20, unet_steps=40, batch_size=16, log_every=5,
                         checkpoint_every=10, ema_decay=0.0, device="cpu")
    run = tmp_path / "run"
    # a checkpoint from an interrupted run at UNet step 20
    import dpfl.shared.ldm.pretrain as pt

    orig = pt._Checkpoint.save

    def save_then_die(self, state):
        orig(self, state)
        if state["stage"] == "unet" and state["step"] == 20:
            raise KeyboardInterrupt

    pt._Checkpoint.save = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            pretrain(cfg, _toy_data(64), run)
    finally:
        pt._Checkpoint.save = orig
    assert (run / "checkpoint.pt").exists()
    pretrain(cfg, _toy_data(64), run)
    steps = [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if m.get("stage") == "unet"]
    # steps 5..20 from the first attempt, then 25..40 after resuming (not from 5 again)
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert not (run / "checkpoint.pt").exists()
    with pytest.raises(StateError):
        # a checkpoint from other settings is never silently mixed in
        (run / "checkpoint.pt").write_bytes(b"garbage")
        pretrain(cfg, _toy_data(64), run)


def test_config_ranges():
    with pytest.raises(ConfigError, match="preset"):
        PretrainConfig(preset="big")
    with pytest.raises(ConfigError, match="batch_size"):
        PretrainConfig(batch_size=0)


def test_which_settings_may_change_on_resume():
    import dataclasses

    from dpfl.shared.ldm.pretrain import _resumable

    cfg = PretrainConfig(preset="tiny", ae_steps=100, unet_steps=200)
    in_ae = {"stage": "ae", "config": dataclasses.asdict(cfg)}
    in_unet = {"stage": "unet", "config": dataclasses.asdict(cfg)}
    longer_unet = dataclasses.replace(cfg, unet_steps=400)
    assert _resumable(in_ae, longer_unet)  # nothing UNet-related exists yet
    assert _resumable(in_unet, longer_unet)  # extending a run re-shapes its schedule
    assert not _resumable(in_unet, dataclasses.replace(cfg, unet_lr=0.1))
    assert not _resumable(in_ae, dataclasses.replace(cfg, kl_weight=1.0))
    assert _resumable(in_unet, dataclasses.replace(cfg, checkpoint_every=7, device="cpu"))
    ae_done = {"stage": "ae_done", "config": dataclasses.asdict(cfg)}
    assert _resumable(ae_done, longer_unet)
    assert not _resumable(ae_done, dataclasses.replace(cfg, ae_steps=50))


def test_edge_term_is_the_l1_of_pixel_differences():
    from dpfl.shared.ldm.pretrain import edge_l1

    x = torch.zeros(1, 1, 3, 3)
    rec = x.clone()
    rec[0, 0, 1, 1] = 1.0  # one bright pixel: 2 of 6 horizontal and 2 of 6 vertical diffs are 1
    assert edge_l1(rec, x).item() == pytest.approx((2 / 6 + 2 / 6) / 2)
    assert edge_l1(x + 0.3, x).item() == 0.0  # a constant offset has no edges
    with pytest.raises(ConfigError, match="edge_weight"):
        PretrainConfig(edge_weight=-1.0)


def test_edge_weight_trains_and_changes_the_autoencoder(tmp_path):
    base = PretrainConfig(preset="tiny", ae_steps=15, unet_steps=0, batch_size=16, log_every=5,
                          ema_decay=0.0, device="cpu")
    plain = pretrain(base, _toy_data(64), tmp_path / "plain")
    again = pretrain(base, _toy_data(64), tmp_path / "again")
    edged = pretrain(PretrainConfig(**{**base.__dict__, "edge_weight": 1.0}), _toy_data(64),
                     tmp_path / "edge")
    assert plain.fingerprint() == again.fingerprint()  # deterministic: the next line means it
    assert edged.fingerprint() != plain.fingerprint()
    card = json.loads((tmp_path / "edge" / "model" / "model_card.json").read_text())
    assert card["training_config"]["edge_weight"] == 1.0


def test_checkpoint_older_than_a_setting_resumes_with_its_default():
    import dataclasses

    from dpfl.shared.ldm.pretrain import _resumable

    cfg = PretrainConfig(preset="tiny", ae_steps=100, unet_steps=200)
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "edge_weight"}
    assert _resumable({"stage": "ae", "config": old}, cfg)
    assert not _resumable({"stage": "ae", "config": old},
                          dataclasses.replace(cfg, edge_weight=0.5))


def test_unet_latents_come_from_the_one_encoding_pass():
    from dpfl.shared.ldm.models import build_ldm
    from dpfl.shared.ldm.pretrain import _set_latent_stats

    ldm = build_ldm("tiny", seed=0)
    x = torch.rand(50, 1, 32, 32) * 2 - 1
    stats, z = _set_latent_stats(ldm, x)
    assert torch.equal(z, ldm.encode(x))  # bit for bit what the stored statistics give
    assert z.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(4), atol=1e-4)
    assert len(stats["latents_mean"]) == len(stats["latents_std"]) == 4
