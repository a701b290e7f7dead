"""Bad input (issue #7): a test per row of docs/bad-input.md (rows 1-13, 16-17; rows 14-15, keys
and certificates, are in test_bad_input_tls.py). Each bad input gets an error of dpfl's own
type whose message names the file, key or value, and loses nothing: the silo and the state
directory are not modified, the accountant is not touched, the other sites' updates still
aggregate and the ledger records the rejection."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dpfl.client.site import Site
from dpfl.shared.data.readers import read_image_folder
from dpfl.shared.errors import (
    BudgetExhausted,
    ConfigError,
    DataError,
    IncompatibleAdapter,
    ModelError,
    StateError,
)
from dpfl.shared.federation.config import FedConfig, RoundPlan, SiteConfig
from dpfl.shared.ldm.lora import (
    LoraSpec,
    adapter_state,
    load_adapter,
    save_adapter,
    spec_for_plan,
    wrap_unet,
)
from dpfl.shared.ldm.models import build_ldm, save_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.dpsgd import DPConfig, train_lora

SITE_LOG = "dpfl.client.site"


# -- helpers -------------------------------------------------------------------------------
def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes: "not modified" is equality of two of these."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    ldm = build_ldm("tiny", seed=0)
    path = save_ldm(ldm, tmp_path_factory.mktemp("base") / "base")
    return path, ldm.fingerprint()


def _npz(path: Path, n: int = 24, labels=None, size: int = 28, class_names=None) -> Path:
    rng = np.random.default_rng(0)
    y = np.asarray(labels if labels is not None else rng.integers(0, 3, n), dtype=np.int64)
    x = rng.random((len(y), size, size, 1)).astype(np.float32)
    np.savez(path, images=(x * 255).astype(np.uint8), labels=y,
             **({"class_names": np.asarray(class_names)} if class_names is not None else {}))
    return path


def _folder(root: Path, per_class: int = 4, shape=(28, 28)) -> Path:
    rng = np.random.default_rng(1)
    for cls in ("0", "1"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def _site(tmp: Path, data, base_dir, **kw) -> Site:
    cfg = dict(site_id="h1", data=str(data), base_model=str(base_dir), state_dir=str(tmp / "state"),
               epsilon_budget=8.0, delta=1e-3, device="cpu")
    return Site(SiteConfig(**{**cfg, **kw}))


def _plan(fingerprint: str, **kw) -> RoundPlan:
    return RoundPlan(**{"num_rounds": 2, "batch_size": 16, "noise_multiplicity": 1,
                        "base_fingerprint": fingerprint, **kw})


def _global(plan: RoundPlan) -> dict[str, np.ndarray]:
    unet = build_ldm("tiny", seed=0).unet
    torch.manual_seed(plan.seed)  # the coordinator's shared initialisation
    model = wrap_unet(unet, spec_for_plan(plan))
    return {k: v.numpy() for k, v in adapter_state(model).items()}


def _spent(state: Path, budget: float = 8.0, delta: float = 1e-3,
           history=((1.0, 0.3, 3),)) -> bytes:
    """An accountant that has spent something already; returns its bytes."""
    acc = PersistentAccountant.open(state / "accountant.json", delta=delta, budget=budget)
    for h in history:
        acc.commit(*h)
    return (state / "accountant.json").read_bytes()


def _refused_by_site(tmp, base, data, caplog, *, error=DataError, **site_kw) -> str:
    """Run one round at a site on bad ``data``; returns the error the site logged locally.

    Asserts what must hold for every bad silo: the error leaving the site does not carry the
    local details (file names, labels), the silo is unchanged, nothing was spent."""
    base_dir, fp = base
    (tmp / "state").mkdir(exist_ok=True)
    acc_bytes = _spent(tmp / "state")
    data = Path(data)
    silo_before = files(data) if data.is_dir() else {data.name: data.read_bytes()}
    site = _site(tmp, data, base_dir, **site_kw)
    plan = _plan(fp)
    with caplog.at_level(logging.ERROR, logger=SITE_LOG):
        with pytest.raises(error) as err:
            site.train_round(plan, _global(plan))
    assert "site's own log" in str(err.value) and str(data) not in str(err.value)
    assert (files(data) if data.is_dir() else {data.name: data.read_bytes()}) == silo_before
    assert (tmp / "state" / "accountant.json").read_bytes() == acc_bytes
    assert not list((tmp / "state").glob("latents-*"))
    return "\n".join(r.getMessage() for r in caplog.records if r.name == SITE_LOG)


# -- rows 1-5: bad silos -------------------------------------------------------------------
def test_corrupt_image_file_is_named_and_nothing_is_spent(tmp_path, base, caplog):
    silo = _folder(tmp_path / "silo")
    (silo / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    with pytest.raises(DataError, match=r"broken\.png.*cannot decode image"):
        read_image_folder(silo)
    assert len(read_image_folder(silo, skip_bad=True).skipped) == 1  # --skip-bad lists it
    logged = _refused_by_site(tmp_path, base, silo, caplog)
    assert "broken.png" in logged


@pytest.mark.parametrize("case, shape, expected", [
    ("odd-size", (20, 20), r"odd\.png: image is 20x20 with 1 channel\(s\), but earlier images "
                           r"are 28x28"),
    ("rgb-silo", (28, 28, 3), r"3 channel\(s\) but the model expects 1"),
    ("too-large", (40, 40), r"images are 40x40 pixels but the model takes at most 32x32"),
], ids=["odd-size", "rgb-silo", "too-large"])
def test_image_of_wrong_size_or_channels_is_named(tmp_path, base, caplog, case, shape, expected):
    if case == "odd-size":
        silo = _folder(tmp_path / "silo")
        Image.fromarray(np.zeros(shape, np.uint8)).save(silo / "0" / "odd.png")
    else:  # every image of the silo has the wrong geometry for the base model
        silo = _folder(tmp_path / "silo", shape=shape)
    logged = _refused_by_site(tmp_path, base, silo, caplog)
    assert str(silo) in logged
    assert re.search(expected, logged), logged


@pytest.mark.parametrize("case, expected", [
    ("no-class-folders", "has no class sub-folders"),
    ("empty-class-folders", "holds no readable images"),
    ("empty-npz", "the silo holds no images"),
], ids=["no-class-folders", "empty-class-folders", "empty-npz"])
def test_empty_silo_is_named(tmp_path, base, caplog, case, expected):
    if case == "empty-npz":
        silo = _npz(tmp_path / "empty.npz", labels=[])
    else:
        silo = tmp_path / "silo"
        silo.mkdir()
        if case == "empty-class-folders":
            (silo / "0").mkdir()
            (silo / "1").mkdir()
    logged = _refused_by_site(tmp_path, base, silo, caplog)
    assert str(silo) in logged and expected in logged


def test_silo_smaller_than_the_batch(tmp_path, base, tiny_ldm):
    """Central training refuses it before the ledger is touched; a federated site trains
    with the whole silo as its batch (the coordinator's batch size is a proposal)."""
    acc_bytes = _spent(tmp_path)
    acc = PersistentAccountant.open(tmp_path / "accountant.json", delta=1e-3, budget=8.0)
    dp = DPConfig(noise_multiplier=1.0, delta=1e-3, batch_size=64, device="cpu")
    z, y = torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,))
    with pytest.raises(ConfigError, match="batch_size=64 exceeds the silo size 16; lower it"):
        train_lora(tiny_ldm, z, y, LoraSpec(rank=1), dp, acc, progress=False)
    assert (tmp_path / "accountant.json").read_bytes() == acc_bytes
    site = _site(tmp_path, tmp_path / "unused.npz", base[0])
    assert site.dp_config(_plan(base[1], batch_size=64), 16).batch_size == 16


