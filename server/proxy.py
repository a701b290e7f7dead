"""The coordinator's public face: an nginx TLS reverse proxy that forwards the Flower Fleet
API and nothing else.

The pinned flwr (1.41) serves its Fleet, Control and Runtime APIs as one HTTPS application
on one address, and the Control API (list, submit and stop runs, register node keys) asks
nothing of a caller beyond TLS. So ``dpfl-server serve`` binds the SuperLink to loopback
only and puts nginx (Debian's ``nginx-light``) on the address sites dial. nginx terminates
TLS with the SuperLink's own certificate, forwards exactly the ``POST`` routes in
:data:`FLEET_ROUTES` to the SuperLink over TLS (verified against the federation's CA), and
answers 404 to everything else: the Control and Runtime APIs, ``/docs``, ``/openapi.json``.

nginx rather than a Python proxy: it is a widely deployed, separately maintained TLS
terminator with a small configuration, it streams request and response bodies without
buffering whole model updates, and it is one Debian package on the coordinator.

:data:`FLEET_ROUTES` is the Fleet router of flwr 1.41 (``flwr.superlink.routers.fleet.router``,
prefix ``/v1/fleet``); ``tests/test_proxy.py`` compares it with the installed flwr's router
and with the paths its SuperNode calls, so a flwr upgrade that adds or renames a route fails
there instead of silently breaking (or opening) the public port.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dpfl.shared.deploy.flwrproc import DeployError, die_with_parent
from dpfl.shared.errors import ConfigError
from dpfl.shared.io import ensure_dir

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet"
FLEET_ROUTES = tuple(f"{FLEET_PREFIX}/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"))
UPSTREAM_NAME = "localhost"  # the name nginx checks on the SuperLink's certificate
MAX_BODY = "512m"  # one push-object carries a (chunk of a) model update
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def find_nginx(explicit: str | None = None) -> str:
    """The nginx binary: ``explicit``, ``$DPFL_NGINX``, PATH, then the usual places."""
    wanted = explicit or os.environ.get("DPFL_NGINX")
    if wanted:
        if not (Path(wanted).is_file() and os.access(wanted, os.X_OK)):
            raise ConfigError(f"nginx binary {wanted} does not exist or is not executable")
        return wanted
    found = shutil.which("nginx") or next(
        (c for c in NGINX_CANDIDATES if os.access(c, os.X_OK)), None)
    if not found:
        raise ConfigError("nginx is not installed; the coordinator's public port is an nginx "
                          "reverse proxy: install it ('apt-get install nginx-light') or pass "
                          "--nginx /path/to/nginx")
    return found


@dataclass(frozen=True)
class FleetProxy:
    """nginx on ``host:port`` (public) forwarding :data:`FLEET_ROUTES` to the SuperLink on
    ``127.0.0.1:upstream_port``; its files live in ``root``."""

    root: Path
    host: str
    port: int
    upstream_port: int
    ca_cert: Path
    server_cert: Path
    server_key: Path

    @property
    def conf(self) -> Path:
        return self.root / "nginx.conf"

    def render(self) -> str:
        """The whole nginx configuration (nothing is inherited from /etc/nginx)."""
        listen = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        # exact locations, and each forwards its own fixed path: the SuperLink never sees a
        # request path other than these twelve, however the client spelled it
        routes = "\n".join(f"        location = {path} {{ limit_except POST {{ deny all; }} "
                            f"proxy_pass https://superlink{path}; }}" for path in FLEET_ROUTES)
        tmp = self.root / "tmp"
        temps = "\n".join(f"    {kind}_temp_path {tmp / kind};"
                          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        return f"""# written by dpfl-server serve; regenerated at every start
{_user_line()}worker_processes 1;
daemon off;
pid {self.root / 'nginx.pid'};
error_log {self.root / 'error.log'} notice;
events {{ worker_connections 512; }}
http {{
    access_log {self.root / 'access.log'};
{temps}
    server_tokens off;
    client_max_body_size {MAX_BODY};
    proxy_request_buffering off;
    proxy_buffering off;
    proxy_read_timeout 600s;
    proxy_send_timeout 600s;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_ssl_verify on;
    proxy_ssl_verify_depth 2;
    proxy_ssl_trusted_certificate {self.ca_cert};
    proxy_ssl_name {UPSTREAM_NAME};
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
    upstream superlink {{ server 127.0.0.1:{self.upstream_port}; keepalive 16; }}
    server {{
        listen {listen} ssl;
        ssl_certificate {self.server_cert};
        ssl_certificate_key {self.server_key};
        ssl_protocols TLSv1.2 TLSv1.3;
{routes}
        location / {{ return 404; }}
    }}
}}
"""

    def write(self) -> Path:
        ensure_dir(self.root, "proxy directory")
        (self.root / "tmp").mkdir(exist_ok=True)
        self.conf.write_text(self.render())
        return self.conf


def _user_line() -> str:
    """As root, nginx's workers drop to ``nobody`` (the master reads keys and opens logs)."""
    if os.geteuid() != 0:
        return ""
    nobody = pwd.getpwnam("nobody")
    return f"user nobody {grp.getgrgid(nobody.pw_gid).gr_name};\n"


def start_proxy(proxy: FleetProxy, nginx: str, env: dict[str, str]) -> subprocess.Popen:
    """Write and test the configuration, then start nginx in the foreground (its own
    process group, logging to ``root/error.log``)."""
    conf = proxy.write()
    test = subprocess.run([nginx, "-t", "-q", "-c", str(conf), "-p", str(proxy.root)],
                          capture_output=True, text=True, timeout=60)
    if test.returncode != 0:
        raise DeployError(f"nginx refused {conf}: {(test.stderr or test.stdout).strip()[-1500:]}")
    log.info("starting the Fleet proxy (nginx) on %s:%d -> 127.0.0.1:%d", proxy.host,
             proxy.port, proxy.upstream_port)
    out = open(proxy.root / "nginx.out", "ab")  # noqa: SIM115 (child owns it)
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(proxy.root)], env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent)
    out.close()
    return proc
