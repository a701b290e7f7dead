"""Issue 13, items 8 and 6: a silo's classes are matched to the base model's by NAME (folder
names percent-decoded, or a label map), never by position; and ``fmnist:private@SEED`` is
tied to the split whose public part trained the base model (its model card).

Before the fix, an image folder's labels were the alphabetical positions of its folders
("Ankle boot" trained as "T-shirt/top", a missing folder shifted every later label), with
only a warning; and an experiment with ``--seed 1`` trained "privately" on images the base
model saw."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from PIL import Image
from safetensors.torch import load_file

from dpfl.client.site import Site
from dpfl.shared.data.encode import encode_silo
from dpfl.shared.data.readers import ImageSet, read_any, write_npz
from dpfl.shared.errors import ConfigError, DataError
from dpfl.shared.federation.config import FedConfig, RoundPlan, SiteConfig
from dpfl.shared.ldm.models import FASHION_MNIST_CLASSES, build_ldm, save_ldm

ROOT = Path(__file__).resolve().parent.parent
BASE = FASHION_MNIST_CLASSES  # "T-shirt/top", "Trouser", ..., "Bag", "Ankle boot"
PUBLIC_CARD = {"data": "fmnist:public", "seed": 0}  # what models/fmnist-base's card records


def _folder(root, names, per_class=4):
    """An image folder with one sub-folder per name; class c's images are bright in row
    band c, so every image can be traced back to its folder."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            x = rng.integers(0, 40, (28, 28), dtype=np.uint8)
            x[2 * c:2 * c + 3] = 250
            Image.fromarray(x).save(root / name / f"{i}.png")
    return root


def _labels_of(ldm, data, label_map=None):
    return encode_silo(ldm, read_any(data) if not isinstance(data, ImageSet) else data,
                       label_map)[1].tolist()


# -- item 8: by name -----------------------------------------------------------------------
def test_full_silo_named_after_the_base_classes_trains_each_as_itself(tmp_path, tiny_ldm):
    """All ten folders named exactly after the base classes ('/' written as %2F): sorted
    folder order is not the base order, yet each folder trains as its own class."""
    folders = [n.replace("/", "%2F") for n in BASE]
    root = _folder(tmp_path / "silo", folders, per_class=1)
    ds = read_any(root)
    assert "T-shirt/top" in ds.class_names  # the escape is decoded
    labels = _labels_of(tiny_ldm, ds)
    assert [BASE[j] for j in labels] == [ds.class_names[i] for i in ds.labels]
    assert labels == [BASE.index(n) for n in sorted(BASE, key=lambda n: n.replace("/", "%2F"))]
    assert labels[0] == BASE.index("Ankle boot") == 9  # alphabetically first; index 0 before


def test_subset_silo_maps_each_folder_to_its_own_class(tmp_path, tiny_ldm):
    root = _folder(tmp_path / "silo", ["Trouser", "Bag", "T-shirt%2Ftop"], per_class=2)
    ds = read_any(root)
    got = dict(zip((ds.class_names[i] for i in ds.labels), _labels_of(tiny_ldm, ds)))
    assert got == {"Bag": 8, "T-shirt/top": 0, "Trouser": 1}  # not 0, 1, 2


def test_foreign_names_are_refused_listing_both_sets_and_accepted_with_a_label_map(
        tmp_path, tiny_ldm):
    root = _folder(tmp_path / "silo", ["boots", "tops", "Sandal"], per_class=2)
    with pytest.raises(DataError) as err:
        _labels_of(tiny_ldm, root)
    msg = str(err.value)
    assert "['boots', 'tops']" in msg and "match no class of the base model" in msg
    assert "Silo classes: ['Sandal', 'boots', 'tops']" in msg
    assert f"base model classes: {list(BASE)}" in msg and "--label-map" in msg and "%2F" in msg
    from dpfl.shared.data.labels import read_label_map

    (tmp_path / "map.json").write_text(json.dumps({"boots": "Ankle boot", "tops": "T-shirt/top"}))
    labels = _labels_of(tiny_ldm, root, read_label_map(tmp_path / "map.json"))
    assert labels == [5, 5, 9, 9, 0, 0]  # Sandal, boots, tops (folder order)


