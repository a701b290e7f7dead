"""Run reports rendered from run directories on disk (federated, central, damaged, real)."""

import base64
import json
import logging
import re

import numpy as np
import pytest
from click.testing import CliRunner

from dpfl.shared.edge.grid import save_grid
from dpfl.shared.errors import StateError
from dpfl.shared.federation.ledger import PrivacyLedger, SiteReport
from dpfl.shared.io import append_jsonl, atomic_write_json
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.guarantee import SCOPE_ADAPTER, PrivacyGuarantee
from dpfl.shared.report.build import build_report, try_write_report, write_report
from dpfl.shared.rundir import RunDir

# cumulative epsilon each site reports after rounds 1..3; site-1 sits out round 2
EPS = {1: {"site-0": 1.0, "site-1": 1.5, "site-2": 2.0},
       2: {"site-0": 2.0, "site-2": 4.0},
       3: {"site-0": 3.0, "site-1": 4.5, "site-2": 6.0}}


def rep(site, eps, budget=10.0):
    return SiteReport(site=site, epsilon=eps, delta=1e-5, budget=budget, sigma=1.1,
                      sample_rate=0.1, steps=10, examples=100)


def grid(path, seed):
    rng = np.random.default_rng(seed)
    return save_grid(rng.uniform(-1, 1, (4, 1, 8, 8)), path, nrow=2, title=path.stem)


def federated_run(root, rounds=EPS, sites=True, finished=True):
    """A federated run directory as server/rounds.py leaves it, and site state dirs."""
    run = RunDir(root / "fed")
    run.write_config({"num_rounds": 3, "ffa": True}, base_fingerprint="sha256:abc")
    ledger = PrivacyLedger.load_or_create(run / "ledger.json")
    grid(run / "samples_round_000.png", 0)
    for r, eps in rounds.items():
        rejected = {"site-2": "non-finite values"} if r == 3 else {}
        entry = ledger.record_round(r, [rep(s, e) for s, e in eps.items()], rejected)
        run.log(round=r, accepted=len(eps) - len(rejected), rejected=rejected,
                epsilon={s: v["epsilon"] for s, v in entry["sites"].items()},
                global_epsilon=entry["global_epsilon"], global_delta=entry["global_delta"])
        grid(run / f"samples_round_{r:03d}.png", r)
        for s, e in eps.items():
            if sites:
                append_jsonl(root / "fed" / "sites" / s / "state" / "rounds.jsonl",
                             {"steps": 10, "epsilon": e, "sigma": 1.1, "sample_rate": 0.1,
                              "mean_loss": 1.0 / r})
    if finished:  # as server/rounds.py writes it
        PrivacyGuarantee.from_ledger(ledger, "sha256:abc").write(run / "adapter" / "privacy.json")
    return run.path, {s: root / "fed" / "sites" / s / "state" for s in EPS[1]}


def plots(doc):
    return {p.name: {s.label: s for s in p.series} for p in doc.plots}


def test_federated_report_files_and_embedded_images(tmp_path):
    run, site_dirs = federated_run(tmp_path)
    html_path = write_report(run, site_dirs)
    out = run / "report"
    assert html_path == out / "report.html"
    for name in ("report.md", "plot_epsilon.png", "plot_updates.png", "plot_site_loss.png",
                 "samples_round_000.png", "samples_round_003.png"):
        assert (out / name).is_file(), name
    html = html_path.read_text()
    srcs = re.findall(r'<img src="([^"]*)"', html)
    assert len(srcs) == 3 + 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    grid3 = base64.b64encode((run / "samples_round_003.png").read_bytes()).decode()
    assert f"data:image/png;base64,{grid3}" in html
    md = (out / "report.md").read_text()
    assert "](plot_epsilon.png)" in md and "](samples_round_002.png)" in md
    assert "ε = 6.000, δ = 1.0e-05" in md and "parallel composition" in md
    assert "| 3 | site-2 | non-finite values |" in md
    assert "carries this guarantee" in md and "torch" in md  # versions table


