"""``dpfl-server serve | run | status | stop``: the coordinator of a real deployment.

``serve`` runs the SuperLink on loopback and the nginx Fleet proxy on the public address
(:mod:`dpfl.server.deploy`); the other three talk to the loopback API that ``serve`` recorded
in ``STATE_DIR/coordinator.json``, so they work only on the coordinator's own machine.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from dpfl.shared.cli import CTX, LazyCommand, fail
from dpfl.shared.defaults import default_of
from dpfl.shared.errors import DpflError

PKI_DIR = "deploy/pki"  # written by 'certs', read by 'serve' and 'run'
STATE_DIR = "runs/coordinator"


def _pairs(values: tuple[str, ...], option: str, what: str) -> dict[str, str]:
    if not all("=" in v for v in values):
        raise DpflError(f"{option} takes {what}, got {list(values)}")
    return {v.split("=", 1)[0]: v.split("=", 1)[1] for v in values}


def _state_options() -> list[click.Parameter]:
    """The coordinator's PKI and state directory."""
    return [click.Option(["--pki"], type=click.Path(file_okay=False), default=PKI_DIR,
                         help="Directory written by 'dpfl-server certs'."),
            click.Option(["--state-dir"], type=click.Path(file_okay=False), default=STATE_DIR,
                         help="Coordinator state: SuperLink database, FLWR_HOME, logs, "
                              "coordinator.json.")]


def _serve_options() -> list[click.Parameter]:
    from dpfl.server.deploy import Coordinator, ServeOptions

    return [
        *_state_options(),
        click.Option(["--host"], default=default_of(Coordinator, "host"),
                     help="Interface of the public Fleet proxy (what sites dial; 0.0.0.0 for "
                          "every interface)."),
        click.Option(["--port"], type=click.IntRange(1, 65535),
                     default=default_of(Coordinator, "port"), help="Port of the Fleet proxy."),
        click.Option(["--api-port"], type=click.IntRange(1, 65535),
                     default=default_of(Coordinator, "api_port"),
                     help="Port of the SuperLink's own API on 127.0.0.1 (never public)."),
        click.Option(["--site-key", "site_keys"], multiple=True, metavar="SITE=PUBKEY",
                     help="List a site's public key [default: every PKI/sites/<id>/node.pub]."),
        click.Option(["--site-examples"], multiple=True, metavar="SITE=N",
                     help="The most examples SITE may weigh in FedAvg (declared at enrolment; "
                          "a reply claiming more is rejected)."),
        click.Option(["--max-site-examples"], type=click.IntRange(min=1),
                     default=default_of(ServeOptions, "max_site_examples"),
                     help="The bound for sites without --site-examples."),
        click.Option(["--model-root", "model_roots"], multiple=True,
                     type=click.Path(file_okay=False),
                     help="Directory a run's base-model must lie in (repeatable) [default: "
                          "./models]."),
        click.Option(["--runs-root"], type=click.Path(file_okay=False), default=None,
                     help="Directory a run's run-dir must lie inside [default: "
                          "STATE_DIR/runs]."),
        click.Option(["--nginx"], type=click.Path(dir_okay=False), default=None,
                     help="nginx binary of the Fleet proxy [default: $DPFL_NGINX, PATH]."),
    ]


@click.command(cls=LazyCommand, options=_serve_options, context_settings=CTX)
def serve(pki: str, state_dir: str, host: str, port: int, api_port: int,
          site_keys: tuple[str, ...], site_examples: tuple[str, ...], max_site_examples: int,
          model_roots: tuple[str, ...], runs_root: str | None, nginx: str | None) -> None:
    """Start the coordinator: the SuperLink on loopback and an nginx proxy serving only its
    Fleet API on --host:--port; only listed sites may join. Runs until stopped."""
    from dpfl.server.deploy import Coordinator, ServeOptions
    from dpfl.server.deploy import serve as run_serve
    from dpfl.server.pki import PkiLayout

    try:
        coord = Coordinator(pki=Path(pki), state_dir=Path(state_dir), host=host, port=port,
                            api_port=api_port)
        keys = {s: Path(p).resolve() for s, p in
                _pairs(site_keys, "--site-key", "SITE=PUBKEY").items()} or {
            p.parent.name: p for p in sorted((PkiLayout(Path(pki)).root / "sites")
                                             .glob("*/node.pub"))}
        examples = {s: _whole(n, s) for s, n in
                    _pairs(site_examples, "--site-examples", "SITE=N").items()}
        opts = ServeOptions(site_keys=keys, site_examples=examples,
                            max_site_examples=max_site_examples,
                            model_roots=tuple(Path(r).resolve() for r in model_roots)
                            or (Path("models").resolve(),),
                            runs_root=Path(runs_root).resolve() if runs_root else None,
                            nginx=nginx)
        code = run_serve(coord, opts)
    except DpflError as exc:
        fail(exc)
    raise SystemExit(code)


