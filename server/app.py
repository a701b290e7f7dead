"""Flower ServerApp of the coordinator: reads the run config, hands the grid to the rounds."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from dpfl.server.rounds import run_federation
from dpfl.shared.federation.config import FedConfig


def make_server_app(cfg: FedConfig | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_federation(grid, cfg or FedConfig.from_run_config(context.run_config))

    return app


app = make_server_app()
