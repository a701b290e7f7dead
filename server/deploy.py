"""Deployment mode of the coordinator: a Flower SuperLink with TLS and node authentication
on loopback, an nginx proxy that serves only its Fleet API publicly, and runs of the dpfl app
submitted to it.

Processes and commands of the pinned flwr (1.41):

* ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile --enable-supernode-auth
  --host 127.0.0.1 --port API_PORT --database`` serves the Fleet, Control and Runtime APIs
  over HTTPS on one address, and the Control API asks nothing beyond TLS: so it listens on
  loopback only, and :mod:`dpfl.server.proxy` (nginx) serves the Fleet routes on the public
  address. With ``--database`` the registered sites and runs survive a restart.
* ``flwr supernode register node.pub <connection>`` lists a site's public key (over
  loopback); only listed sites may join. ``flwr run <app> <connection> --run-config ...``
  submits the dpfl app (its FAB carries only ``pyproject.toml`` and the README; the code is
  the installed dpfl).
* The flwr CLI reads its connections from ``$FLWR_HOME/config.toml``; every command here uses
  the coordinator's own ``FLWR_HOME`` under its state directory, never ``~/.flwr``, and its
  one connection is the loopback API.

What the operator decided at ``serve`` (the loopback and public addresses, the paths a run
config may name, the enrolled sites and their weight bounds) is kept in
``STATE_DIR/coordinator.json`` (:mod:`dpfl.server.policy`).

Runtime dependency installation (``uv sync``) and the update check are disabled: a hospital
deployment installs exactly the pinned packages and nothing at run time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from dpfl.server.pki import LOOPBACK_NAMES, PkiLayout, server_names
from dpfl.server.policy import (
    MAX_SITE_EXAMPLES,
    POLICY_FILE,
    STATE_ENV,
    CoordinatorPolicy,
    Enrolled,
    enrol,
    key_fingerprint,
)
from dpfl.server.proxy import FleetProxy, find_nginx, start_proxy
from dpfl.shared.deploy.certs import check_node_public_key, check_server_files
from dpfl.shared.deploy.flwrproc import (
    DeployError,
    die_with_parent,
    flwr_bin,
    flwr_env,
    stop_processes_of,
)
from dpfl.shared.errors import ConfigError
from dpfl.shared.io import ensure_dir

log = logging.getLogger(__name__)

CONNECTION = "dpfl"
FINISHED = "finished"


@dataclass(frozen=True)
class Coordinator:
    """The coordinator's SuperLink and its public Fleet proxy.

    Attributes:
        pki: directory from ``dpfl-server certs`` (ca.crt, server.crt, server.key).
        state_dir: the coordinator's durable state: SuperLink database, FLWR_HOME, logs,
            ``coordinator.json``, the proxy's files.
        host, port: the public address nginx serves the Fleet API on (what sites dial).
        api_port: the SuperLink's own HTTPS API (Fleet, Control, Runtime) on 127.0.0.1;
            ``dpfl-server run/status/stop`` and node registration use it.
        address: what sites dial (host:port); defaults to ``host:port``.
    """

    pki: Path
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 9093
    api_port: int = 9095
    address: str = ""
    layout: PkiLayout = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pki", Path(self.pki).resolve())
        object.__setattr__(self, "state_dir", Path(self.state_dir).resolve())
        object.__setattr__(self, "layout", PkiLayout(self.pki))
        for name in ("port", "api_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ConfigError(f"{name} must be in 1..65535, got {getattr(self, name)}")
        if self.port == self.api_port:
            raise ConfigError(f"the public port and the SuperLink's API port are both "
                              f"{self.port}; give --api-port another")
        if not self.address:
            object.__setattr__(self, "address", f"{self.host}:{self.port}")

    @property
    def api_address(self) -> str:
        return f"127.0.0.1:{self.api_port}"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def env(self) -> dict[str, str]:
        """Every coordinator process's environment: flwr's, the state directory for the
        ServerApp (:data:`~dpfl.server.policy.STATE_ENV`), and none of flwr's switches that
        would start its legacy gRPC APIs on other (public) addresses."""
        env = {**flwr_env(self.flwr_home), STATE_ENV: str(self.state_dir)}
        for legacy in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
            env.pop(legacy, None)
        return env

    def proxy(self) -> FleetProxy:
        return FleetProxy(root=self.state_dir / "proxy", host=self.host, port=self.port,
                          upstream_port=self.api_port, ca_cert=self.layout.ca_cert,
                          server_cert=self.layout.server_cert,
                          server_key=self.layout.server_key)

    def check_files(self) -> None:
        """The TLS files exist, parse, are within their dates, ``server.crt`` is signed by
        ``ca.crt``, ``server.key`` is its key, and it names the loopback names the proxy and
        the flwr CLI check (:class:`ConfigError` naming the file)."""
        for path in (self.layout.ca_cert, self.layout.server_cert, self.layout.server_key):
            if not path.is_file():
                raise ConfigError(f"{path} is missing; create it with 'dpfl-server certs "
                                  f"--out {self.pki}'")
        check_server_files(self.layout.ca_cert, self.layout.server_cert, self.layout.server_key)
        missing = [n for n in LOOPBACK_NAMES if n not in server_names(self.layout.server_cert)]
        if missing:
            raise ConfigError(f"{self.layout.server_cert} does not name {missing}, which the "
                              "Fleet proxy and the coordinator's own commands dial on "
                              "loopback; re-issue it: 'dpfl-server certs --out "
                              f"{self.pki} --host <the names sites dial>'")

    def superlink_command(self) -> list[str]:
        return [flwr_bin("flower-superlink"),
                "--ssl-ca-certfile", str(self.layout.ca_cert),
                "--ssl-certfile", str(self.layout.server_cert),
                "--ssl-keyfile", str(self.layout.server_key),
                "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                "--isolation", "process",
                "--host", "127.0.0.1", "--port", str(self.api_port),
                "--database", str(self.state_dir / "superlink.db")]

    def superexec_command(self) -> list[str]:
        """The SuperExec that launches the ServerApps: what flwr's SuperLink would start
        itself in ``subprocess`` isolation, started and supervised by ``serve`` instead
        (flwr 1.41 never restarts its own when it exits). It dials the loopback Runtime API
        over TLS, checked against the federation CA, and exits with ``serve``."""
        return [flwr_bin("flower-superexec"),
                "--root-certificates", str(self.layout.ca_cert),
                "--runtime-api-address", self.api_address,
                "--parent-pid", str(os.getpid())]

    def write_connection(self, api_address: str = "") -> Path:
        """``$FLWR_HOME/config.toml`` with one TLS connection, to the loopback API."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        path = self.flwr_home / "config.toml"
        path.write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                        f'[superlink.{CONNECTION}]\n'
                        f'address = "{api_address or self.api_address}"\n'
                        f'root-certificates = "{self.layout.ca_cert}"\n')
        return path