def test_epsilon_plot_is_the_ledgers_series(tmp_path):
    run, site_dirs = federated_run(tmp_path)
    ledger = json.loads((run / "ledger.json").read_text())
    eps = plots(build_report(run, site_dirs))["plot_epsilon.png"]
    glob = eps["global ε (max over sites)"]
    assert glob.x == [1, 2, 3] and glob.y == [e["global_epsilon"] for e in ledger["rounds"]]
    assert glob.y == [2.0, 4.0, 6.0]
    for entry in ledger["rounds"]:
        for site, v in entry["sites"].items():
            s = eps[f"ε {site}"]
            assert s.y[s.x.index(entry["round"])] == v["epsilon"]
    assert eps["ε site-1"].y == [1.5, 1.5, 4.5]  # round 2 sat out: its spend carries over
    assert eps["budget (every site, ε = 10)"].y == [10.0, 10.0]
    updates = plots(build_report(run))["plot_updates.png"]
    assert updates["accepted"].y == [3, 2, 2] and updates["rejected"].y == [0, 0, 1]
    loss = plots(build_report(run, site_dirs))["plot_site_loss.png"]
    assert loss["site-1"].x == [1, 3] and loss["site-1"].y == [1.0, 1 / 3]


def test_per_site_budgets_reruns_and_flags(tmp_path):
    run = RunDir(tmp_path / "fed")
    led = PrivacyLedger.load_or_create(run / "ledger.json")
    led.record_round(1, [rep("a", 1.0, budget=5.0), rep("b", 2.0, budget=8.0)])
    led.record_round(2, [rep("a", 2.0, budget=5.0)])
    led.record_round(2, [rep("a", 2.5, budget=5.0), rep("b", 1.0, budget=8.0)])  # rerun, reset
    doc = build_report(run.path)
    eps = plots(doc)["plot_epsilon.png"]
    assert eps["ε a"].x == [1, 2] and eps["ε a"].y == [1.0, 2.5]  # the rerun's record counts
    assert eps["ε b"].y == [2.0, 3.0]  # a lower report: a reset accountant, both histories add
    assert eps["budget a"].y == [5.0, 5.0] and eps["budget b"].y == [8.0, 8.0]
    write_report(run.path)
    md = (run / "report" / "report.md").read_text()
    assert "below its earlier (epsilon 2.0000" in md and "| 2 | yes |" in md


def test_client_level_guarantee_when_the_ledger_has_one(tmp_path):
    run, _ = federated_run(tmp_path)
    data = json.loads((run / "ledger.json").read_text())
    for i, entry in enumerate(data["rounds"]):
        entry["client_level"] = {"epsilon": 0.5 * (i + 1), "delta": 1e-3, "budget": 4.0,
                                 "noise_multiplier": 1.3, "clip": 0.2, "releases": i + 1}
    data["client_level"] = data["rounds"][-1]["client_level"]
    atomic_write_json(run / "ledger.json", data)
    doc = build_report(run)
    series = plots(doc)["plot_client_level_epsilon.png"]
    assert series["client-level ε"].y == [0.5, 1.0, 1.5]
    assert series["client-level budget"].y == [4.0, 4.0]
    write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "(ε = 1.500, δ = 1.0e-03) after 3 noised release(s)" in md