@pytest.mark.parametrize("labels, names, expected", [
    ([0, 1, 5], ["a", "b"], r"label 5 out of range 0\.\.1 \(2 classes\)"),
    ([0, -1, 1], None, r"label -1 out of range"),
    ([0, 12, 1], None, r"label 12 is out of range for the base model's 10 classes"),
], ids=["beyond-class-names", "negative", "beyond-base-model"])
def test_label_out_of_range_is_named(tmp_path, base, caplog, labels, names, expected):
    silo = _npz(tmp_path / "labels.npz", labels=labels * 8, class_names=names)
    logged = _refused_by_site(tmp_path, base, silo, caplog)
    assert "labels.npz" in logged and re.search(expected, logged), logged


# -- rows 16-17: classes and splits that do not fit the base model -------------------------
@pytest.mark.parametrize("case", ["foreign-folders", "foreign-npz", "label-map-to-no-class"])
def test_classes_that_match_no_base_class_are_refused(tmp_path, base, caplog, case):
    """Labels are matched by class name, never by position: a silo class that names no base
    class is refused at the site, listing both sets of names, and nothing is spent."""
    site_kw = {}
    if case == "foreign-npz":
        silo = _npz(tmp_path / "silo.npz", class_names=["benign", "malignant", "Bag"])
    else:
        silo = _folder(tmp_path / "silo")
        (silo / "0").rename(silo / "benign")
        (silo / "1").rename(silo / "malignant")
    if case == "label-map-to-no-class":
        (tmp_path / "map.json").write_text('{"benign": "Bag", "malignant": "Malignant"}')
        site_kw["label_map"] = str(tmp_path / "map.json")
    logged = _refused_by_site(tmp_path, base, silo, caplog, **site_kw)
    if case == "label-map-to-no-class":
        assert "the label map names ['Malignant'], which are not classes" in logged
    else:
        assert "['benign', 'malignant'] match no class of the base model" in logged
        assert "Silo classes: ['benign', 'malignant'" in logged and "'Ankle boot']" in logged


