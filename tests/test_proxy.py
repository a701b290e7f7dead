"""The public Fleet proxy (dpfl.server.proxy): its route list is the pinned flwr's Fleet API,
exactly, and nginx accepts the configuration dpfl writes. (The proxy serving a real
federation, and refusing the Control API, is tested in test_deploy.py.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import flwr.supernode.fleet_http_client as supernode_client
from flwr.superlink.routers.fleet.router import router as fleet_router

from dpfl.server.pki import make_pki
from dpfl.server.proxy import FLEET_PREFIX, FLEET_ROUTES, FleetProxy, find_nginx


def test_the_routes_are_the_pinned_flwr_fleet_router_exactly():
    served = {(method, route.path) for route in fleet_router.routes
              for method in route.methods}
    assert served == {("POST", path) for path in FLEET_ROUTES}


def test_the_supernode_calls_only_forwarded_routes():
    called = set(re.findall(r'path="([^"]+)"', Path(supernode_client.__file__).read_text()))
    assert called and all(p.startswith(FLEET_PREFIX) for p in called)
    assert called == set(FLEET_ROUTES)


def test_nginx_accepts_the_configuration(tmp_path):
    layout = make_pki(tmp_path / "pki", [])
    proxy = FleetProxy(root=tmp_path / "proxy", host="127.0.0.1", port=19443,
                       upstream_port=19444, ca_cert=layout.ca_cert,
                       server_cert=layout.server_cert, server_key=layout.server_key)
    conf = proxy.write()
    text = conf.read_text()
    for path in FLEET_ROUTES:  # each exact route forwards exactly its own path
        assert (f"location = {path} {{ limit_except POST {{ deny all; }} "
                f"proxy_pass https://superlink{path}; }}") in text
    assert "location / { return 404; }" in text and "proxy_ssl_verify on;" in text
    test = subprocess.run([find_nginx(), "-t", "-c", str(conf), "-p", str(proxy.root)],
                          capture_output=True, text=True, timeout=60)
    assert test.returncode == 0, test.stderr
