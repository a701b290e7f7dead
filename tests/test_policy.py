"""The coordinator's policy (dpfl.server.policy): which paths a run config may name, and
the enrolment ``serve`` records. A run config arrives over the network: untrusted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dpfl.server.policy import (
    POLICY_FILE,
    STATE_ENV,
    CoordinatorPolicy,
    Enrolled,
    enrol,
    key_fingerprint,
)
from dpfl.shared.errors import ConfigError
from dpfl.shared.federation.config import FedConfig


@pytest.fixture
def policy(tmp_path) -> CoordinatorPolicy:
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "state").mkdir()
    return CoordinatorPolicy(state_dir=tmp_path / "state", api_address="127.0.0.1:2",
                             public_address="127.0.0.1:1",
                             model_roots=(tmp_path / "models",),
                             sites=(Enrolled("a", 11, "f" * 64, 40),))


def _cfg(tmp_path, **kw) -> FedConfig:
    return dataclasses.replace(FedConfig(), **{"base_model": str(tmp_path / "models" / "base"),
                                                **kw})


@pytest.mark.parametrize("field, value", [
    ("run_dir", "/etc/x"), ("run_dir", "../../x"), ("run_dir", "runs"), ("run_dir", "."),
    ("run_dir", "runs/../../x"), ("base_model", "../../x"), ("base_model", "/etc"),
    ("base_model", "models/base"),  # relative to the state directory: not the model root
])
def test_paths_outside_the_allowed_roots_are_refused(policy, tmp_path, field, value):
    cfg = _cfg(tmp_path, **{field: value})
    with pytest.raises(ConfigError, match=f"run config: {field.replace('_', '-')}"):
        policy.confine(cfg)


def test_a_symbolic_link_out_of_the_runs_root_is_refused(policy, tmp_path):
    policy.runs_root.mkdir(parents=True)
    (policy.runs_root / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError, match="not inside the runs root"):
        policy.confine(_cfg(tmp_path, run_dir="runs/link/x"))


def test_allowed_paths_come_back_absolute(policy, tmp_path):
    cfg = policy.confine(_cfg(tmp_path, run_dir="runs/federated"))
    assert cfg.run_dir == str(tmp_path / "state" / "runs" / "federated")
    assert cfg.base_model == str(tmp_path / "models" / "base")
    assert policy.confine(_cfg(tmp_path, run_dir=str(policy.runs_root / "r"))).run_dir \
        == str(policy.runs_root / "r")


def test_the_policy_file_round_trips_and_the_env_names_it(policy, monkeypatch):
    policy.write()
    assert (policy.state_dir / POLICY_FILE).is_file()
    assert CoordinatorPolicy.read(policy.state_dir) == policy
    monkeypatch.setenv(STATE_ENV, str(policy.state_dir))
    assert CoordinatorPolicy.from_env().enrolment() == {11: policy.sites[0]}
    monkeypatch.delenv(STATE_ENV)
    with pytest.raises(ConfigError, match="runs only under 'dpfl-server serve'"):
        CoordinatorPolicy.from_env()


def test_a_missing_or_corrupt_policy_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="no coordinator serves from"):
        CoordinatorPolicy.read(tmp_path)
    (tmp_path / POLICY_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match=f"{POLICY_FILE} is unreadable"):
        CoordinatorPolicy.read(tmp_path)


def test_enrolment_reuses_the_recorded_node_of_the_same_key_only(tmp_path):
    key, other = tmp_path / "a.pub", tmp_path / "b.pub"
    key.write_bytes(b"ecdsa-sha2-nistp384 AAAA a")
    other.write_bytes(b"ecdsa-sha2-nistp384 BBBB b")
    new = enrol(None, "a", 5, key, 40)
    assert new == Enrolled("a", 5, key_fingerprint(key), 40)
    assert enrol({"a": new}, "a", None, key, 60) == Enrolled("a", 5, new.key_sha256, 60)
    for previous in (None, {"a": new}):  # unknown, or the listed key is not the recorded one
        with pytest.raises(ConfigError, match="has no node id for it"):
            enrol(previous, "a", None, other, 40)


def test_a_site_cannot_be_enrolled_twice(tmp_path):
    with pytest.raises(ConfigError, match="enrolled twice"):
        CoordinatorPolicy(state_dir=tmp_path, api_address="", public_address="",
                          sites=(Enrolled("a", 1, "x"), Enrolled("a", 2, "y")))


def test_runs_root_defaults_to_the_state_directory(tmp_path):
    p = CoordinatorPolicy(state_dir=tmp_path, api_address="", public_address="")
    assert p.runs_root == Path(tmp_path).resolve() / "runs"