def start_superlink(coord: Coordinator) -> subprocess.Popen:
    """Start the SuperLink in its own process group, logging to STATE_DIR/superlink.log.
    What a predecessor killed outright left running (its SuperExec and ServerApps, which
    would reconnect to this SuperLink) is stopped first."""
    coord.check_files()
    ensure_dir(coord.state_dir, "coordinator state directory")
    if stop_processes_of(coord.flwr_home):
        log.warning("stopped processes a previous coordinator left running")
    coord.write_connection()
    logf = open(coord.state_dir / "superlink.log", "ab")  # noqa: SIM115 (child owns it)
    log.info("starting SuperLink on %s (loopback; TLS, node authentication)",
             coord.api_address)
    proc = subprocess.Popen(coord.superlink_command(), env=coord.env, cwd=coord.state_dir,
                            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent)
    logf.close()
    return proc


def start_superexec(coord: Coordinator) -> subprocess.Popen:
    """Start the SuperExec in its own process group, logging to STATE_DIR/superexec.log."""
    logf = open(coord.state_dir / "superexec.log", "ab")  # noqa: SIM115 (child owns it)
    proc = subprocess.Popen(coord.superexec_command(), env=coord.env, cwd=coord.state_dir,
                            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent)
    logf.close()
    log.info("started the SuperExec (pid %d; log: %s)", proc.pid,
             coord.state_dir / "superexec.log")
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