def test_label_map_errors_are_named(tmp_path, tiny_ldm):
    from dpfl.shared.data.labels import read_label_map

    root = _folder(tmp_path / "silo", ["boots"], per_class=1)
    with pytest.raises(DataError, match=re.escape("names ['Boots'], which are not classes")):
        _labels_of(tiny_ldm, root, {"boots": "Boots"})
    (tmp_path / "bad.json").write_text('["boots"]')
    with pytest.raises(DataError, match="must be a JSON object of strings"):
        read_label_map(tmp_path / "bad.json")
    with pytest.raises(DataError, match="does not exist"):
        read_label_map(tmp_path / "none.json")
    # two folders meaning one class is refused unless a label map says so
    two = _folder(tmp_path / "two", ["3", "Dress"], per_class=1)
    with pytest.raises(DataError, match="both match base class 3"):
        _labels_of(tiny_ldm, two)
    assert _labels_of(tiny_ldm, two, {"3": "Dress", "Dress": "Dress"}) == [3, 3]


def test_npz_with_its_own_class_names_is_matched_by_name(tmp_path, tiny_ldm):
    x = np.zeros((4, 28, 28, 1), np.float32)
    write_npz(tmp_path / "named.npz", ImageSet(x, np.array([0, 1, 2, 0]),
                                               ("Bag", "Trouser", "Ankle boot"), "gen"))
    assert _labels_of(tiny_ldm, tmp_path / "named.npz") == [8, 1, 9, 8]
    # without class names (and with the names a reader invents, 0, 1, ...): index semantics
    np.savez(tmp_path / "plain.npz", images=np.zeros((3, 28, 28), np.uint8),
             labels=np.array([7, 0, 2]))
    assert _labels_of(tiny_ldm, tmp_path / "plain.npz") == [7, 0, 2]


def test_classes_without_images_need_no_match():
    from dpfl.shared.data.labels import class_index

    assert class_index(["Bag", "unused"], [0], BASE).tolist() == [8, -1]