def test_private_split_other_than_the_base_models_is_refused(tmp_path, base):
    """fmnist:private@1 holds images that trained a base model pretrained on fmnist:public
    (seed 0): refused before any image is read, nothing spent."""
    base_dir = save_ldm(build_ldm("tiny", seed=0), tmp_path / "carded",
                        card={"data": "fmnist:public"})
    acc_bytes = _spent(tmp_path / "state")
    site = _site(tmp_path, "fmnist:private@1", base_dir)
    plan = _plan(base[1])
    with pytest.raises(DataError, match="site's own log") as err:
        site.train_round(plan, _global(plan))
    assert "holds images the base model saw. Use fmnist:private@0" in str(err.value.__cause__)
    assert (tmp_path / "state" / "accountant.json").read_bytes() == acc_bytes
    assert not list((tmp_path / "state").glob("latents-*"))


# -- row 6: base model ---------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing", "incomplete", "other-weights", "unannounced"])
def test_missing_or_mismatching_base_model_is_named(tmp_path, base, case):
    base_dir, fp = base
    model = tmp_path / "model"
    announced = fp
    if case == "incomplete":
        shutil.copytree(base_dir, model)
        shutil.rmtree(model / "unet")
    elif case == "other-weights":
        save_ldm(build_ldm("tiny", seed=1), model)
    elif case == "unannounced":
        model, announced = base_dir, ""
    silo = _npz(tmp_path / "silo.npz")
    acc_bytes = _spent(tmp_path / "state")
    model_files = files(model) if model.exists() else {}
    site = _site(tmp_path, silo, model)
    plan = _plan(announced)
    m = re.escape(str(model))
    expected = {"missing": f"model directory {m} does not exist",
                "incomplete": f"model directory {m} has no 'unet/' subfolder",
                "other-weights": f"base model in {m} has fingerprint sha256:.* expected {fp}",
                "unannounced": "announced no base model fingerprint"}[case]
    with pytest.raises(ModelError, match=expected):
        site.train_round(plan, _global(plan))
    assert (tmp_path / "state" / "accountant.json").read_bytes() == acc_bytes
    assert not list((tmp_path / "state").glob("latents-*"))  # the silo was not even read
    assert (files(model) if model.exists() else {}) == model_files


# -- row 7: adapters -----------------------------------------------------------------------
@pytest.mark.parametrize("case, expected", [
    ("extra-key", r"1 unexpected key\(s\) \['base_model.model.smuggled.lora_A.weight'\]"),
    ("missing-key", r"1 missing key\(s\) \['base_model.model.*lora_A.weight'\]"),
    ("wrong-shape", r"adapter entry 'base_model.model.*lora_A.weight' has shape \(3, 3\)"),
], ids=["extra-key", "missing-key", "wrong-shape"])
def test_proposed_adapter_with_unexpected_keys_or_shapes(tmp_path, base, case, expected):
    """The site refuses the coordinator's adapter before its accountant is touched."""
    base_dir, fp = base
    acc_bytes = _spent(tmp_path / "state")
    site = _site(tmp_path, _npz(tmp_path / "silo.npz"), base_dir)
    plan = _plan(fp)
    adapter = _global(plan)
    key = next(k for k in adapter if "lora_A" in k)
    if case == "extra-key":
        adapter["base_model.model.smuggled.lora_A.weight"] = np.zeros((2, 2), np.float32)
    elif case == "missing-key":
        del adapter[key]
    else:
        adapter[key] = np.zeros((3, 3), np.float32)
    with pytest.raises(IncompatibleAdapter, match=expected):
        site.train_round(plan, adapter)
    assert (tmp_path / "state" / "accountant.json").read_bytes() == acc_bytes


