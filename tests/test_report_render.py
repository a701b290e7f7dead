"""The report's configuration table lists each key once, with its resolved value."""

from __future__ import annotations

from dpfl.shared.report.build import write_report
from dpfl.shared.rundir import RunDir


def test_resolved_key_is_listed_once_with_its_value(tmp_path):
    run = RunDir(tmp_path / "run")
    # FedConfig carries an empty base_fingerprint placeholder; the run resolves it
    run.write_config({"num_rounds": 3, "base_fingerprint": ""}, base_fingerprint="sha256:abc")
    run.log(step=1, loss=0.5)
    write_report(run.path)
    md = (run.path / "report" / "report.md").read_text()
    rows = [line for line in md.splitlines() if "base_fingerprint" in line]
    assert rows == ["| base_fingerprint | sha256:abc |"]
    assert "| num_rounds | 3 |" in md
