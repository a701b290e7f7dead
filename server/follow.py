"""``dpfl-server run``'s follower: it prints every round as the run directory records it
(``metrics.jsonl``: updates averaged, rejections with their reasons, ε per site and global)
and re-attaches when the coordinator restarts.

A restarted ``dpfl-server serve`` stops the runs its predecessor left unfinished (their
ServerApps died with it); the follower sees its run ``finished:stopped`` after the new
``serve`` started (``coordinator.json``'s ``started_at``), resubmits the same run config,
which resumes after the last checkpointed round, and follows the new run. A run stopped by
the operator (``dpfl-server stop``) is not resubmitted.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpfl.server.deploy import FINISHED, Coordinator, run_status
from dpfl.server.policy import CoordinatorPolicy
from dpfl.shared.deploy.flwrproc import DeployError
from dpfl.shared.errors import ConfigError

STOPPED, FAILED = f"{FINISHED}:stopped", f"{FINISHED}:failed"


def describe_round(rec: dict[str, Any]) -> str:
    """One line for a ``metrics.jsonl`` record of the coordinator."""
    rejected = rec.get("rejected") or {}
    eps = rec.get("epsilon") or {}
    sampled = rec.get("sampled")
    parts = [f"round {rec.get('round')}: "
             + (f"sampled {', '.join(sampled)}; " if sampled else "")
             + f"{rec.get('accepted', 0)} update(s) averaged"]
    if rejected:
        parts.append("rejected " + "; ".join(f"{s} ({why})" for s, why in sorted(rejected.items())))
    if eps:
        parts.append("epsilon " + ", ".join(f"{s} {e:.3f}" for s, e in sorted(eps.items())))
    parts.append(f"global epsilon {rec.get('global_epsilon', float('nan')):.3f} "
                 f"(delta {rec.get('global_delta', float('nan')):g})")
    return " | ".join(parts)


@dataclass
class Progress:
    """The rounds of ``run_dir/metrics.jsonl`` not yet echoed."""

    run_dir: Path
    echo: Callable[[str], None]
    shown: int = 0

    def show_new(self) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        for line in path.read_text().splitlines()[self.shown:]:
            try:
                rec = json.loads(line)
            except ValueError:
                return  # a line still being written: next time
            self.echo(describe_round(rec))
            self.shown += 1


def restarted_since(state_dir: Path, when: float) -> bool:
    """Whether a ``serve`` of ``state_dir`` started after ``when`` (wall-clock seconds)."""
    try:
        return CoordinatorPolicy.read(state_dir).started_at > when
    except ConfigError:
        return False


def follow(coord: Coordinator, run_id: int, run_dir: Path, timeout: float,
           resubmit: Callable[[], int], echo: Callable[[str], None],
           poll: float = 3.0) -> tuple[int, str]:
    """Follow run ``run_id`` to its end, echoing its rounds; returns the run that finished
    (a resubmitted one after a coordinator restart) and its final status."""
    deadline, submitted = time.monotonic() + timeout, time.time()
    progress, unreachable = Progress(run_dir, echo), False
    while time.monotonic() < deadline:
        progress.show_new()
        try:
            status = run_status(coord, run_id)
        except DeployError as exc:
            if not unreachable:
                echo(f"coordinator unreachable ({str(exc).splitlines()[0][:200]}); waiting "
                     "to re-attach")
            unreachable = True
            time.sleep(poll)
            continue
        if unreachable:
            echo("coordinator reachable again; re-attached")
            unreachable = False
        if status in (STOPPED, FAILED) and restarted_since(coord.state_dir, submitted):
            old, run_id, submitted = run_id, resubmit(), time.time()
            echo(f"run {old} ended {status} across a coordinator restart; resubmitted as "
                 f"run {run_id}, which resumes from {run_dir}")
            continue
        if status.startswith(FINISHED):
            progress.show_new()
            return run_id, status
        time.sleep(poll)
    raise DeployError(f"run {run_id} not finished after {timeout:.0f}s")