@pytest.mark.parametrize("case", ["extra-key", "missing-key", "wrong-shape"])
def test_adapter_directory_with_unexpected_keys_or_shapes(tmp_path, tiny_ldm, case):
    """peft alone only warns about extra or missing keys; dpfl refuses and names them."""
    from safetensors.torch import load_file, save_file

    path = save_adapter(wrap_unet(tiny_ldm.unet, LoraSpec(rank=2)), tmp_path / "adapter")
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_A" in k)
    if case == "extra-key":
        tensors["base_model.model.smuggled.lora_A.weight"] = torch.zeros(2, 2)
    elif case == "missing-key":
        del tensors[key]
    else:
        tensors[key] = torch.zeros(7, 3)
    save_file(tensors, weights)
    before = files(path)
    expected = {"extra-key": "1 unexpected key(s) ['base_model.model.smuggled.lora_A.weight']",
                "missing-key": f"1 missing key(s) ['{key}']",
                "wrong-shape": "size mismatch for " + key.replace(".weight", ".default.weight")
                }[case]
    with pytest.raises(IncompatibleAdapter) as err:
        load_adapter(tiny_ldm.unet, path)
    assert str(path) in str(err.value) and expected in str(err.value), str(err.value)
    assert files(path) == before


# -- rows 8-10: what the coordinator receives ----------------------------------------------
def _bigger(ref, key):
    a = ref[key]
    return {**ref, key: np.zeros((a.shape[0] * 2, *a.shape[1:]), a.dtype)}


def _one(ref, key, value):
    a = ref[key].copy()
    a.flat[0] = value
    return {**ref, key: a}


#: site -> (how its reply is made from the global adapter, its num-examples, the reason
#: the coordinator must give; None: an honest site whose update is averaged)
REPLIES = {
    "honest-a": (lambda r, k: {n: v + 0.01 for n, v in r.items()}, 30, None),
    "honest-b": (lambda r, k: {n: v - 0.02 for n, v in r.items()}, 10, None),
    "nan": (lambda r, k: _one(r, k, np.nan), 20, "holds non-finite values (NaN or inf)"),
    "inf": (lambda r, k: _one(r, k, -np.inf), 20, "holds non-finite values (NaN or inf)"),
    "huge-norm": (lambda r, k: _one(r, k, 1e7), 20, "update norm 1e+07 is beyond any plausible"),
    "oversized-extra": (lambda r, k: {**r, "base_model.model.smuggled.weight":
                                      np.zeros(2_000_000, np.float32)}, 20,
                        "unexpected keys (missing [], extra ['base_model.model.smuggled.weight'])"),
    "oversized-shape": (lambda r, k: _bigger(r, k), 20, "has shape"),
    "missing-key": (lambda r, k: {n: v for n, v in r.items() if n != k}, 20, "unexpected keys"),
    "float64": (lambda r, k: {n: v.astype(np.float64) for n, v in r.items()}, 20,
                "has dtype float64, expected floating point float32"),
    "bad-weight": (lambda r, k: r, 0.5, "num-examples must be a whole number >= 1, got 0.5"),
}


class FakeGrid:
    """A Flower grid whose nodes answer at once with the replies in :data:`REPLIES`, plus a
    node whose ClientApp raised (Flower's error reply)."""

    def __init__(self):
        self.sites = {i + 1: name for i, name in enumerate(REPLIES)}
        self.error_node = len(REPLIES) + 1

    def get_node_ids(self):
        return [*self.sites, self.error_node]

    def send_and_receive(self, msgs, timeout=None):
        from flwr.app import (
            Array,
            ArrayRecord,
            ConfigRecord,
            Error,
            Message,
            MetricRecord,
            RecordDict,
        )

        replies = []
        for i, msg in enumerate(msgs):
            msg.metadata.__dict__["_message_id"] = f"m{i}"  # what the SuperLink sets
            node = msg.metadata.dst_node_id
            if node == self.error_node:
                replies.append(Message(Error(code=2, reason="<class 'DataError'>:<'site h9: "
                                             "its data cannot be used for training'>"),
                                       reply_to=msg))
                continue
            name = self.sites[node]
            make, n, _ = REPLIES[name]
            ref = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            arrays = make(ref, sorted(k for k in ref if "lora_B" in k)[0])
            replies.append(Message(RecordDict({
                "arrays": ArrayRecord({k: Array(np.ascontiguousarray(v))
                                       for k, v in arrays.items()}),
                "metrics": MetricRecord({"num-examples": n, "epsilon": 1.0, "delta": 1e-3,
                                         "budget": 8.0, "sigma": 1.0, "sample-rate": 0.1,
                                         "steps": 3, "trained": 1, "exhausted": 0}),
                "site": ConfigRecord({"site-id": name})}), reply_to=msg))
        return replies