def test_train_refuses_a_foreign_silo_before_spending_and_takes_a_label_map(tmp_path):
    from dpfl.client.cli import main

    save_ldm(build_ldm("tiny", seed=0), tmp_path / "base")
    root = _folder(tmp_path / "silo", ["boots", "Trouser"], per_class=10)
    args = ["train", "--data", str(root), "--model", str(tmp_path / "base"), "--epsilon", "8",
            "--delta", "1e-3", "--batch-size", "10", "-k", "1", "--rank", "1",
            "--planned-steps", "2", "--sample-steps", "1", "--per-class", "1", "--device", "cpu",
            "--no-progress"]
    res = CliRunner().invoke(main, [*args, "--run-dir", str(tmp_path / "a")])
    assert res.exit_code == 1 and "['boots'] match no class of the base model" in res.output
    assert not (tmp_path / "a" / "accountant.json").exists()
    (tmp_path / "map.json").write_text('{"boots": "Ankle boot"}')
    res = CliRunner().invoke(main, [*args, "--run-dir", str(tmp_path / "b"), "--label-map",
                                    str(tmp_path / "map.json")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["config"]["job"]["label_map"] == str(tmp_path / "map.json")


def test_data_inspect_shows_the_base_class_of_each_silo_class(tmp_path):
    from dpfl.client.cli import main

    save_ldm(build_ldm("tiny", seed=0), tmp_path / "base")
    root = _folder(tmp_path / "silo", ["T-shirt%2Ftop", "boots"], per_class=1)
    (tmp_path / "map.json").write_text('{"boots": "Ankle boot"}')
    args = ["data", "inspect", str(root), "--model", str(tmp_path / "base")]
    res = CliRunner().invoke(main, [*args, "--label-map", str(tmp_path / "map.json")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["base_classes"] == {"T-shirt/top": "T-shirt/top", "boots": "Ankle boot"}
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "['boots'] match no class of the base model" in res.output


# -- item 8 end to end: a federation round with a subset, a foreign and a named .npz silo ---
class SiteGrid:
    """A Flower grid whose nodes are real :class:`Site` objects, answering at once."""

    def __init__(self, sites: dict[int, Site]):
        self.sites = sites

    def get_node_ids(self):
        return list(self.sites)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what the SuperLink does
            site = self.sites[msg.metadata.dst_node_id]
            plan = RoundPlan.from_record(dict(msg.content["config"]))
            adapter = {k: v.numpy() for k, v in msg.content["arrays"].items()}
            update, metrics = site.train_round(plan, adapter)
            reply = Message(content=RecordDict({
                "metrics": MetricRecord(metrics),
                "site": ConfigRecord({"site-id": site.cfg.site_id}),
                "arrays": ArrayRecord({k: Array(v) for k, v in update.items()})}), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
            out.append(reply)
        return out


def test_a_federation_trains_each_site_on_its_classes_by_name(tmp_path, task_identity):
    from dpfl.server.rounds import run_federation

    base = save_ldm(build_ldm("tiny", seed=0), tmp_path / "base")
    subset = _folder(tmp_path / "subset", ["Trouser", "Bag", "T-shirt%2Ftop"], per_class=8)
    foreign = _folder(tmp_path / "foreign", ["boots", "sneakers"], per_class=12)
    (tmp_path / "map.json").write_text('{"boots": "Ankle boot", "sneakers": "Sneaker"}')
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 24)
    write_npz(tmp_path / "named.npz", ImageSet(rng.random((24, 28, 28, 1), dtype=np.float32), y,
                                               ("Coat", "Sandal", "Shirt"), "gen"))
    common = {"base-model": str(base), "epsilon-budget": 50.0, "delta": 1e-3, "device": "cpu"}
    nodes = {1: ("subset", subset, {}), 2: ("foreign", foreign, {"label-map": str(
        tmp_path / "map.json")}), 3: ("named", tmp_path / "named.npz", {})}
    sites = {n: Site(SiteConfig.from_node_config({
        **common, "site-id": name, "data": str(data), "state-dir": str(tmp_path / name),
        **extra})) for n, (name, data, extra) in nodes.items()}
    cfg = FedConfig(base_model=str(base), run_dir=str(tmp_path / "run"), num_rounds=1,
                    batch_size=8, noise_multiplicity=1, target_epsilon=8.0, min_available_nodes=3,
                    min_train_nodes=3, sample_every=0, sample_steps=1)
    run_federation(SiteGrid(sites), cfg)
    led = json.loads((tmp_path / "run" / "ledger.json").read_text())
    (r1,) = led["rounds"]
    assert set(r1["sites"]) == {"subset", "foreign", "named"} and r1["rejected"] == {}
    assert all(s["trained"] for s in r1["sites"].values())
    expected = {"subset": [8] * 8 + [0] * 8 + [1] * 8,  # Bag, T-shirt/top, Trouser (sorted)
                "foreign": [9] * 12 + [7] * 12,  # boots -> Ankle boot, sneakers -> Sneaker
                "named": [(4, 5, 6)[c] for c in y]}  # Coat, Sandal, Shirt
    for name, want in expected.items():
        (cache,) = (tmp_path / name).glob("latents-*.safetensors")  # what the site trained on
        assert load_file(cache)["labels"].tolist() == want, name


def test_a_site_refuses_a_foreign_silo_and_tells_the_coordinator_nothing_more(tmp_path):
    base = save_ldm(build_ldm("tiny", seed=0), tmp_path / "base")
    root = _folder(tmp_path / "silo", ["boots"], per_class=2)
    site = Site(SiteConfig(site_id="h", data=str(root), base_model=str(base),
                           state_dir=str(tmp_path / "state"), device="cpu"))
    ldm = site.base_model(build_ldm("tiny", seed=0).fingerprint())
    with pytest.raises(DataError) as err:
        site.local_silo(ldm)
    assert "boots" not in str(err.value) and "site's own log" in str(err.value)
    assert "boots" in str(err.value.__cause__)


# -- item 6: the private split is the base model's ------------------------------------------
def test_the_private_split_is_tied_to_the_base_models_card():
    from dpfl.shared.data.sources import load_source, pretrain_split_seed, tie_split

    assert pretrain_split_seed(PUBLIC_CARD) == 0
    assert pretrain_split_seed({"data": "fmnist:public@3"}) == 3
    assert pretrain_split_seed({"data": "/srv/public-images"}) is None
    assert pretrain_split_seed({}) is None
    assert tie_split("fmnist:private", {"data": "fmnist:public@3"}) == 3  # follows the card
    assert tie_split("fmnist:private@0", PUBLIC_CARD) == 0
    assert tie_split("fmnist:private@1", None) == 1  # no base model: as written
    assert tie_split("fmnist:test@5", PUBLIC_CARD) == 5  # the test set is never public
    with pytest.raises(DataError, match=re.escape(
            "the base model was pretrained on 'fmnist:public' (its model card), the public "
            "part of the split with seed 0; the private part of seed 1 holds images the base "
            "model saw. Use fmnist:private@0")):
        load_source("fmnist:private@1", base_card=PUBLIC_CARD)


def _base_with_card(path, data):
    return save_ldm(build_ldm("tiny", seed=0), path, card={"data": data})


def test_train_and_simulate_and_a_site_refuse_another_seeds_private_split(tmp_path):
    from dpfl.client.cli import main
    from dpfl.server.simulate import SimulationSetup, prepare_sites

    base = _base_with_card(tmp_path / "base", "fmnist:public")
    res = CliRunner().invoke(main, ["train", "--data", "fmnist:private@1", "--model", str(base),
                                    "--run-dir", str(tmp_path / "run"), "--device", "cpu"])
    assert res.exit_code == 1 and "holds images the base model saw" in res.output
    assert not (tmp_path / "run" / "accountant.json").exists()
    cfg = FedConfig(base_model=str(base), run_dir=str(tmp_path / "fed"))
    with pytest.raises(DataError, match="holds images the base model saw"):
        prepare_sites(SimulationSetup(data="fmnist:private@1"), cfg)
    assert not (tmp_path / "fed" / "sites").exists()
    site = Site(SiteConfig(site_id="h", data="fmnist:private@1", base_model=str(base),
                           state_dir=str(tmp_path / "state"), device="cpu"))
    with pytest.raises(DataError) as err:
        site.local_silo(site.base_model(build_ldm("tiny", seed=0).fingerprint()))
    assert "holds images the base model saw" in str(err.value.__cause__)


def test_an_experiment_trains_on_the_base_models_split_whatever_its_seed(tmp_path):
    from dpfl.server.experiment import Experiment, private_data

    shipped = ROOT / "models" / "fmnist-base"
    assert json.loads((shipped / "model_card.json").read_text())["data"] == "fmnist:public"
    for seed in (0, 1, 7):
        exp = Experiment("central", seed=seed, base_model=str(shipped))
        assert private_data(exp) == "fmnist:private@0"
    other = _base_with_card(tmp_path / "b3", "fmnist:public@3")
    assert private_data(Experiment("federated", seed=1, base_model=str(other))) == \
        "fmnist:private@3"
    foreign = _base_with_card(tmp_path / "bx", "/srv/public")
    with pytest.raises(ConfigError, match="not the standard split's public part"):
        private_data(Experiment("central", base_model=str(foreign)))


def test_seed_one_private_split_overlaps_seed_zero_public():
    """Why: what the old experiment with --seed 1 trained on, the base model had seen."""
    from dpfl.shared.data.fmnist import standard_split
    from tests.conftest import fmnist_available

    if not fmnist_available():
        pytest.skip("Fashion-MNIST not installed")
    public0, private1 = standard_split(0).public, standard_split(1).private
    seen = {img.tobytes() for img in public0.images}
    assert sum(img.tobytes() in seen for img in private1.images) == 7546


def test_cli_help_names_the_label_map():
    from dpfl.client.cli import main

    for cmd in ("train", "train-full", "join"):
        assert "--label-map" in CliRunner().invoke(main, [cmd, "--help"]).output


def test_latent_cache_is_keyed_by_the_label_map(tmp_path):
    """A cache of labels matched with another label map (or the old, by-index rule) is not
    reused: its name carries how labels were matched."""
    base = save_ldm(build_ldm("tiny", seed=0), tmp_path / "base")
    root = _folder(tmp_path / "silo", ["boots"], per_class=2)
    fp = build_ldm("tiny", seed=0).fingerprint()
    labels = {}
    for target in ("Ankle boot", "Sneaker"):
        (tmp_path / "map.json").write_text(json.dumps({"boots": target}))
        site = Site(SiteConfig(site_id="h", data=str(root), base_model=str(base), device="cpu",
                               state_dir=str(tmp_path / "state"),
                               label_map=str(tmp_path / "map.json")))
        labels[target] = site.silo(site.base_model(fp))[1]
    assert torch.equal(labels["Ankle boot"], torch.tensor([9, 9]))
    assert torch.equal(labels["Sneaker"], torch.tensor([7, 7]))
    assert len(list((tmp_path / "state").glob("latents-*"))) == 2


def test_node_config_carries_an_absolute_label_map(tmp_path, monkeypatch):
    """The SuperNode's ClientApp runs in another working directory: a relative label map
    given to `dpfl-client join` must reach it as an absolute path."""
    from dpfl.client.deploy import node_config_arg
    from dpfl.shared.federation.config import SiteConfig

    monkeypatch.chdir(tmp_path)
    site = SiteConfig(site_id="s", data="silo", state_dir="state", label_map="map.json")
    arg = node_config_arg(site)
    assert f'label-map="{tmp_path / "map.json"}"' in arg
    assert 'label-map=""' in node_config_arg(SiteConfig(site_id="s", data="silo"))
