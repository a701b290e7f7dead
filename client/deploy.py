"""Deployment mode of a site: a Flower SuperNode that dials the coordinator over TLS,
authenticates with the site's private key, and serves the dpfl ClientApp.

The site's own settings travel as the SuperNode's node config (kebab-case keys of
:class:`dpfl.shared.federation.config.SiteConfig`: site-id, data, base-model, state-dir,
epsilon-budget, delta, accountant, max-physical-batch, secure-mode, device, label-map,
image-policy). They are
validated here before anything starts, and again by the ClientApp for every message; the
coordinator cannot change them.

The SuperNode's own Runtime API (where its ClientApp subprocesses fetch messages) binds
loopback on ``runtime_port``; several sites on one machine need distinct ports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from dpfl.shared.deploy.certs import check_ca_certificate, check_node_private_key, check_superlink
from dpfl.shared.deploy.flwrproc import flwr_bin, flwr_env, stop_processes_of
from dpfl.shared.errors import ConfigError
from dpfl.shared.federation.config import SiteConfig
from dpfl.shared.io import ensure_dir

log = logging.getLogger(__name__)


def node_config_arg(site: SiteConfig) -> str:
    """``--node-config`` value: space-separated ``key=value`` pairs, strings JSON-quoted,
    paths made absolute (the SuperNode's ClientApp runs in another working directory)."""
    pairs = []
    for f in dataclasses.fields(site):
        value = getattr(site, f.name)
        if value is None:  # unset (e.g. accountant: the ledger's own): the key is left out
            continue
        if f.name in ("data", "base_model", "state_dir", "label_map") and value \
                and not str(value).startswith("fmnist:"):
            value = str(Path(value).expanduser().resolve())
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            if '"' in value or "\\" in value:
                raise ConfigError(f"node config {f.name}={value!r}: quotes and backslashes "
                                  "are not supported in values")
            text = json.dumps(value)
        else:
            text = repr(value)
        pairs.append(f"{f.name.replace('_', '-')}={text}")
    return " ".join(pairs)


@dataclass(frozen=True)
class SiteNode:
    """How a site joins a federation.

    Attributes:
        site: the site's settings (node config).
        superlink: the coordinator's address, host:port.
        ca_cert: the federation CA certificate (from the coordinator), verifies the server.
        node_key: the site's node-authentication private key (OpenSSH ECDSA).
        runtime_port: loopback port of this SuperNode's Runtime API (distinct per node).
        max_wait_time: give up when the coordinator cannot be reached for this many
            seconds (0: retry forever).
    """

    site: SiteConfig
    superlink: str
    ca_cert: Path
    node_key: Path
    runtime_port: int = 9094
    max_wait_time: float = 0.0

    def __post_init__(self) -> None:
        host, _, port = self.superlink.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"superlink must be host:port with a port in 1..65535, got "
                              f"{self.superlink!r}")
        # file formats and dates now, not as a handshake failure once the SuperNode runs
        check_ca_certificate(self.ca_cert)
        check_node_private_key(self.node_key)
        if not 0 < self.runtime_port < 65536:
            raise ConfigError(f"runtime port must be in 1..65535, got {self.runtime_port}")
        if self.max_wait_time < 0:
            raise ConfigError(f"max-wait-time must be >= 0, got {self.max_wait_time}")

    @property
    def flwr_home(self) -> Path:
        return Path(self.site.state_dir).expanduser().resolve() / "flwr-home"

    def command(self) -> list[str]:
        cmd = [flwr_bin("flower-supernode"), "--superlink", self.superlink,
               "--root-certificates", str(Path(self.ca_cert).resolve()),
               "--auth-supernode-private-key", str(Path(self.node_key).resolve()),
               "--node-config", node_config_arg(self.site),
               "--isolation", "subprocess", "--host", "127.0.0.1",
               "--port", str(self.runtime_port)]
        if self.max_wait_time:
            cmd += ["--max-wait-time", str(self.max_wait_time)]
        return cmd


REFUSED = "Failed to activate SuperNode"  # flwr 1.41's public message for a refused node


def preflight(node: SiteNode, timeout: float = 5.0) -> bool:
    """Checks before the SuperNode starts: the state directory is usable, and, when the
    coordinator already answers, its certificate is signed by the CA, within its dates and
    issued for the address dialled (:class:`ConfigError` / :class:`StateError` naming them).
    Returns whether the state directory was created here (a refused site removes it)."""
    created = not Path(node.site.state_dir).expanduser().exists()
    ensure_dir(node.site.state_dir, f"state directory of site {node.site.site_id}")
    if not check_superlink(node.superlink, node.ca_cert, timeout):
        log.info("coordinator %s not reachable yet; the SuperNode will keep trying",
                 node.superlink)
    return created


def run_node(node: SiteNode, created_state: bool = False) -> int:
    """Run the SuperNode in the foreground until it exits; SIGTERM/SIGINT are passed on.

    Its output is passed through; when the coordinator refused to activate the node, the
    site is told so in its own words (not as a network fault), and a state directory this
    run created holds nothing but the SuperNode's FLWR_HOME, it is removed again. What the
    SuperNode leaves running when it exits (its SuperExec and ClientApps) is stopped."""
    import signal

    proc = subprocess.Popen(node.command(), env=flwr_env(node.flwr_home),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: proc.send_signal(signum))
    refused = threading.Event()
    pump = threading.Thread(target=_pass_through, args=(proc, refused), daemon=True)
    pump.start()
    code = proc.wait()
    stop_processes_of(node.flwr_home)  # its children hold the output pipe open otherwise
    pump.join(timeout=10)
    if code != 0 and refused.is_set():
        _refused(node, created_state)
    return code


def _pass_through(proc: subprocess.Popen, refused: threading.Event) -> None:
    """Copy the SuperNode's output to ours, noting flwr's message for a refused node."""
    import sys

    assert proc.stdout is not None
    for raw in proc.stdout:
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        if REFUSED.encode() in raw:
            refused.set()


def _refused(node: SiteNode, created_state: bool) -> None:
    log.error("the coordinator at %s refused to activate this site's node: its key is not "
              "registered there (send the public half of %s to the coordinator, who lists "
              "it with 'dpfl-server serve'), or this node is still marked online after an "
              "abrupt stop (retry after two heartbeat intervals)", node.superlink,
              node.node_key)
    state = Path(node.site.state_dir).expanduser()
    if created_state and {p.name for p in state.iterdir()} <= {"flwr-home"}:
        shutil.rmtree(state, ignore_errors=True)
        log.info("removed the state directory %s this refused start created", state)