def test_missing_optional_files_are_stated_not_fatal(tmp_path):
    run, _ = federated_run(tmp_path, sites=False, finished=False)
    for name in ("config.json", "metrics.jsonl", "samples_round_001.png"):
        (run / name).unlink()
    write_report(run, {"site-0": tmp_path / "nowhere"})
    md = (run / "report" / "report.md").read_text()
    assert "No config.json" in md and "No final adapter yet" in md
    assert "| 1 |  | 2 | 1.0e-05 | 1 | 1.5 | 2 | not released | 0 |" in md
    assert "site site-0: no" in md and not (run / "report" / "plot_updates.png").exists()
    write_report(run)  # no site directories: the loss stays local, and the report says so
    assert "never sent to the coordinator" in (run / "report" / "report.md").read_text()
    fresh = RunDir(tmp_path / "fresh")  # crashed before round 1: a config, nothing else
    fresh.write_config({"num_rounds": 3})
    write_report(fresh.path)
    assert "No privacy ledger" in (fresh / "report" / "report.md").read_text()


def test_final_adapter_privacy_json_new_old_ahead_and_corrupt(tmp_path):
    run, _ = federated_run(tmp_path)
    final = run / "adapter" / "privacy.json"
    assert json.loads(final.read_text())["format"] == "dpfl-privacy/1"
    write_report(run)
    assert "The final adapter (adapter/, privacy.json) carries this guarantee." in \
        (run / "report" / "report.md").read_text()
    ledger = PrivacyLedger.load_or_create(run / "ledger.json")
    eps, delta = ledger.global_guarantee()
    # the record older dpfl wrote there is still read
    final.write_text(json.dumps({"global_epsilon": eps, "global_delta": delta,
                                 "sites": ledger.sites, "rounds": ledger.last_round,
                                 "client_level": None, "base_fingerprint": "sha256:abc"}))
    write_report(run)
    assert "carries this guarantee" in (run / "report" / "report.md").read_text()
    # released after round 2, but round 3 is on the ledger: the report says the ledger is ahead
    final.write_text(json.dumps({"global_epsilon": 1.0, "global_delta": delta, "rounds": 2}))
    write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "states ε = 1.0 after 2 round(s)" in md and "the ledger is ahead" in md
    final.write_text("[1, 2]")
    with pytest.raises(StateError, match=re.escape(str(final))):
        build_report(run)


def test_corrupt_ledger_names_the_file(tmp_path, caplog):
    run, _ = federated_run(tmp_path)
    path = run / "ledger.json"
    path.write_text('{"rounds": [')
    with pytest.raises(StateError, match=re.escape(str(path))):
        write_report(run)
    path.write_text(json.dumps({"rounds": [{"round": 1}], "sites": {}}))
    with pytest.raises(StateError, match=f"{re.escape(str(path))}.*global_epsilon"):
        build_report(run)
    with caplog.at_level(logging.WARNING):
        assert try_write_report(run) is None  # the end of a run: logged, never raised
    assert "ledger.json" in caplog.text
    with pytest.raises(StateError, match="no dpfl run"):
        build_report(tmp_path / "fed" / "sites")


def test_evaluation_json_scalars_and_images(tmp_path):
    run, _ = federated_run(tmp_path)
    grid(run / "eval" / "samples.png", 7)
    atomic_write_json(run / "eval" / "evaluation.json", {
        "kind": "synthetic", "seconds": 12.5, "downstream": {"accuracy": 0.731, "epochs": 10},
        "fid": None, "grid": str(run / "eval" / "samples.png"), "extra": "gone.png"})
    write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "## Evaluation (eval/evaluation.json)" in md
    assert "| downstream.accuracy | 0.731 |" in md and "| seconds | 12.5 |" in md
    assert "refers to gone.png" in md and "](samples.png)" in md
    embedded = base64.b64encode((run / "eval" / "samples.png").read_bytes()).decode()
    assert embedded in (run / "report" / "report.html").read_text()


