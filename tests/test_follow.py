"""What ``dpfl-server run`` prints while it follows a run (dpfl.server.follow); the follower
re-attaching after a coordinator restart is tested with real processes in
test_deploy_recovery.py."""

from __future__ import annotations

import json

from dpfl.server.follow import Progress, describe_round, restarted_since
from dpfl.server.policy import CoordinatorPolicy

REC = {"round": 2, "sampled": ["site-0", "site-1", "site-2"], "accepted": 2,
       "rejected": {"site-2": "num-examples 48 exceeds the 10"},
       "epsilon": {"site-0": 1.5, "site-1": 1.25, "site-2": 1.5}, "global_epsilon": 1.5,
       "global_delta": 1e-3}


def test_a_round_is_one_line_with_its_rejections_and_epsilons():
    line = describe_round(REC)
    assert describe_round({**REC, "sampled": None}).startswith("round 2: 2 update(s) averaged")
    assert line == ("round 2: sampled site-0, site-1, site-2; 2 update(s) averaged | rejected "
                    "site-2 (num-examples 48 exceeds the 10) | epsilon site-0 1.500, site-1 "
                    "1.250, site-2 1.500 | global epsilon 1.500 (delta 0.001)")


def test_progress_echoes_each_round_once_and_waits_for_a_torn_line(tmp_path):
    out: list[str] = []
    progress = Progress(tmp_path, out.append)
    progress.show_new()  # no metrics yet
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({**REC, "round": 1}) + "\n" + '{"round": 2, "acc')
    progress.show_new()
    progress.show_new()
    assert [line.split(":")[0] for line in out] == ["round 1"]
    path.write_text(json.dumps({**REC, "round": 1}) + "\n" + json.dumps(REC) + "\n")
    progress.show_new()
    assert [line.split(":")[0] for line in out] == ["round 1", "round 2"]


def test_a_restart_is_a_serve_started_after_the_submission(tmp_path):
    assert not restarted_since(tmp_path, 0.0)  # no coordinator.json: no restart known
    CoordinatorPolicy(state_dir=tmp_path, api_address="127.0.0.1:1", public_address="x:2",
                      started_at=100.0).write()
    assert restarted_since(tmp_path, 99.0) and not restarted_since(tmp_path, 100.0)
