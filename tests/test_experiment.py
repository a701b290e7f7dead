"""`dpfl-server experiment` end to end at the tiny preset on the real Fashion-MNIST split and
the shipped base model: DP-LoRA training, evaluation, report, and the results table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpfl.shared.data.fmnist import fashion_mnist_dir
from dpfl.shared.privacy.accountant import PersistentAccountant

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (ROOT / "models" / "fmnist-base" / "model_index.json").exists(),
    reason="needs the shipped base model models/fmnist-base")


def _experiment(out: Path, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dpfl.server.cli", "experiment", "--preset",
                           "tiny", "--out", str(out), "--classifier-dir", str(out / "clf"),
                           "--threads", "1", "--device", "cpu", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    fashion_mnist_dir()  # a clear error if the data package is missing
    out = tmp_path_factory.mktemp("experiments")
    _experiment(out, "--setting", "central", "--epsilon", "2")
    _experiment(out, "--setting", "floor")
    _experiment(out, "--setting", "ae-ceiling", "--classifiers", "all")
    return out


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_private_row_reports_the_accountants_epsilon_within_target(table):
    central = next(r for r in _rows(table) if r["setting"] == "central")
    run = Path(central["run_dir"])
    own = PersistentAccountant.load(run / "accountant.json")
    assert central["epsilon"] == pytest.approx(own.epsilon()) and 0 < own.epsilon() <= 2.0
    assert central["delta"] == 1e-5 and central["target_epsilon"] == 2.0
    evaluation = json.loads((run / "evaluation" / "evaluation.json").read_text())
    assert central["accuracy"] == evaluation["downstream"]["accuracy"]
    assert evaluation["generator"]["adapter"] == str(run / "adapter")
    assert evaluation["train_set"]["per_class"] == [10] * 10  # class-balanced samples
    assert evaluation["test_set"]["size"] == 10_000  # the real Fashion-MNIST test set


def test_floor_row_spends_nothing_and_table_holds_both(table):
    rows = {r["setting"]: r for r in _rows(table)}
    assert set(rows) == {"central", "floor", "ae-ceiling"}
    assert rows["floor"]["epsilon"] == 0.0
    assert not (Path(rows["floor"]["run_dir"]) / "accountant.json").exists()
    md = (table / "results.md").read_text()
    assert md.count("| central | tiny |") == 1 and md.count("| floor | tiny |") == 1
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and r["domain_fd"] >= 0
        assert "dpfl-server experiment" in r["command"] and r["machine"]


def test_each_run_has_a_report_with_its_evaluation(table):
    for r in _rows(table):
        html = (Path(r["run_dir"]) / "report" / "report.html").read_text()
        assert "evaluation" in html.lower() and f"{r['accuracy']:.4f}"[:5] in html


def test_every_row_writes_its_record_in_the_committed_schema(table):
    from dpfl.shared.eval.record import ResultRecord

    card = json.loads((ROOT / "models" / "fmnist-base" / "model_card.json").read_text())
    records = {}
    for r in _rows(table):
        rec = ResultRecord.read(Path(r["run_dir"]) / "record.json")
        assert rec.accuracy_cnn == r["accuracy"] and rec.wall_s == r["total_seconds"]
        assert rec.base_model_fingerprint == card["fingerprint"] and rec.command == r["command"]
        records[rec.setting] = rec
    assert records["central"].sites == 1 and records["central"].epsilon == pytest.approx(
        _rows(table)[0]["epsilon"]) and records["central"].delta == 1e-5
    assert records["floor"].sites == 0 and records["floor"].epsilon == 0.0
    assert records["ae-ceiling"].epsilon is None and records["ae-ceiling"].delta is None


def test_ae_ceiling_trains_on_reconstructions_of_the_private_split(table):
    row = next(r for r in _rows(table) if r["setting"] == "ae-ceiling")
    run = Path(row["run_dir"])
    evaluation = json.loads((run / "evaluation" / "evaluation.json").read_text())
    assert evaluation["kind"] == "reconstructed"
    assert evaluation["train_set"]["per_class"] == [10] * 10
    assert evaluation["config"]["train_real"] == "fmnist:private@0"
    ae = evaluation["autoencoder"]
    card = json.loads((ROOT / "models" / "fmnist-base" / "model_card.json").read_text())
    assert ae["fingerprint"] == card["fingerprint"] and ae["latent_shape"] == [4, 8, 8]
    assert 0.001 < ae["train"]["mse"] < 0.05 and ae["test"]["images"] == 10_000
    record = json.loads((run / "record.json").read_text())
    assert record["extra"]["reconstruction_mse"] == ae["train"]["mse"]
    assert (run / "evaluation" / "reconstructions.png").exists()
    assert not list(run.rglob("*.npz"))  # no (reconstructed) private image is written


def test_ae_ceiling_row_scored_by_all_classifiers_records_their_mean(table):
    row = next(r for r in _rows(table) if r["setting"] == "ae-ceiling")
    assert row["name"].endswith("-all")  # its own run directory beside a CNN-only row
    from dpfl.shared.eval.record import MEAN3, ResultRecord

    rec = ResultRecord.read(Path(row["run_dir"]) / "record.json")
    accs = [rec.extra["classifiers"][n]["accuracy"] for n in MEAN3]
    assert rec.accuracy_mean3 == pytest.approx(sum(accs) / 3) == row["accuracy_mean3"]
    assert rec.extra["classifiers"]["cnn"]["accuracy"] == rec.accuracy_cnn
    assert "3-classifier mean" in (table / "results.md").read_text()
    floor = next(r for r in _rows(table) if r["setting"] == "floor")
    assert floor["accuracy_mean3"] is None  # the default scores the CNN alone
