"""Federated DP fine-tuning with Flower's real simulation engine (Ray), tiny models, CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from dpfl.server.rounds import GlobalCheckpoint
from dpfl.shared.data.readers import ImageSet, write_npz
from dpfl.shared.ldm.models import build_ldm, save_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.guarantee import PrivacyGuarantee

ROOT = Path(__file__).resolve().parent.parent
ALLOWED_METRICS = {"num-examples", "epsilon", "delta", "budget", "sigma", "sample-rate", "steps",
                   "trained", "exhausted"}


def _silo(path, seed, classes):
    rng = np.random.default_rng(seed)
    n = 48
    y = rng.choice(classes, n)
    x = rng.random((n, 28, 28, 1)).astype(np.float32) * 0.2
    for i, c in enumerate(y):
        x[i, 2 * c:2 * c + 8, 4:24] = 0.9
    write_npz(path, ImageSet(x, y.astype(np.int64), tuple(str(i) for i in range(10)), str(path)))


def tiny_sites(tmp, base, **site):
    """Three tiny non-IID silos on disk (classes 0-2, 3-5, 6-8) and the SiteConfig fields of
    site-0..site-2 holding them; ``site`` overrides fields of all three."""
    sites = []
    for i, classes in enumerate([(0, 1, 2), (3, 4, 5), (6, 7, 8)]):
        _silo(tmp / f"silo{i}.npz", i, classes)
        sites.append({**dict(site_id=f"site-{i}", data=str(tmp / f"silo{i}.npz"),
                             base_model=str(base), state_dir=str(tmp / f"state{i}"),
                             epsilon_budget=8.0, delta=1e-3, device="cpu"), **site})
    return sites


def _run(args, timeout=900):
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    proc = subprocess.run([sys.executable, "-m", "tests.fed_scenario", json.dumps(args)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fed")
    base = save_ldm(build_ldm("tiny", seed=0), tmp / "base")
    sites = tiny_sites(tmp, base)
    # site-2 already spent nearly all of its budget in an earlier run
    sites[2]["epsilon_budget"] = 2.0
    acc = PersistentAccountant.open(tmp / "state2" / "accountant.json", kind="rdp", delta=1e-3,
                                    budget=2.0)
    acc.commit(2.2, 0.5, 5)  # about 1.9 of 2.0
    spent_before = acc.epsilon()
    cfg = dict(base_model=str(base), run_dir=str(tmp / "run"), num_rounds=2, batch_size=16,
               noise_multiplicity=2, target_epsilon=4.0, min_available_nodes=3, sample_steps=2,
               lr=5e-3)
    args = dict(cfg=cfg, sites=sites, spy=str(tmp / "spy.jsonl"), corrupt=["site-1", 2])
    _run(args)
    return dict(tmp=tmp, args=args, sites=sites, spent_before=spent_before)


def _ledger(fed):
    return json.loads((fed["tmp"] / "run" / "ledger.json").read_text())


def test_only_adapter_tensors_and_privacy_scalars_leave_a_site(federation):
    spy = [json.loads(line) for line in (federation["tmp"] / "spy.jsonl").read_text().splitlines()]
    assert len(spy) == 5  # 3 sites in round 1, site-2 exhausted so 2 in round 2
    for reply in spy:
        assert set(reply["array_records"]) <= {"arrays"}
        assert all(("lora_A" in k or "lora_B" in k or "class_embedding" in k)
                   for k in reply["array_keys"])
        assert set(reply["metric_records"]) == {"metrics"}
        assert set(reply["metric_records"]["metrics"]) == ALLOWED_METRICS
        assert reply["config_records"] == {"site": {"site-id": reply["site"]}}


def test_epsilon_grows_equals_accountant_and_global_is_max(federation):
    led = _ledger(federation)
    r1, r2 = led["rounds"]
    for site in ("site-0", "site-1"):
        assert r2["sites"][site]["epsilon"] > r1["sites"][site]["epsilon"] > 0
        own = PersistentAccountant.load(federation["tmp"] / f"state{site[-1]}" / "accountant.json")
        assert led["sites"][site]["epsilon"] == pytest.approx(own.epsilon(), rel=1e-9)
        assert led["sites"][site]["epsilon"] <= 4.0 + 1e-6  # calibrated for the planned run
    seen = {}
    for entry in (r1, r2):  # global = max over every site's spend so far, round by round
        seen.update({site: v["epsilon"] for site, v in entry["sites"].items()})
        assert entry["global_epsilon"] == max(seen.values())
    assert led["global"]["epsilon"] == max(s["epsilon"] for s in led["sites"].values())


def test_exhausted_site_is_not_trained_and_budgets_hold(federation):
    led = _ledger(federation)
    r1, r2 = led["rounds"]
    s2 = r1["sites"]["site-2"]
    assert s2["trained"] is False and s2["exhausted"] is True
    assert "site-2" not in r2["sites"]
    own = PersistentAccountant.load(federation["tmp"] / "state2" / "accountant.json")
    assert own.epsilon() == pytest.approx(federation["spent_before"])  # nothing more spent
    for s in led["sites"].values():
        assert s["epsilon"] <= s["budget"]


def test_nan_update_is_rejected_and_logged(federation):
    r2 = _ledger(federation)["rounds"][1]
    assert "non-finite" in r2["rejected"]["site-1"]
    assert "site-1" in r2["sites"]  # its spend is still on record
    metrics = [json.loads(line) for line in
               (federation["tmp"] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["accepted"] for m in metrics] == [2, 1]


def test_global_adapter_changes_and_is_written(federation):
    run = federation["tmp"] / "run"
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    b = [v for k, v in final.items() if "lora_B" in k]
    assert b and any(np.abs(v).max() > 0 for v in b)  # B starts at zero
    assert (run / "samples_round_000.png").exists() and (run / "samples_round_002.png").exists()
    privacy = json.loads((run / "adapter" / "privacy.json").read_text())
    ledger = _ledger(federation)["global"]
    assert privacy["format"] == "dpfl-privacy/1" and privacy["epsilon"] == ledger["epsilon"]
    # what `dpfl-server export --privacy` and the evaluation read from it: the same guarantee
    stated = PrivacyGuarantee.from_file(run / "adapter" / "privacy.json")
    assert (stated.status, stated.epsilon, stated.delta) == ("stated", ledger["epsilon"],
                                                             ledger["delta"])
    assert sorted(stated.per_client) == sorted(privacy["per_client"])
    assert len(stated.per_client) == 3


def test_restarted_coordinator_resumes_without_recounting(federation):
    args = json.loads(json.dumps(federation["args"]))
    args["cfg"]["num_rounds"] = 3
    args["cfg"]["ffa"] = True  # round 3 as FFA-LoRA: A frozen, only B travels back
    # and with client-level DP (DP-FedAvg) on top of the sites' record-level DP
    args["cfg"].update(client_dp_clip=0.05, client_dp_noise=1.0, client_dp_delta=0.1,
                       client_dp_epsilon=50.0)
    args["corrupt"] = None
    run = federation["tmp"] / "run"
    a_before = {k: v for k, v in load_file(run / "global" / "adapter.safetensors").items()
                if "lora_A" in k}
    b_before = {k: v for k, v in load_file(run / "global" / "adapter.safetensors").items()
                if "lora_B" in k}
    before = _ledger(federation)
    _run(args)
    after = _ledger(federation)
    spy = [json.loads(line) for line in (federation["tmp"] / "spy.jsonl").read_text().splitlines()]
    round3 = [r for r in spy if r["round"] == 3 and r["array_keys"]]
    assert sorted(r["site"] for r in round3) == ["site-0", "site-1"]
    assert not any("lora_A" in k for r in round3 for k in r["array_keys"])
    # a restarted coordinator may ask the exhausted site once more; it refuses, spends nothing
    assert [r["site"] for r in spy if r["round"] == 3 and not r["array_keys"]] in ([], ["site-2"])
    own2 = PersistentAccountant.load(federation["tmp"] / "state2" / "accountant.json")
    assert own2.epsilon() == pytest.approx(federation["spent_before"])
    glob = load_file(run / "global" / "adapter.safetensors")
    for k, v in a_before.items():
        np.testing.assert_array_equal(glob[k], v)
    assert [r["round"] for r in after["rounds"]] == [1, 2, 3]
    assert after["rounds"][:2] == before["rounds"]  # history untouched, round 3 appended
    cdp = PersistentAccountant.load(run / "client_dp_accountant.json")
    assert cdp.steps == 1 and cdp.history == [(1.0, 1.0, 1)]  # one release, no amplification
    level = after["rounds"][2]["client_level"]
    assert level["epsilon"] == pytest.approx(cdp.epsilon()) and level["releases"] == 1
    assert after["client_level"] == level and "client_level" not in after["rounds"][1]
    # B moved by the clipped mean (norm <= 0.05) plus noise of std z * clip / sampled sites
    sampled = len([r for r in spy if r["round"] == 3])
    change = np.concatenate([(glob[k] - v).ravel() for k, v in b_before.items()])
    assert change.std() == pytest.approx(0.05 / sampled, rel=0.15)
    assert GlobalCheckpoint(run / "global").load()[0] == 3  # the round in the weights' metadata
    assert not (run / "global" / "checkpoint.json").exists()
    for site in ("site-0", "site-1"):
        own = PersistentAccountant.load(federation["tmp"] / f"state{site[-1]}" / "accountant.json")
        assert after["sites"][site]["epsilon"] == pytest.approx(own.epsilon(), rel=1e-9)
        assert after["sites"][site]["epsilon"] > before["sites"][site]["epsilon"]
