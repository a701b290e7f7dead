"""Flower ServerApp of the coordinator: reads the run config, hands the grid to the rounds.

In a deployment the run config arrives over the SuperLink's Control API and is untrusted:
before anything is written, its paths are confined and its sites' enrolment loaded from what
``dpfl-server serve`` recorded (:mod:`dpfl.server.policy`). A simulation passes its own
:class:`FedConfig` and needs neither.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpfl.server.policy import CoordinatorPolicy
from dpfl.server.rounds import run_federation
from dpfl.shared.defaults import LOG_FORMAT
from dpfl.shared.federation.config import FedConfig

log = logging.getLogger(__name__)


def make_server_app(cfg: FedConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if cfg is not None:
            run_federation(grid, cfg)
            return
        policy = CoordinatorPolicy.from_env()
        confined = policy.confine(FedConfig.from_run_config(context.run_config))
        _log_to(Path(confined.run_dir))
        log.info("run %s: run-dir %s, base-model %s, %d enrolled site(s)", grid.run.run_id,
                 confined.run_dir, confined.base_model, len(policy.sites))
        run_federation(grid, confined, enrolment=policy.enrolment())

    return app


def _log_to(run_dir: Path) -> None:
    """dpfl's log lines (INFO and up) of this ServerApp process to its stderr, which ``flwr
    log`` shows, and to ``RUN_DIR/server.log`` (appended across resumed runs)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(LOG_FORMAT)
    root = logging.getLogger("dpfl")
    for handler in (logging.StreamHandler(sys.stderr),
                    logging.FileHandler(run_dir / "server.log", encoding="utf-8")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)


app = make_server_app()