def test_bad_updates_are_rejected_logged_and_the_rest_aggregates(tmp_path, base, task_identity):
    """NaN/inf, an implausible norm, oversized replies (extra keys, larger tensors), a wrong
    dtype or weight and a site's error reply: each is rejected with its reason in the
    ledger, every site's spend is still on record, and the round's aggregate is exactly
    the example-weighted mean of the two honest updates."""
    from safetensors.numpy import load_file

    from dpfl.server.rounds import run_federation

    cfg = FedConfig(base_model=str(base[0]), run_dir=str(tmp_path / "run"), num_rounds=1,
                    min_available_nodes=0, sample_every=0, sample_steps=1)
    plan = cfg.plan(base[1])
    start = _global(plan)
    run_federation(FakeGrid(), cfg)
    led = json.loads((tmp_path / "run" / "ledger.json").read_text())
    (entry,) = led["rounds"]
    want = {name: reason for name, (_, _, reason) in REPLIES.items() if reason}
    assert set(entry["rejected"]) == {*want, f"node-{len(REPLIES) + 1}"}
    for name, reason in want.items():
        assert reason in entry["rejected"][name], (name, entry["rejected"][name])
    assert "client error" in entry["rejected"][f"node-{len(REPLIES) + 1}"]
    assert set(entry["sites"]) == set(REPLIES)  # rejected or not, the spend is on record
    glob = load_file(tmp_path / "run" / "global" / "adapter.safetensors")
    for k, v in start.items():  # (30 * 0.01 + 10 * -0.02) / 40 = 0.0025, by hand
        np.testing.assert_allclose(glob[k], v + 0.0025, atol=1e-6)
        assert glob[k].dtype == np.float32
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert metrics[-1]["accepted"] == 2


def test_oversized_proposal_is_refused_by_the_site(tmp_path, base):
    """A proposed adapter larger than the UNet itself is not even loaded or trained on."""
    base_dir, fp = base
    acc_bytes = _spent(tmp_path / "state")
    site = _site(tmp_path, _npz(tmp_path / "silo.npz"), base_dir)
    plan = _plan(fp)
    n_unet = sum(p.numel() for p in build_ldm("tiny", seed=0).unet.parameters())
    adapter = {**_global(plan), "base_model.model.huge": np.zeros(n_unet, np.float32)}
    with pytest.raises(IncompatibleAdapter, match=f"more than the base UNet's {n_unet:,} "
                                                  "parameters; refusing to train on it"):
        site.train_round(plan, adapter)
    assert (tmp_path / "state" / "accountant.json").read_bytes() == acc_bytes
    assert not list((tmp_path / "state").glob("latents-*"))


# -- row 11: configuration values ----------------------------------------------------------
@pytest.mark.parametrize("make, expected", [
    (lambda: DPConfig(target_epsilon=-1.0), r"target_epsilon must be a finite number > 0, got -1"),
    (lambda: FedConfig.from_run_config({"target-epsilon": -2}),
     r"target-epsilon=-2.0 is out of range: it must be > 0"),
    (lambda: SiteConfig.from_node_config({"data": "d", "epsilon-budget": -1}),
     r"epsilon-budget must be > 0, got -1"),
    (lambda: DPConfig(delta=1e-2).check_dataset(200),
     r"delta=0.01 must be < 1/n = 0.005 for a silo of 200 examples"),
    (lambda: SiteConfig.from_node_config({"data": "d", "delta": 1.0}),
     r"delta must be in \(0, 1\), got 1.0"),
    (lambda: LoraSpec(rank=0), r"LoRA rank must be an integer >= 1, got 0"),
    (lambda: FedConfig.from_run_config({"lora-rank": 0}),
     r"lora-rank=0 is out of range: it must be an integer >= 1"),
    (lambda: FedConfig.from_run_config({"round-timeout": -5}),
     r"round-timeout=-5.0 is out of range: it must be a finite number > 0"),
    (lambda: FedConfig.from_run_config({"max-update-norm": float("nan")}),
     r"max-update-norm=nan is out of range"),
], ids=["dp-negative-epsilon", "run-negative-epsilon", "site-negative-budget", "delta-vs-n",
        "site-delta-1", "lora-rank-0", "run-lora-rank-0", "round-timeout", "max-update-norm-nan"])
