"""``dpfl-client train`` and ``train-full`` end to end on a tiny model: run directory, ledger,
restart, the whole-model output of full training."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dpfl.client.cli import main
from dpfl.shared.data.readers import ImageSet, write_npz
from dpfl.shared.ldm.lora import load_adapter
from dpfl.shared.ldm.models import FASHION_MNIST_CLASSES, build_ldm, save_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    save_ldm(build_ldm("tiny", seed=0), root / "base")
    rng = np.random.default_rng(0)
    x = rng.random((40, 28, 28, 1), dtype=np.float32)
    write_npz(root / "silo.npz", ImageSet(x, rng.integers(0, 10, 40), FASHION_MNIST_CLASSES))
    return root


def _train(setup, run, *extra):
    args = ["train", "--data", str(setup / "silo.npz"), "--model", str(setup / "base"),
            "--run-dir", str(run), "--epsilon", "8", "--delta", "1e-3", "--batch-size", "10",
            "--physical-batch", "5", "-k", "2", "--rank", "2", "--planned-steps", "8",
            "--sample-steps", "2", "--per-class", "1", "--device", "cpu", "--no-progress",
            *extra]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.JSONDecoder().raw_decode(res.output[res.output.index("{\n"):])[0]


def test_train_writes_run_dir_and_ledger_matches(setup, tmp_path):
    run = tmp_path / "run"
    out = _train(setup, run)
    for name in ("config.json", "metrics.jsonl", "samples_before.png", "samples_after.png",
                 "accountant.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/privacy.json"):
        assert (run / name).exists(), name
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m and "final" not in m]
    assert len(steps) == out["steps"] == 4 and all(np.isfinite(m["loss"]) for m in steps)
    final = metrics[-1]
    ledger = PersistentAccountant.load(run / "accountant.json")
    assert final["epsilon"] == pytest.approx(ledger.epsilon()) == pytest.approx(out["epsilon"])
    assert [m for m in metrics if "epsilon" in m and "final" not in m][-1]["epsilon"] == \
        pytest.approx(ledger.epsilon())
    assert 0 < ledger.epsilon() < 8
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["dp"]["noise_multiplicity"] == 2 and "opacus" in cfg["versions"]
    load_adapter(build_ldm("tiny").unet, run / "adapter")
    _assert_states_the_ledger(run / "adapter" / "privacy.json", run / "accountant.json")
    assert out["privacy"] == str(run / "adapter" / "privacy.json")

    # a second run in the same directory continues the same ledger
    again = _train(setup, run)
    assert again["epsilon"] > out["epsilon"]
    assert PersistentAccountant.load(run / "accountant.json").steps == 8
    _assert_states_the_ledger(run / "adapter" / "privacy.json", run / "accountant.json")


def test_warm_up_releases_class_means_first_and_dp_sgd_gets_the_rest(setup, tmp_path):
    """--warmup-sigma: one Gaussian mechanism (q = 1) in the ledger before any DP-SGD step,
    DP-SGD's sigma raised so that both together stay within the target over the planned
    steps, the warm-up in metrics.jsonl, and the guarantee stating the whole ledger."""
    plain = _train(setup, tmp_path / "plain")
    # 40 examples over 10 classes: a small sigma, so that counts of ~4 clear the noise
    out = _train(setup, tmp_path / "warm", "--warmup-sigma", "0.8", "--warmup-steps", "5")
    ledger = PersistentAccountant.load(tmp_path / "warm" / "accountant.json")
    (release, dp_sgd) = ledger.history
    assert release == (0.8, 1.0, 1)
    assert dp_sgd[0] == out["sigma"] > plain["sigma"]
    assert dp_sgd[2] == 4  # half of the 8 planned steps
    # the whole planned run (the other 4 steps too) stays within the target of 8
    assert 7.5 < ledger.predict_epsilon(dp_sgd[0], dp_sgd[1], 4) <= 8.0
    metrics = [json.loads(line) for line in
               (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
    (warm,) = [m for m in metrics if m.get("stage") == "warmup"]
    assert warm["steps"] == 5 and warm["sigma"] == 0.8 and warm["classes"]
    assert warm["epsilon"] == pytest.approx(
        PersistentAccountant(tmp_path / "x", kind=ledger.kind, delta=1e-3,
                             budget=8).predict_epsilon(0.8, 1.0, 1))
    _assert_states_the_ledger(tmp_path / "warm" / "adapter" / "privacy.json",
                              tmp_path / "warm" / "accountant.json")


def _assert_states_the_ledger(privacy_file, ledger_file):
    """privacy.json is the one schema and states exactly what the ledger holds."""
    from dpfl.shared.privacy.guarantee import PrivacyGuarantee

    ledger = PersistentAccountant.load(ledger_file)
    assert json.loads(privacy_file.read_text())["format"] == "dpfl-privacy/1"
    g = PrivacyGuarantee.from_file(privacy_file)
    assert (g.status, g.epsilon, g.delta, g.accountant, g.steps) == \
        ("stated", ledger.epsilon(), ledger.delta, ledger.kind, ledger.steps)
    assert g.source == str(ledger_file) and g.scope.startswith("record-level DP")
    assert g.detail["history"] == [list(h) for h in ledger.history]


@pytest.mark.parametrize("command, output", [("train", "adapter"), ("train-full", "model")])
def test_training_over_budget_is_refused_before_any_step(setup, tmp_path, command, output):
    res = CliRunner().invoke(main, [
        command, "--data", str(setup / "silo.npz"), "--model", str(setup / "base"),
        "--run-dir", str(tmp_path / "r"), "--sigma", "0.2", "--budget", "1", "--delta", "1e-3",
        "--batch-size", "10", "--device", "cpu", "--no-progress", "--sample-steps", "1",
        "--per-class", "1"])
    assert res.exit_code != 0 and "budget" in res.output
    assert not (tmp_path / "r" / output).exists()
    assert PersistentAccountant.load(tmp_path / "r" / "accountant.json").steps == 0


def _train_full(setup, run, *extra):
    args = ["train-full", "--data", str(setup / "silo.npz"), "--model", str(setup / "base"),
            "--run-dir", str(run), "--epsilon", "8", "--delta", "1e-3", "--batch-size", "10",
            "--physical-batch", "5", "-k", "2", "--planned-steps", "8", "--sample-steps", "2",
            "--per-class", "1", "--device", "cpu", "--no-progress", *extra]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.JSONDecoder().raw_decode(res.output[res.output.index("{\n"):])[0]


def _arch(unet):
    return {k: v for k, v in unet.config.items() if not k.startswith("_")}


def test_train_full_from_scratch_writes_a_loadable_model(setup, tmp_path):
    from dpfl.shared.ldm.models import fingerprint_modules, fresh_unet, load_ldm
    from dpfl.shared.privacy.guarantee import PrivacyGuarantee

    run = tmp_path / "run"
    out = _train_full(setup, run, "--seed", "3")
    for name in ("config.json", "metrics.jsonl", "samples_before.png", "samples_after.png",
                 "accountant.json", "model/model_index.json", "model/unet/config.json",
                 "model/vae/diffusion_pytorch_model.safetensors", "model/privacy.json"):
        assert (run / name).exists(), name
    assert not (run / "model.partial").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "loss" in m and "final" not in m]) == out["steps"] == 4
    ledger = PersistentAccountant.load(run / "accountant.json")
    assert metrics[-1]["epsilon"] == pytest.approx(ledger.epsilon()) == \
        pytest.approx(out["epsilon"])
    assert 0 < ledger.epsilon() < 8
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["mode"] == "full" and cfg["config"]["init"] == "scratch"
    assert "public autoencoder" in cfg["protocol"]

    base, model = load_ldm(setup / "base"), load_ldm(run / "model")
    assert model.card["fingerprint"] == out["fingerprint"] == model.fingerprint()
    assert fingerprint_modules({"vae": model.vae}) == fingerprint_modules({"vae": base.vae}) \
        == model.card["autoencoder"]["fingerprint"]
    assert model.spec == base.spec and _arch(model.unet) == _arch(base.unet)
    start = fresh_unet(base.unet, 3).state_dict()
    for name, p in model.unet.named_parameters():
        assert not torch.equal(p, start[name]) and not torch.equal(p, base.unet.state_dict()[name])
    guarantee = PrivacyGuarantee.from_file(run / "model" / "privacy.json")
    assert guarantee.status == "stated" and guarantee.accountant == "prv"
    assert guarantee.epsilon == pytest.approx(ledger.epsilon()) and guarantee.delta == 1e-3
    assert model.card["privacy"]["epsilon"] == pytest.approx(ledger.epsilon())
    _assert_states_the_ledger(run / "model" / "privacy.json", run / "accountant.json")
    assert "UNet" in guarantee.scope and guarantee.base_fingerprint == base.card["fingerprint"]

    again = _train_full(setup, run, "--seed", "3")  # same ledger: epsilon accumulates
    assert again["epsilon"] > out["epsilon"]
    assert PersistentAccountant.load(run / "accountant.json").steps == 8
    assert load_ldm(run / "model").card["privacy"]["steps"] == 8