def register_site(coord: Coordinator, public_key: Path, name: str = "") -> int | None:
    """List a site's node-authentication public key (over loopback); returns its node id,
    or None when the SuperLink had it listed already."""
    if not Path(public_key).is_file():
        raise ConfigError(f"public key {public_key} does not exist")
    args = ["supernode", "register", str(public_key), CONNECTION]
    try:
        answer = _flwr(coord, args + (["--name", name] if name else []))
    except DeployError as exc:
        if "already" not in str(exc).lower():
            raise
        log.info("%s was listed before", name or public_key)
        return None
    log.info("registered %s as node %s", name or public_key, answer.get("node-id"))
    return int(answer["node-id"])


def unregister_node(coord: Coordinator, node_id: int) -> None:
    _flwr(coord, ["supernode", "unregister", str(node_id), CONNECTION])


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


def list_runs(coord: Coordinator) -> list[dict]:
    """Every run the SuperLink knows (``flwr ls`` over loopback), oldest first."""
    return list(_flwr(coord, ["list", CONNECTION]).get("runs", []))


def list_nodes(coord: Coordinator) -> dict[int, dict]:
    """Every node the SuperLink knows (``flwr supernode ls -v`` over loopback): node id ->
    its status (``online``, ``offline``, ``registered``, ``unregistered``) and times."""
    nodes = _flwr(coord, ["supernode", "ls", CONNECTION, "-v"]).get("nodes", [])
    return {int(n["node-id"]): n for n in nodes}


def stop_run(coord: Coordinator, run_id: int) -> None:
    """Stop run ``run_id`` (``flwr stop`` over loopback)."""
    _flwr(coord, ["stop", str(run_id), CONNECTION])
    log.info("stopped run %s", run_id)


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
    for run in list_runs(coord):
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


@dataclass(frozen=True)
class ServeOptions:
    """What ``serve`` is told beyond the processes: the sites and what a run may touch.

    Attributes:
        site_keys: site -> node public key; exactly these sites may join.
        site_examples: site -> the most examples it may weigh in FedAvg (declared at
            enrolment; the others get ``max_site_examples``).
        model_roots: directories a run's ``base-model`` must lie in.
        runs_root: directory a run's ``run-dir`` must lie inside [default: STATE_DIR/runs].
        nginx: the nginx binary [default: found on PATH].
    """

    site_keys: dict[str, Path]
    site_examples: dict[str, int] = field(default_factory=dict)
    max_site_examples: int = MAX_SITE_EXAMPLES
    model_roots: tuple[Path, ...] = ()
    runs_root: Path | None = None
    nginx: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.site_examples) - set(self.site_keys))
        if unknown:
            raise ConfigError(f"--site-examples names {unknown}, which are not listed sites "
                              f"({sorted(self.site_keys)})")
        bad = {s: n for s, n in {**self.site_examples, "*": self.max_site_examples}.items()
               if isinstance(n, bool) or not isinstance(n, int) or n < 1}
        if bad:
            raise ConfigError(f"a site's example bound must be a whole number >= 1, got {bad}")


def _previous_enrolment(coord: Coordinator) -> dict[str, Enrolled]:
    """The enrolment an earlier ``serve`` of this state directory recorded (site -> entry)."""
    if not (coord.state_dir / POLICY_FILE).exists():
        return {}
    return {e.site: e for e in CoordinatorPolicy.read(coord.state_dir).sites}


def enrol_sites(coord: Coordinator, opts: ServeOptions) -> tuple[Enrolled, ...]:
    """Register every listed key over loopback and unregister sites no longer listed; returns
    the enrolment (site, node id, key fingerprint, weight bound)."""
    previous = _previous_enrolment(coord)
    for gone in sorted(set(previous) - set(opts.site_keys)):
        unregister_node(coord, previous[gone].node_id)
        log.warning("unregistered %s (node %d): it is no longer listed", gone,
                    previous[gone].node_id)
    known = list_nodes(coord) if previous else {}
    enrolled = []
    for site, pub in opts.site_keys.items():
        old = previous.get(site)
        if old is not None and old.key_sha256 == key_fingerprint(pub) and \
                known.get(old.node_id, {}).get("status", "unregistered") != "unregistered":
            node_id = None  # listed before as this node, and the SuperLink still has it
            log.info("%s: listed before as node %d", site, old.node_id)
        else:
            node_id = register_site(coord, pub, site)
        bound = opts.site_examples.get(site, opts.max_site_examples)
        enrolled.append(enrol(previous, site, node_id, pub, bound))
        if old is not None and old.node_id != enrolled[-1].node_id:  # a new key: rotated
            unregister_node(coord, old.node_id)
            log.warning("unregistered %s's previous key (node %d)", site, old.node_id)
    return tuple(enrolled)