def test_config_value_out_of_range_is_named(make, expected):
    with pytest.raises(ConfigError, match=expected):
        make()


@pytest.mark.parametrize("args, expected", [
    (["--epsilon", "-1"], "Invalid value for '--epsilon': -1.0 is not in the range x>0"),
    (["--delta", "1"], "Invalid value for '--delta': 1.0 is not in the range 0<x<1"),
    (["--rank", "0"], "Invalid value for '--rank': 0 is not in the range x>=1"),
], ids=["epsilon", "delta", "rank"])
def test_cli_rejects_out_of_range_options(tmp_path, args, expected):
    from dpfl.client.cli import main

    res = CliRunner().invoke(main, ["train", "--data", "x.npz", "--model", "m",
                                    "--run-dir", str(tmp_path / "run"), *args])
    assert res.exit_code == 2 and expected in res.output, res.output
    assert not (tmp_path / "run").exists()


def test_site_delta_not_below_one_over_n_spends_nothing(tmp_path, base):
    base_dir, fp = base
    acc_bytes = _spent(tmp_path / "state", delta=0.05)
    site = _site(tmp_path, _npz(tmp_path / "silo.npz", n=48), base_dir, delta=0.05)
    plan = _plan(fp)
    with pytest.raises(ConfigError, match=r"delta=0.05 must be < 1/n = 0.0208 for a silo of 48"):
        site.train_round(plan, _global(plan))
    assert (tmp_path / "state" / "accountant.json").read_bytes() == acc_bytes


# -- row 12: budget ------------------------------------------------------------------------
def test_budget_already_spent(tmp_path, base, tiny_ldm, caplog):
    """The site says so (naming its ledger and the spend), sends no update, spends nothing;
    central training refuses before the first step."""
    base_dir, fp = base
    acc_bytes = _spent(tmp_path / "state", budget=2.0, history=[(2.2, 0.5, 5)])
    site = _site(tmp_path, _npz(tmp_path / "silo.npz", n=48), base_dir, epsilon_budget=2.0)
    plan = _plan(fp)
    with caplog.at_level(logging.WARNING, logger=SITE_LOG):
        update, metrics = site.train_round(plan, _global(plan))
    assert update is None and metrics["exhausted"] == 1 and metrics["trained"] == 0
    assert "over this client's budget of 2" in caplog.text
    assert str(tmp_path / "state" / "accountant.json") in caplog.text
    assert (tmp_path / "state" / "accountant.json").read_bytes() == acc_bytes

    acc = PersistentAccountant.open(tmp_path / "state" / "accountant.json", delta=1e-3,
                                    budget=2.0)
    dp = DPConfig(noise_multiplier=0.5, delta=1e-3, batch_size=8, device="cpu")
    with pytest.raises(BudgetExhausted, match=r"spent so far: eps=1\.\d+ in 5 steps"):
        train_lora(tiny_ldm, torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,)),
                   LoraSpec(rank=1), dp, acc, progress=False)
    assert (tmp_path / "state" / "accountant.json").read_bytes() == acc_bytes


# -- row 13: state directories -------------------------------------------------------------
@pytest.mark.parametrize("case, expected", [
    ("file-in-place", "state directory of site h1 {p} is a file, not a directory"),
    ("parent-is-a-file", "cannot create state directory of site h1 {p}"),
    ("no-permission", "state directory of site h1 {p} is not readable and writable"),
], ids=["file-in-place", "parent-is-a-file", "no-permission"])
def test_unusable_state_directory_is_named(tmp_path, base, monkeypatch, case, expected):
    state = tmp_path / "state"
    if case == "file-in-place":
        state.write_text("not a directory")
    elif case == "parent-is-a-file":
        (tmp_path / "blocker").write_text("x")
        state = tmp_path / "blocker" / "state"
    else:  # tests run as root, who may read anything: ask os.access for a non-root answer
        state.mkdir()
        monkeypatch.setattr("os.access", lambda path, mode: False)
    before = files(tmp_path)
    with pytest.raises(StateError, match=re.escape(expected.format(p=state))):
        _site(tmp_path, "silo.npz", base[0], state_dir=str(state))
    assert files(tmp_path) == before