def test_central_report_from_disk(tmp_path):
    run = RunDir(tmp_path / "central")
    run.write_config({"job": {"accountant_file": None}, "dp": {"epsilon": 8}}, examples=40)
    acc = PersistentAccountant.open(run / "accountant.json", delta=1e-3, budget=8.0)
    for steps in (4, 3):  # two runs in the same directory; the second is cut off
        acc.commit(1.2, 0.25, steps)
        if steps == 4:  # the first run finished: its adapter states the guarantee then
            PrivacyGuarantee.from_accountant(acc, scope=SCOPE_ADAPTER).write(
                run / "adapter" / "privacy.json")
    for i in range(1, 5):
        run.log(step=i, epoch=1 + (i > 2), examples=10, loss=1.0 / i, seconds=0.1)
        if i % 2 == 0:
            run.log(epoch=i // 2, step=i, epsilon=0.1 * i)
    run.log(final=True, steps=4, sigma=1.2, sample_rate=0.25, epsilon=0.4, delta=1e-3,
            mean_loss=0.5, ledger_steps=4)
    for i in range(1, 4):
        run.log(step=i, epoch=1, examples=10, loss=0.1, seconds=0.1)
    grid(run / "samples_before.png", 1)
    doc = build_report(run.path)
    p = plots(doc)
    assert p["plot_loss.png"]["loss per step"].x == [1, 2, 3, 4, 5, 6, 7]
    curve = p["plot_epsilon.png"]["ε (prv accountant)"]
    assert curve.x[0] == 0 and curve.y[0] == 0 and curve.x[-1] == 7
    assert curve.y[-1] == pytest.approx(acc.epsilon()) and curve.y == sorted(curve.y)
    assert p["plot_epsilon.png"]["ε logged per epoch"].x == [2, 4]
    write_report(run.path)
    md = (run / "report" / "report.md").read_text()
    assert f"(ε = {acc.epsilon():.3f}, δ = 0.001)" in md and "samples_after.png is missing" in md
    assert "| 1.2 | 0.25 | 7 |" in md  # the accountant's (sigma, q, steps) history
    assert "the adapter is differentially private" in md
    assert "adapter/privacy.json states ε = " in md and "after 4 step(s)" in md
    assert "the ledger is ahead of what was released" in md


def test_whole_unet_run_is_reported_as_such(tmp_path):
    run = RunDir(tmp_path / "full")
    run.write_config({"job": {"accountant_file": None}, "mode": "full", "init": "scratch",
                      "dp": {"epsilon": 8}}, examples=40)
    PersistentAccountant.open(run / "accountant.json", delta=1e-3, budget=8.0).commit(
        1.2, 0.25, 4)
    grid(run / "samples_before.png", 1)
    write_report(run.path)
    md = (run / "report" / "report.md").read_text()
    assert "whole UNet (RUN_DIR/model) is differentially private" in md
    assert "adapter" not in md and "random UNet (scratch), before DP training" in md
    assert "No model/privacy.json" in md


def test_corrupt_accountant_names_the_file(tmp_path):
    run = RunDir(tmp_path / "central")
    (run / "accountant.json").write_text("{}")
    with pytest.raises(StateError, match=re.escape(str(run / "accountant.json"))):
        write_report(run.path)


def test_cli_report_finds_simulated_sites(tmp_path):
    from dpfl.server.cli import main

    run, _ = federated_run(tmp_path)
    res = CliRunner().invoke(main, ["report", str(run)])
    assert res.exit_code == 0, res.output
    assert "site-0, site-1, site-2" in res.output and (run / "report" / "report.html").exists()
    assert (run / "report" / "plot_site_loss.png").exists()
    (run / "ledger.json").write_text("nonsense")
    res = CliRunner().invoke(main, ["report", str(run), "--site", "site-0=" + str(tmp_path)])
    assert res.exit_code != 0 and "ledger.json" in res.output


def test_real_central_training_writes_report(tmp_path):
    from dpfl.client.cli import main
    from dpfl.shared.data.readers import ImageSet, write_npz
    from dpfl.shared.ldm.models import FASHION_MNIST_CLASSES, build_ldm, save_ldm

    save_ldm(build_ldm("tiny", seed=0), tmp_path / "base")
    rng = np.random.default_rng(0)
    write_npz(tmp_path / "silo.npz", ImageSet(rng.random((20, 28, 28, 1), dtype=np.float32),
                                              rng.integers(0, 10, 20), FASHION_MNIST_CLASSES))
    run = tmp_path / "run"
    res = CliRunner().invoke(main, [
        "train", "--data", str(tmp_path / "silo.npz"), "--model", str(tmp_path / "base"),
        "--run-dir", str(run), "--epsilon", "8", "--delta", "1e-3", "--batch-size", "10",
        "--physical-batch", "10", "--rank", "2", "--epochs", "2", "--sample-steps", "1",
        "--per-class", "1", "--device", "cpu", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.JSONDecoder().raw_decode(res.output[res.output.index("{\n"):])[0]
    assert summary["report"] == str(run / "report" / "report.html")
    html = (run / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4  # epsilon, loss, before, after
    md = (run / "report" / "report.md").read_text()
    assert f"(ε = {PersistentAccountant.load(run / 'accountant.json').epsilon():.3f}" in md
    assert "The adapter carries this guarantee (adapter/privacy.json)." in md
    assert "| dp.noise_multiplicity |" in md


# -- the live report: run state, this run vs lifetime, unrecorded rounds -----------------
def test_a_round_sent_but_never_recorded_makes_its_rerun_a_rerun(tmp_path):
    """The ledger puts a round on record before it is sent; a restarted coordinator that
    sends it again marks the attempt that reaches the ledger as a re-run."""
    path = tmp_path / "ledger.json"
    led = PrivacyLedger.load_or_create(path)
    led.begin_round(1, ["a", "b"])
    assert not led.record_round(1, [rep("a", 1.0), rep("b", 1.0)])["rerun"]
    led.begin_round(2, ["a", "b"])  # sent; the coordinator is stopped before any reply
    on_disk = json.loads(path.read_text())
    assert on_disk["open_round"]["round"] == 2 and on_disk["open_round"]["sites"] == ["a", "b"]
    again = PrivacyLedger.load_or_create(path)  # the restarted coordinator
    again.begin_round(2, ["a", "b"])
    assert [i["round"] for i in again.interrupted] == [2]
    entry = again.record_round(2, [rep("a", 2.5), rep("b", 2.5)])
    assert entry["rerun"] and again.open_round is None
    assert not again.record_round(3, [rep("a", 3.0)])["rerun"]
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("open_round", "interrupted")}  # a ledger older dpfl wrote
    atomic_write_json(path, old)
    assert PrivacyLedger.load_or_create(path).interrupted == []


def _html(run):
    return (run / "report" / "report.html").read_text()


def test_live_report_reloads_until_the_run_has_finished(tmp_path):
    run, _ = federated_run(tmp_path, finished=False)
    PrivacyLedger.load_or_create(run / "ledger.json").begin_round(4, ["site-0", "site-2"])
    write_report(run, live=True)  # the coordinator, as round 4 starts
    html = _html(run)
    assert '<meta http-equiv="refresh" content="15">' in html
    assert "(live: 3 of 3 rounds recorded)</title>" in html
    md = (run / "report" / "report.md").read_text()
    assert "In progress: 3 of 3 round(s) recorded, global ε 6.000 (δ 1.0e-05); round 4 was " \
           "sent to site-0, site-2 at " in md
    assert "- Round 4: sent to site-0, site-2 at " in md and "replies awaited" in md
    write_report(run)  # anyone else, e.g. after `flwr stop`
    assert "http-equiv" not in _html(run)
    md = (run / "report" / "report.md").read_text()
    assert "Not finished: 3 of 3 round(s) recorded" in md and "stopped, crashed or" in md
    assert "Sites may have spent more ε than their last report" in md
    done, _ = federated_run(tmp_path / "done")  # adapter/privacy.json covers round 3
    write_report(done, live=True)
    assert "http-equiv" not in _html(done) and "Finished: 3 of 3 round(s) recorded" in \
        (done / "report" / "report.md").read_text()


def test_stopped_before_any_reply_says_sites_may_have_spent(tmp_path):
    run = RunDir(tmp_path / "fed")
    run.write_config({"num_rounds": 3})
    PrivacyLedger.load_or_create(run / "ledger.json").begin_round(1, ["site-a", "site-b"])
    write_report(run.path)
    md = (run / "report" / "report.md").read_text()
    assert "no site has reported spending anything" not in md
    assert "No round's replies have reached the privacy ledger yet" in md
    assert "- Round 1: sent to site-a, site-b at " in md and "stopped, crashed" in md
    assert "Sites may have spent more ε than their last report" in md


def test_this_run_and_lifetime_epsilon_per_site(tmp_path):
    """Hand-computed: q = 0.1 and one local epoch make one round 10 steps."""
    def r(site, eps, steps, trained=True):
        return SiteReport(site=site, epsilon=eps, delta=1e-5, budget=10.0, sigma=1.1,
                          sample_rate=0.1, steps=steps, examples=100, trained=trained)

    run = RunDir(tmp_path / "fed")
    run.write_config({"num_rounds": 2, "local_epochs": 1})
    led = PrivacyLedger.load_or_create(run / "ledger.json")
    led.record_round(1, [r("fresh", 1.0, 10), r("veteran", 4.85, 40),
                         r("idle", 3.0, 30, trained=False), r("logged", 4.0, 40)])
    led.record_round(2, [r("fresh", 2.0, 20), r("veteran", 5.64, 50), r("idle", 3.5, 40),
                         r("logged", 4.6, 50)])
    state = tmp_path / "logged-state"
    append_jsonl(state / "rounds.jsonl", {"epsilon": 4.0, "epsilon_round": 0.7, "steps": 10})
    write_report(run.path, {"logged": state})
    md = (run / "report" / "report.md").read_text()
    assert "| fresh | 2 | 2 | 2 | 10 | 2 | new to training: its first report (round 1) " \
           "counts one round's 10 steps" in md
    assert "| idle | 0.5 | 3.5 | 3.5 | 10 | 2 | its first report (round 1) trained nothing" in md
    assert "| logged | 1.3 | 4.6 | 4.6 | 10 | 2 | the site's own round log: lifetime ε 3.3 " \
           "before round 1 |" in md
    # not derivable: the whole lifetime counts (never less than recorded), and what is known
    assert "| veteran | ≤ 5.64 | 5.64 | 5.64 | 10 | 2 | not known: its first report (round 1) " \
           "counts 40 steps, not one round's 10: ε spent before this run is not on this " \
           "ledger, so the whole lifetime ε is counted (at least 0.79 was spent after round " \
           "1) |" in md
    # a round this run sent that is not on the ledger may hold the site's spend: only the
    # one-round rule still proves a start
    led.begin_round(1, ["idle", "logged"])  # (the ledger only checks its own order)
    led.interrupted, led.open_round = [led.open_round], None
    led.save()
    write_report(run.path, {"logged": state})
    md = (run / "report" / "report.md").read_text()
    assert "| fresh | 2 | 2 |" in md and "| idle | ≤ 3.5 |" in md and "| logged | ≤ 4.6 |" in md
    assert "or in an attempt at a round this run sent that is not on the ledger" in md
    assert "Lifetime ε is what the site's own persistent accountant reported last" in md


def test_unanswered_sites_are_named_as_possibly_spent(tmp_path):
    run, _ = federated_run(tmp_path)
    led = PrivacyLedger.load_or_create(run / "ledger.json")
    led.record_round(4, [rep("site-0", 4.0)], {"<2 unanswered>": "no reply within 60s"})
    write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "- Round 4: 2 unanswered (no reply within 60s): those sites may have trained." in md


class CoordinatorStopped(Exception):
    """What `flwr stop` does to a ServerApp mid-round, as far as the round loop can tell."""


def test_real_round_loop_renders_live_and_marks_a_rerun_after_a_stop(tmp_path, task_identity,
                                                                      monkeypatch):
    """The coordinator's real loop against real sites: stopped after the sites trained round 1
    but before their replies reached it, then restarted; the report is rendered live as each
    round starts, states the stop, and marks round 1's re-run."""
    import dpfl.server.rounds as rounds
    from dpfl.server.rounds import run_federation
    from dpfl.shared.federation.config import FedConfig
    from dpfl.shared.ldm.models import build_ldm, save_ldm

    from .test_stragglers import StragglerGrid, _sites

    class StoppedGrid(StragglerGrid):
        def send_and_receive(self, messages, *, timeout=None):
            out = super().send_and_receive(messages, timeout=timeout)  # the sites train
            raise CoordinatorStopped(f"{len(out)} replies lost")
            return out

    renders = []
    real = rounds.try_write_report

    live_pages = []

    def spy(path, *args, live=False):
        renders.append(live)
        out = real(path, *args, live=live)
        if live:
            live_pages.append(out.read_text())
        return out

    monkeypatch.setattr(rounds, "try_write_report", spy)
    base = save_ldm(build_ldm("tiny", seed=0), tmp_path / "base")
    sites = {n: s for n, s in _sites(tmp_path, base).items() if n != 13}
    cfg = FedConfig(base_model=str(base), run_dir=str(tmp_path / "run"), num_rounds=1,
                    batch_size=16, noise_multiplicity=1, target_epsilon=4.0, lr=5e-3,
                    min_available_nodes=2, min_train_nodes=2, sample_every=0, sample_steps=2)
    run = tmp_path / "run"
    with pytest.raises(CoordinatorStopped):
        run_federation(StoppedGrid(sites), cfg)
    assert renders == [True, True, False]  # waiting for sites, round 1 sent, the stop
    assert all('http-equiv="refresh"' in p for p in live_pages)
    assert "In progress: 0 of 1 round(s) recorded; round 1 was sent to node 11, node 12" in \
        live_pages[-1] and "A round ends within its timeout (3600 s)" in live_pages[-1]
    md = (run / "report" / "report.md").read_text()
    # no reply has named its site yet: the nodes are named by id
    assert "Not finished: 0 of 1 round(s) recorded; round 1 was sent to node 11, node 12" in md
    assert "no site has reported spending anything" not in md
    assert "Sites may have spent more ε than their last report" in md
    assert "http-equiv" not in _html(run)
    renders.clear()
    run_federation(StragglerGrid(sites), cfg)  # restarted: round 1 again
    assert renders == [True, True, False]  # waiting for sites, round 1 sent, finished
    led = json.loads((run / "ledger.json").read_text())
    assert [(e["round"], e["rerun"]) for e in led["rounds"]] == [(1, True)]
    assert [i["round"] for i in led["interrupted"]] == [1] and led["open_round"] is None
    md = (run / "report" / "report.md").read_text()
    assert "Finished: 1 of 1 round(s) recorded" in md and "http-equiv" not in _html(run)
    assert "- Round 1 was run more than once" in md and "- Round 1: sent to node 11" in md
    for site in sites.values():  # round 1 trained twice: the lifetime ε shows it
        acc = PersistentAccountant.load(site.state_dir / "accountant.json")
        name, eps = site.cfg.site_id, acc.epsilon()
        log = [json.loads(line) for line in (site.state_dir / "rounds.jsonl").open()]
        assert acc.steps == led["rounds"][0]["sites"][name]["steps"] == 2 * log[0]["steps"]
        assert led["sites"][name]["epsilon"] == pytest.approx(eps)
        # two rounds' steps at its first report: not provably new, so all of it counts
        assert f"| {name} | ≤ {eps:.4g} | {eps:.4g} | {eps:.4g} |" in md