def _start_processes(coord: Coordinator, nginx: str, procs: list[subprocess.Popen]) -> None:
    """The SuperLink on loopback, the SuperExec beside it, then the Fleet proxy on the public
    address (each appended to ``procs`` as soon as it runs, so that a signal meanwhile still
    stops it)."""
    procs.append(start_superlink(coord))
    wait_listening("127.0.0.1", coord.api_port, procs[0])
    procs.append(start_superexec(coord))
    procs.append(start_proxy(coord.proxy(), nginx, coord.env))
    wait_listening(coord.host if coord.host not in ("0.0.0.0", "::") else "127.0.0.1",
                   coord.port, procs[2])


def serve(coord: Coordinator, opts: ServeOptions) -> int:
    """Run the SuperLink (loopback) and its Fleet proxy (public) in the foreground, enrol the
    listed sites and record the policy; returns when either process ends (its exit status)
    or on SIGTERM/SIGINT, which stop both and the SuperLink's ServerApp processes."""
    import signal

    def _stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    coord.check_files()  # certificates and keys are named before anything starts
    for site, pub in opts.site_keys.items():
        check_node_public_key(pub, site)
    nginx = find_nginx(opts.nginx)
    ensure_dir(coord.state_dir, "coordinator state directory")
    signal.signal(signal.SIGTERM, _stop)
    procs: list[subprocess.Popen] = []
    try:
        _start_processes(coord, nginx, procs)
        policy = CoordinatorPolicy(
            state_dir=coord.state_dir, api_address=coord.api_address,
            public_address=coord.address, model_roots=opts.model_roots,
            runs_root=opts.runs_root or coord.state_dir / "runs",
            sites=enrol_sites(coord, opts), started_at=time.time())
        policy.write()
        stop_leftover_runs(coord)
        log.info("SuperLink ready: Fleet API on %s (nginx), loopback API on %s, %d listed "
                 "site(s); log: %s", coord.address, coord.api_address, len(policy.sites),
                 coord.state_dir / "superlink.log")
        return _supervise(coord, procs)
    except KeyboardInterrupt:
        log.info("stopping the SuperLink and the Fleet proxy")
        return 0
    finally:
        for proc in reversed(procs):
            stop_group(proc)
        stop_processes_of(coord.flwr_home)  # ServerApps that outlive the SuperLink


# a SuperExec that exits this many times within RESTART_WINDOW seconds is not restarted again
MAX_RESTARTS, RESTART_WINDOW = 5, 120.0


def _supervise(coord: Coordinator, procs: list[subprocess.Popen]) -> int:
    """Block until the SuperLink or the proxy exits (its exit status; the caller stops the
    rest), restarting the SuperExec (``procs[1]``) whenever it exits.

    A dead SuperExec would leave every later run pending with no message (it died once on
    an HTTP 500 from the SuperLink's Runtime API when SQLite answered "database is locked").
    Runs submitted meanwhile start once it is back. One that keeps dying (MAX_RESTARTS
    exits within RESTART_WINDOW seconds) stops ``serve`` with an error naming its log."""
    exits: list[float] = []
    while True:
        for i, proc in enumerate(procs):
            if proc.poll() is None:
                continue
            name = Path(str(proc.args[0])).name
            if i != 1:
                log.error("%s exited with %s", name, proc.returncode)
                return proc.returncode or 1
            now = time.monotonic()
            exits = [t for t in exits if now - t < RESTART_WINDOW] + [now]
            if len(exits) > MAX_RESTARTS:
                log.error("the SuperExec exited %d times within %.0f s (last status %s); "
                          "not restarting it again: see %s", len(exits), RESTART_WINDOW,
                          proc.returncode, coord.state_dir / "superexec.log")
                return proc.returncode or 1
            log.warning("the SuperExec exited with %s; restarting it (runs submitted "
                        "meanwhile start once it is back)", proc.returncode)
            procs[1] = start_superexec(coord)
        time.sleep(0.5)