def test_corrupt_accountant_refuses_training_and_is_kept(tmp_path, base):
    base_dir, fp = base
    (tmp_path / "state").mkdir()
    acc_file = tmp_path / "state" / "accountant.json"
    acc_file.write_text('{"format": "dpfl-accountant/1", "history": [[1.0, 0.')
    site = _site(tmp_path, _npz(tmp_path / "silo.npz"), base_dir)
    plan = _plan(fp)
    with pytest.raises(StateError, match=re.escape(f"privacy accountant state {acc_file} is "
                                                   "unreadable or corrupt")):
        site.train_round(plan, _global(plan))
    assert acc_file.read_text() == '{"format": "dpfl-accountant/1", "history": [[1.0, 0.'


def test_corrupt_latent_cache_is_rebuilt_not_trusted(tmp_path, base, caplog):
    base_dir, fp = base
    site = _site(tmp_path, _npz(tmp_path / "silo.npz"), base_dir)
    ldm = site.base_model(fp)
    z, y = site.silo(ldm)
    (cache,) = (tmp_path / "state").glob("latents-*")
    cache.write_bytes(cache.read_bytes()[:100])  # torn
    fresh = _site(tmp_path, tmp_path / "silo.npz", base_dir)
    with caplog.at_level(logging.WARNING, logger=SITE_LOG):
        z2, y2 = fresh.silo(fresh.base_model(fp))
    assert f"latent cache {cache} is unreadable" in caplog.text
    assert torch.equal(z, z2) and torch.equal(y, y2)
    assert torch.equal(_site(tmp_path, "unused", base_dir).silo(ldm)[0], z)  # rewritten


def test_corrupt_ledger_is_named_and_kept(tmp_path):
    from dpfl.shared.federation.ledger import PrivacyLedger

    (tmp_path / "ledger.json").write_text('{"rounds": [{"round": 1')
    with pytest.raises(StateError, match=re.escape(f"privacy ledger {tmp_path / 'ledger.json'}"
                                                   " is unreadable") + ".*must never be reset"):
        PrivacyLedger.load_or_create(tmp_path / "ledger.json")
    assert (tmp_path / "ledger.json").read_text() == '{"rounds": [{"round": 1'


# -- rows 18-21: the coordinator's control plane (issue #14) ---------------------------------
@pytest.mark.parametrize("case, expected", [
    ("nginx-missing", "nginx binary /nonexistent/nginx does not exist"),
    ("examples-for-unlisted-site", "--site-examples names ['ghost'], which are not listed"),
    ("examples-not-positive", "example bound must be a whole number >= 1"),
    ("no-coordinator", "no coordinator serves from"),
    ("remote-api", "the coordinator's API is on loopback only"),
])
def test_coordinator_setup_errors_are_named(tmp_path, case, expected):
    from dpfl.server.cli import main as server_main
    from dpfl.server.deploy import ServeOptions
    from dpfl.server.policy import CoordinatorPolicy
    from dpfl.server.proxy import find_nginx

    before = files(tmp_path)
    if case == "nginx-missing":
        with pytest.raises(ConfigError, match=re.escape(expected)):
            find_nginx("/nonexistent/nginx")
    elif case.startswith("examples"):
        examples = {"ghost": 5} if case == "examples-for-unlisted-site" else {"a": 0}
        with pytest.raises(ConfigError, match=re.escape(expected)):
            ServeOptions(site_keys={"a": tmp_path / "a.pub"}, site_examples=examples)
    else:
        if case == "remote-api":
            CoordinatorPolicy(state_dir=tmp_path, api_address="127.0.0.1:1",
                              public_address="0.0.0.0:2").write()
            before = files(tmp_path)
        extra = ["--superlink", "10.0.0.1:9094"] if case == "remote-api" else []
        res = CliRunner().invoke(server_main, ["status", "--state-dir", str(tmp_path), *extra])
        assert res.exit_code == 1 and expected in res.output, res.output
    assert files(tmp_path) == before  # nothing written
