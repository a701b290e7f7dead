"""Deployment mode of the coordinator: a Flower SuperLink with TLS and node authentication,
and runs of the dpfl app submitted to it.

Processes and commands of the pinned flwr (1.41):

* ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile --enable-supernode-auth
  --host --port --database`` serves the Fleet, Control and Runtime APIs over HTTPS on one
  address. With ``--database`` the registered sites and runs survive a restart.
* ``flwr supernode register node.pub <connection>`` lists a site's public key; only listed
  sites may join. ``flwr run <app> <connection> --run-config ...`` submits the dpfl app (its
  FAB carries only ``pyproject.toml`` and the README; the code is the installed dpfl).
* The flwr CLI reads its connections from ``$FLWR_HOME/config.toml``; every command here uses
  the coordinator's own ``FLWR_HOME`` under its state directory, never ``~/.flwr``.

Runtime dependency installation (``uv sync``) and the update check are disabled: a hospital
deployment installs exactly the pinned packages and nothing at run time.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpfl.server.pki import PkiLayout
from dpfl.shared.deploy.certs import check_node_public_key, check_server_files
from dpfl.shared.deploy.flwrproc import DeployError, flwr_bin, flwr_env
from dpfl.shared.errors import ConfigError
from dpfl.shared.io import ensure_dir

log = logging.getLogger(__name__)

CONNECTION = "dpfl"
FINISHED = "finished"


@dataclass(frozen=True)
class Coordinator:
    """The coordinator's SuperLink.

    Attributes:
        pki: directory from ``dpfl-server certs`` (ca.crt, server.crt, server.key).
        state_dir: the coordinator's durable state: SuperLink database, FLWR_HOME, logs.
        host, port: address of the SuperLink's HTTPS API (Fleet, Control, Runtime). Sites
            dial it; keep it on loopback or a private interface behind a firewall.
        address: what clients dial (host:port); defaults to ``host:port``.
    """

    pki: Path
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 9093
    address: str = ""
    layout: PkiLayout = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pki", Path(self.pki).resolve())
        object.__setattr__(self, "state_dir", Path(self.state_dir).resolve())
        object.__setattr__(self, "layout", PkiLayout(self.pki))
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}")
        if not self.address:
            object.__setattr__(self, "address", f"{self.host}:{self.port}")

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def env(self) -> dict[str, str]:
        return flwr_env(self.flwr_home)

    def check_files(self) -> None:
        """The TLS files exist, parse, are within their dates, ``server.crt`` is signed by
        ``ca.crt`` and ``server.key`` is its key (:class:`ConfigError` naming the file)."""
        for path in (self.layout.ca_cert, self.layout.server_cert, self.layout.server_key):
            if not path.is_file():
                raise ConfigError(f"{path} is missing; create it with 'dpfl-server certs "
                                  f"--out {self.pki}'")
        check_server_files(self.layout.ca_cert, self.layout.server_cert, self.layout.server_key)

    def superlink_command(self) -> list[str]:
        return [flwr_bin("flower-superlink"),
                "--ssl-ca-certfile", str(self.layout.ca_cert),
                "--ssl-certfile", str(self.layout.server_cert),
                "--ssl-keyfile", str(self.layout.server_key),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                "--isolation", "subprocess",
                "--host", self.host, "--port", str(self.port),
                "--database", str(self.state_dir / "superlink.db")]

    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` with one TLS connection to this SuperLink."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                        f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n'
                        f'root-certificates = "{self.layout.ca_cert}"\n')
        return path


def start_superlink(coord: Coordinator) -> subprocess.Popen:
    """Start the SuperLink in its own process group, logging to STATE_DIR/superlink.log."""
    coord.check_files()
    ensure_dir(coord.state_dir, "coordinator state directory")
    coord.write_connection()
    logf = open(coord.state_dir / "superlink.log", "ab")  # noqa: SIM115 (child owns it)
    log.info("starting SuperLink on %s:%d (TLS, node authentication)", coord.host, coord.port)
    proc = subprocess.Popen(coord.superlink_command(), env=coord.env, cwd=coord.state_dir,
                            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    logf.close()
    return proc


def wait_listening(host: str, port: int, proc: subprocess.Popen | None = None,
                   timeout: float = 120.0) -> None:
    """Wait until ``host:port`` accepts TCP connections (or ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"process {proc.args[0]} exited with {proc.returncode} before "
                              f"listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


def _flwr(coord: Coordinator, args: list[str], timeout: float = 120.0) -> dict:
    """Run a ``flwr`` CLI command with ``--format json`` and return its JSON answer."""
    proc = subprocess.run([flwr_bin("flwr"), *args, "--format", "json"], env=coord.env,
                          cwd=coord.state_dir, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout.strip()
    start = out.find("{")
    try:
        answer = json.loads(out[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        answer = {}
    if proc.returncode != 0 or not answer.get("success", False):
        raise DeployError(f"'flwr {' '.join(args)}' failed (exit {proc.returncode}): "
                          f"{(answer.get('error-message') or proc.stderr or out)[-1500:]}")
    return answer


def register_site(coord: Coordinator, public_key: Path, name: str = "") -> int:
    """List a site's node-authentication public key; returns its node id."""
    if not Path(public_key).is_file():
        raise ConfigError(f"public key {public_key} does not exist")
    args = ["supernode", "register", str(public_key), CONNECTION]
    answer = _flwr(coord, args + (["--name", name] if name else []))
    log.info("registered %s as node %s", name or public_key, answer.get("node-id"))
    return int(answer["node-id"])


def app_dir(explicit: str | Path | None, work: Path) -> Path:
    """A minimal Flower app directory: dpfl's pyproject.toml (and README) copied to ``work``.

    ``flwr run`` walks the whole app directory before filtering; copying the two files keeps
    a checkout's virtualenv and models out of that walk."""
    src = Path(explicit) if explicit else Path(__file__).resolve().parent.parent
    pyproject = src / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise ConfigError(f"{src} holds no Flower app (pyproject.toml with [tool.flwr.app]); "
                          "pass --app with the dpfl source directory")
    work.mkdir(parents=True, exist_ok=True)
    for name in ("pyproject.toml", "README.md"):
        if (src / name).is_file():
            shutil.copyfile(src / name, work / name)
    return work


def submit_run(coord: Coordinator, app: Path, run_config: dict[str, object]) -> int:
    """Submit the dpfl app with ``run_config`` overrides; returns the run id."""
    args = ["run", str(app), CONNECTION]
    for key, value in run_config.items():
        val = json.dumps(value) if isinstance(value, str) else str(value).lower() \
            if isinstance(value, bool) else repr(value)
        args += ["--run-config", f"{key}={val}"]
    answer = _flwr(coord, args, timeout=300)
    log.info("submitted run %s", answer["run-id"])
    return int(answer["run-id"])


def run_status(coord: Coordinator, run_id: int) -> str:
    """``pending``, ``starting``, ``running`` or ``finished:<completed|failed|stopped>``."""
    answer = _flwr(coord, ["list", CONNECTION, "--run-id", str(run_id)])
    runs = answer.get("runs", [])
    if not runs:
        raise DeployError(f"the SuperLink does not know run {run_id}")
    return str(runs[0].get("status", "unknown"))


def wait_run(coord: Coordinator, run_id: int, timeout: float, poll: float = 3.0) -> str:
    """Poll until run ``run_id`` has finished; returns its final status."""
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = run_status(coord, run_id)
        if status.startswith(FINISHED):
            return status
        time.sleep(poll)
    raise DeployError(f"run {run_id} still '{status}' after {timeout:.0f}s")


def stop_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop ``proc``'s process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_leftover_runs(coord: Coordinator) -> list[int]:
    """Stop runs a crashed coordinator left unfinished in the SuperLink's database.

    Their ServerApps died with the coordinator; left alone, the restarted SuperLink would
    start a queued one beside the run the operator resubmits (the run-directory lock would
    then fail one of them). Returns the stopped run ids; the operator resubmits."""
    stopped = []
    for run in _flwr(coord, ["list", CONNECTION]).get("runs", []):
        status, run_id = str(run.get("status", "")), run.get("run-id")
        if run_id is None or status.startswith(FINISHED):
            continue
        try:
            _flwr(coord, ["stop", str(run_id), CONNECTION])
            stopped.append(int(run_id))
            log.warning("stopped run %s (%s) left over from before the restart; resubmit it "
                        "with 'dpfl-server run' (it resumes from its run directory)", run_id,
                        status)
        except DeployError as exc:  # it may have finished meanwhile
            log.warning("could not stop leftover run %s: %s", run_id, exc)
    return stopped


def serve(coord: Coordinator, site_keys: dict[str, Path]) -> int:
    """Run the SuperLink in the foreground and list ``site_keys`` (site -> node.pub).

    Keys listed before (the database persists them) are kept. Returns the SuperLink's
    exit status; SIGTERM/SIGINT stop the SuperLink and its ServerApp processes."""
    import signal

    def _stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    coord.check_files()  # certificates and keys are named before anything starts
    for site, pub in site_keys.items():
        check_node_public_key(pub, site)
    signal.signal(signal.SIGTERM, _stop)
    proc = start_superlink(coord)
    try:
        wait_listening(coord.host, coord.port, proc)
        for site, pub in site_keys.items():
            try:
                register_site(coord, pub, site)
            except DeployError as exc:
                if "already" not in str(exc).lower():
                    raise
                log.info("%s was listed before", site)
        stop_leftover_runs(coord)
        log.info("SuperLink ready on %s with %d listed site(s); log: %s", coord.address,
                 len(site_keys), coord.state_dir / "superlink.log")
        return proc.wait()
    except KeyboardInterrupt:
        log.info("stopping the SuperLink")
        return 0
    finally:
        stop_group(proc)