def _whole(value: str, site: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise DpflError(f"--site-examples {site}={value}: not a whole number") from None


def _loopback(pki: str, state_dir: str, api: str | None):
    """The coordinator (as ``serve`` recorded it) and its policy, for a loopback command."""
    from dpfl.server.deploy import Coordinator
    from dpfl.server.policy import CoordinatorPolicy

    policy = CoordinatorPolicy.read(state_dir)
    address = api or policy.api_address
    host, _, port = address.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        raise DpflError(f"--superlink {address}: the coordinator's API is on loopback only")
    coord = Coordinator(pki=Path(pki), state_dir=Path(state_dir), api_port=int(port),
                        port=int(policy.public_address.rpartition(":")[2]),
                        address=policy.public_address)
    coord.write_connection(address)
    return coord, policy


def _api_option() -> click.Option:
    return click.Option(["--superlink", "api"], default=None, metavar="127.0.0.1:PORT",
                        help="The SuperLink's loopback API [default: as 'serve' recorded it "
                             "in STATE_DIR/coordinator.json].")


def _run_options() -> list[click.Parameter]:
    return [
        *_state_options(), _api_option(),
        click.Option(["--app", "app"], type=click.Path(file_okay=False), default=None,
                     help="dpfl source directory holding pyproject.toml [default: this "
                          "checkout]."),
        click.Option(["--set", "overrides"], multiple=True, metavar="KEY=VALUE",
                     help="Run-config key, kebab-case, e.g. --set num-rounds=5. base-model is "
                          "resolved here; run-dir relative to the state directory, inside "
                          "the runs root."),
        click.Option(["--timeout"], type=click.FloatRange(min=1), default=24 * 3600.0,
                     help="Seconds to wait for the run to finish."),
        click.Option(["--wait/--no-wait"], default=True,
                     help="Wait for the run and print the ledger."),
    ]


@click.command(name="run", cls=LazyCommand, options=_run_options, context_settings=CTX)
def run_cmd(pki: str, state_dir: str, api: str | None, app: str | None,
            overrides: tuple[str, ...], timeout: float, wait: bool) -> None:
    """Submit the federated DP fine-tuning run to this machine's coordinator."""
    from dpfl.server import deploy
    from dpfl.server.follow import follow
    from dpfl.shared.federation.config import FedConfig
    from dpfl.shared.federation.ledger import PrivacyLedger

    try:
        pairs = _pairs(overrides, "--set", "KEY=VALUE")
        cfg = FedConfig.from_run_config(pairs)  # validate here, before anything is sent
        values = {k: getattr(cfg, k.replace("-", "_")) for k in pairs}
        values["base-model"] = str(Path(cfg.base_model).resolve())  # a path named from here
        coord, policy = _loopback(pki, state_dir, api)
        # the ServerApp enforces the policy; checking here too names a problem at once
        confined = policy.confine(dataclasses.replace(cfg, base_model=values["base-model"]))
        app_path = deploy.app_dir(app, coord.state_dir / "app")
        run_id = deploy.submit_run(coord, app_path, values)
        click.echo(f"run {run_id} submitted to {policy.api_address}; run directory "
                   f"{confined.run_dir}")
        if not wait:
            return
        run_id, status = follow(coord, run_id, Path(confined.run_dir), timeout,
                                lambda: deploy.submit_run(coord, app_path, values),
                                lambda line: click.echo(line))
    except (DpflError, ValueError) as exc:
        fail(exc)
    click.echo(f"run {run_id}: {status}")
    ledger_path = Path(confined.run_dir) / "ledger.json"
    if ledger_path.exists():
        click.echo(PrivacyLedger.load_or_create(ledger_path).table())
    if status != f"{deploy.FINISHED}:completed":
        raise SystemExit(1)


@click.command(cls=LazyCommand, context_settings=CTX,
               options=lambda: [*_state_options(), _api_option(),
                                click.Option(["--json", "as_json"], is_flag=True,
                                             help="One JSON object instead of text.")])
def status(pki: str, state_dir: str, api: str | None, as_json: bool) -> None:
    """The coordinator's runs, its enrolled sites (connected or not, last seen) and the
    privacy ledgers under its runs root (over its loopback API)."""
    from dpfl.server import deploy

    try:
        coord, policy = _loopback(pki, state_dir, api)
        runs, nodes = deploy.list_runs(coord), deploy.list_nodes(coord)
    except DpflError as exc:
        fail(exc)
    report = {"fleet-address": policy.public_address, "api-address": policy.api_address,
              "sites": [_site_row(e, nodes.get(e.node_id, {})) for e in policy.sites],
              "runs": runs, "ledgers": _ledgers(policy.runs_root)}
    click.echo(json.dumps(report, indent=2) if as_json else _status_text(report))


def _site_row(enrolled, node: dict) -> dict:
    return {"site": enrolled.site, "node-id": enrolled.node_id,
            "max-examples": enrolled.max_examples, "status": node.get("status", "unknown"),
            "online-at": node.get("online-at", ""), "offline-at": node.get("offline-at", "")}


def _ledgers(runs_root: Path) -> list[dict]:
    """A line per run directory with a ledger under ``runs_root``: rounds and global ε."""
    from dpfl.shared.federation.ledger import read_ledger

    rows = []
    for path in sorted(runs_root.glob("**/ledger.json")):
        try:
            led = read_ledger(path)
        except DpflError as exc:
            rows.append({"run-dir": str(path.parent), "error": str(exc)})
            continue
        rounds = led.get("rounds", [])
        last = rounds[-1] if rounds else {}
        rows.append({"run-dir": str(path.parent), "rounds": len(rounds),
                     "global-epsilon": last.get("global_epsilon"),
                     "global-delta": last.get("global_delta")})
    return rows


def _status_text(report: dict) -> str:
    lines = [f"Fleet API (public): {report['fleet-address']}   loopback API: "
             f"{report['api-address']}"]
    for s in report["sites"]:
        seen = s["online-at"] if s["status"] == "online" else s["offline-at"]
        lines.append(f"site {s['site']}: {s['status']}{f' since {seen}' if seen else ''}, "
                     f"node {s['node-id']}, at most {s['max-examples']} examples")
    lines += [f"run {r.get('run-id')}: {r.get('status')}" for r in report["runs"]] or ["no runs"]
    for row in report["ledgers"]:
        if "error" in row:
            lines.append(f"ledger {row['run-dir']}: {row['error']}")
        elif not row["rounds"]:
            lines.append(f"ledger {row['run-dir']}: no round recorded yet")
        else:
            lines.append(f"ledger {row['run-dir']}: {row['rounds']} round(s), global epsilon "
                         f"{row['global-epsilon']:.3f} (delta {row['global-delta']:g})")
    return "\n".join(lines)


@click.command(cls=LazyCommand, context_settings=CTX,
               options=lambda: [*_state_options(), _api_option()])
@click.argument("run_id", type=int)
def stop(pki: str, state_dir: str, api: str | None, run_id: int) -> None:
    """Stop run RUN_ID (over the coordinator's loopback API)."""
    from dpfl.server import deploy

    try:
        coord, _ = _loopback(pki, state_dir, api)
        deploy.stop_run(coord, run_id)
    except DpflError as exc:
        fail(exc)
    click.echo(f"run {run_id} stopped")
