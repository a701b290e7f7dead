"""Deployment mode with real processes on 127.0.0.1: `dpfl-server certs/serve/run` and
`dpfl-client join` - a SuperLink with TLS and node authentication, three listed sites
training two DP rounds, and an unlisted site that is refused. Every process is stopped and
none may be left."""

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from dpfl.shared.deploy.flwrproc import processes_of
from dpfl.shared.ldm.models import build_ldm, save_ldm
from dpfl.shared.privacy.accountant import PersistentAccountant

from .deploy_harness import ROOT, Harness, cli, env, free_port, serve_cmd, wait_for
from .test_federation import _silo

SITES = ("site-0", "site-1", "site-2")


def _tls_checks(port: int, ca) -> dict:
    """Handshake with the federation CA succeeds; with the system CAs it must fail."""
    result = {}
    for name, ctx in (("federation-ca", ssl.create_default_context(cafile=str(ca))),
                      ("system-ca", ssl.create_default_context())):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                result[name] = "ok"
        except ssl.SSLCertVerificationError as exc:
            result[name] = f"refused: {exc.verify_message}"
    return result


def _join(h: Harness, name: str, port: int, pki, key, base, silo, state) -> None:
    h.start(name, cli("client", "join", "--superlink", f"127.0.0.1:{port}",
                      "--ca-cert", str(pki / "ca.crt"), "--node-key", str(key),
                      "--site-id", name, "--data", str(silo), "--base-model", str(base),
                      "--state-dir", str(state), "--epsilon-budget", "8", "--delta", "1e-3",
                      "--device", "cpu", "--runtime-port", str(free_port()),
                      "--max-wait-time", "120"))


def _flwr_json(home, *args: str) -> dict:
    """A ``flwr`` CLI command with its own FLWR_HOME; its JSON answer (and the exit code)."""
    proc = subprocess.run([str(Path(sys.executable).parent / "flwr"), *args, "--format", "json"],
                          cwd=ROOT, env={**env(), "FLWR_HOME": str(home)}, capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout[proc.stdout.find("{"):] if "{" in proc.stdout else "{}"
    return {**json.loads(out), "rc": proc.returncode}


def _stranger_home(tmp, port, ca) -> Path:
    """What anybody holding only the federation's CA certificate can set up."""
    home = tmp / "stranger"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{ca}"\n')
    return home


TRICKS = ("/v1/fleet/get-run/../../control/list-runs", "/v1/fleet/../control/list-runs",
          "/v1//control/list-runs", "/v1/fleet/get-run%2F..%2F..%2Fcontrol%2Flist-runs",
          "/v1/fleet/%2e%2e/control/list-runs", "/v1/control/list-runs?/v1/fleet/get-run",
          "/v1/runtime/get-run", "/openapi.json", "/docs", "/health")


def _raw_requests(port, ca) -> dict:
    """Hand-made requests that try to reach past the route list: (status, body) by path;
    also a GET of a Fleet route (only POST is forwarded)."""
    import http.client

    ctx = ssl.create_default_context(cafile=str(ca))
    out = {}
    for method, path in [("POST", p) for p in TRICKS] + [("GET", "/v1/fleet/get-run")]:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
        conn.request(method, path, body=b"" if method == "POST" else None)
        resp = conn.getresponse()
        out[f"{method} {path}"] = (resp.status, resp.read().decode(errors="replace"))
        conn.close()
    return out


def _listening(flwr_home: Path) -> dict[str, list[str]]:
    """The TCP addresses the coordinator's flwr processes listen on (``ss -ltnp``), by
    command: the SuperLink and its SuperExec must listen on loopback only."""
    from dpfl.shared.deploy.flwrproc import processes_of

    argv = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            for pid in processes_of(flwr_home)}
    pids = {pid: a[1].decode() for pid, a in argv.items()  # python3 SCRIPT ...; not nginx
            if len(a) > 1 and not a[0].startswith(b"nginx")}
    out: dict[str, list[str]] = {}
    for line in subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        for pid, cmd in pids.items():
            if f"pid={pid}," in line:
                out.setdefault(Path(cmd).name, []).append(line.split()[3])
    return out


def _attacks(tmp, port, pki, rogue_pki) -> dict:
    """The Control API's commands against the public address, with only the CA."""
    from dpfl.server.deploy import app_dir

    home = _stranger_home(tmp, port, pki / "ca.crt")
    app = app_dir(None, tmp / "stranger-app")
    return {"raw": _raw_requests(port, pki / "ca.crt"),
            "ls": _flwr_json(home, "ls", "c"),
            "supernode ls": _flwr_json(home, "supernode", "ls", "c"),
            "register": _flwr_json(home, "supernode", "register",
                                   str(rogue_pki / "sites" / "rogue" / "node.pub"), "c"),
            "run": _flwr_json(home, "run", str(app), "c", "--run-config",
                              f'run-dir="{tmp / "stranger-run"}"'),
            "stop": _flwr_json(home, "stop", "1", "c")}


def _bad_runs(tmp, coord) -> dict:
    """Run configs naming paths outside what ``serve`` allows: through ``dpfl-server run``
    (refused before submitting) and submitted raw over loopback (the ServerApp refuses)."""
    out = {}
    home = coord / "flwr-home"
    for key, value in (("run-dir", "/etc/x"), ("base-model", "../../x")):
        good = {"base-model": str(tmp / "base"), "run-dir": "runs/ok"}
        sets = {**good, key: value}
        out[f"cli {key}"] = subprocess.run(
            cli("server", "run", "--pki", str(tmp / "pki"), "--state-dir", str(coord),
                "--no-wait", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]),
            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
        out[f"raw {key}"] = _flwr_json(home, "run", str(coord / "app"), "dpfl", "--run-config",
                                       " ".join(f'{k}="{v}"' for k, v in sets.items()))
    wait_for(lambda: all(str(r.get("status", "")).startswith("finished")
                         for r in _flwr_json(home, "ls", "dpfl")["runs"]),
             300, "the refused runs to finish")
    out["runs"] = _flwr_json(home, "ls", "dpfl")["runs"]
    for key in ("run-dir", "base-model"):
        run_id = str(out[f"raw {key}"].get("run-id"))
        out[f"log {key}"] = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), "log", run_id, "dpfl", "--show"],
            cwd=ROOT, env={**env(), "FLWR_HOME": str(home)}, capture_output=True, text=True,
            timeout=120).stdout
    return out


def _status(tmp, coord) -> dict:
    res = subprocess.run(cli("server", "status", "--pki", str(tmp / "pki"), "--state-dir",
                             str(coord), "--json"),
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _stop_a_run(tmp, coord, sets) -> tuple[subprocess.CompletedProcess, dict]:
    """Submit a long run without waiting, stop it with ``dpfl-server stop``."""
    submit = subprocess.run(
        cli("server", "run", "--pki", str(tmp / "pki"), "--state-dir", str(coord), "--no-wait",
            *[a for k, v in {**sets, "run-dir": tmp / "run-stopped", "num-rounds": 50}.items()
              for a in ("--set", f"{k}={v}")]),
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert submit.returncode == 0, submit.stderr
    run_id = submit.stdout.split()[1]
    stop = subprocess.run(cli("server", "stop", "--pki", str(tmp / "pki"), "--state-dir",
                              str(coord), run_id),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    runs = {str(r["run-id"]): r for r in _status(tmp, coord)["runs"]}
    return stop, runs[run_id]


def _superexecs(home: Path) -> list[int]:
    found = []
    for pid in processes_of(home):
        try:
            if b"flower-superexec" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def _kill_superexec(h: Harness, coord: Path) -> dict:
    """SIGKILL the coordinator's SuperExec (what launches every ServerApp); ``serve`` must
    start another. The run that follows shows that runs still start."""
    home = coord / "flwr-home"
    wait_for(lambda: len(_superexecs(home)) == 1, 60, "the SuperExec")
    old = _superexecs(home)[0]
    subprocess.run(["kill", "-9", str(old)], check=True)
    wait_for(lambda: "the SuperExec exited with -9; restarting it" in h.output("coordinator"),
             60, "serve to notice the dead SuperExec")
    wait_for(lambda: _superexecs(home) and old not in _superexecs(home), 60, "a new SuperExec")
    return {"old": old, "new": _superexecs(home)}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    base = save_ldm(build_ldm("tiny", seed=0), tmp / "base")
    pki, rogue_pki, coord = tmp / "pki", tmp / "rogue-pki", tmp / "coord"
    for out, sites in ((pki, SITES), (rogue_pki, ("rogue",))):
        subprocess.run(cli("server", "certs", "--out", str(out), "--host", "127.0.0.1",
                           "--host", "localhost", *[a for s in sites for a in ("--site", s)]),
                       cwd=ROOT, env=env(), check=True, capture_output=True, timeout=120)
    port = free_port()
    h = Harness(tmp)
    res: dict = dict(tmp=tmp, h=h)
    try:
        # site-2 is enrolled with a bound below the 48 examples it will report
        h.start("coordinator", serve_cmd(pki, coord, port, tmp, "--site-examples", "site-2=10"))
        wait_for(lambda: "SuperLink ready" in h.output("coordinator")
                 or h.procs["coordinator"].poll() is not None, 180, "SuperLink")
        assert "SuperLink ready" in h.output("coordinator"), h.output("coordinator")[-3000:]
        res["tls"] = _tls_checks(port, pki / "ca.crt")
        res["listening"] = _listening(coord / "flwr-home")
        res["superexec"] = _kill_superexec(h, coord)
        res["attacks"] = _attacks(tmp, port, pki, rogue_pki)
        res["status_before"] = _status(tmp, coord)
        for i, site in enumerate(SITES):
            _silo(tmp / f"silo{i}.npz", i, [(0, 1, 2), (3, 4, 5), (6, 7, 8)][i])
            _join(h, site, port, pki, pki / "sites" / site / "node.key", base,
                  tmp / f"silo{i}.npz", tmp / f"state{i}")
        _join(h, "rogue", port, pki, rogue_pki / "sites" / "rogue" / "node.key", base,
              tmp / "silo0.npz", tmp / "state-rogue")
        sets = {"base-model": base, "run-dir": tmp / "run", "num-rounds": 2, "batch-size": 16,
                "noise-multiplicity": 2, "target-epsilon": 4.0, "min-available-nodes": 3,
                "sample-steps": 2, "lr": 5e-3, "round-timeout": 600}
        res["run"] = subprocess.run(
            cli("server", "run", "--pki", str(pki), "--state-dir", str(coord), "--timeout",
                "900", *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]),
            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=1000)
        # the refused site gives up on its own once --max-wait-time (120 s) has passed
        wait_for(lambda: h.procs["rogue"].poll() is not None, 400, "the refused site to exit")
        res["rogue_rc"] = h.procs["rogue"].poll()
        res["status_after"] = _status(tmp, coord)
        res["bad"] = _bad_runs(tmp, coord)
        res["stop"], res["stopped_run"] = _stop_a_run(tmp, coord, sets)
    finally:
        res["left"] = h.stop_all()
    run = res["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + \
        (coord / "superlink.log").read_text()[-3000:]
    return res


def test_listed_sites_train_two_rounds_over_tls(deployment):
    tmp = deployment["tmp"]
    assert "finished:completed" in deployment["run"].stdout
    assert deployment["tls"]["federation-ca"] == "ok"
    assert deployment["tls"]["system-ca"].startswith("refused")
    led = json.loads((tmp / "run" / "ledger.json").read_text())
    r1, r2 = led["rounds"]
    assert set(r1["sites"]) == set(r2["sites"]) == set(SITES)
    for i, site in enumerate(SITES):
        assert r2["sites"][site]["epsilon"] > r1["sites"][site]["epsilon"] > 0
        own = PersistentAccountant.load(tmp / f"state{i}" / "accountant.json")
        assert led["sites"][site]["epsilon"] == pytest.approx(own.epsilon(), rel=1e-9)
        assert led["sites"][site]["epsilon"] <= 4.0 + 1e-6
    assert r2["global_epsilon"] == max(v["epsilon"] for v in r2["sites"].values())
    assert (tmp / "run" / "adapter" / "adapter_model.safetensors").exists()
    for site in SITES:  # the site's operator sees each round in join's output
        out = deployment["h"].output(site)
        for rnd in (1, 2):
            assert f"site {site}: run " in out and f"round {rnd}: trained " in out, out[-2000:]
        assert "secure noise on (OS CSPRNG)" in out
        assert "Secure RNG turned off" not in out  # Opacus' warning, untrue here


def test_a_dead_superexec_is_restarted_and_runs_still_start(deployment):
    """flwr 1.41's SuperLink never restarts a SuperExec that exits (every later run would
    stay pending); ``serve`` supervises its own. Killed before the run, the run completes."""
    assert len(deployment["superexec"]["new"]) == 1
    assert deployment["superexec"]["new"] != [deployment["superexec"]["old"]]
    assert "finished:completed" in deployment["run"].stdout
    log = (deployment["tmp"] / "coord" / "superexec.log").read_text()
    assert log.count("Starting Flower SuperExec") >= 2, log[-2000:]


def test_unlisted_site_is_refused(deployment):
    tmp, h = deployment["tmp"], deployment["h"]
    assert deployment["rogue_rc"] not in (None, 0)  # it gave up on its own
    assert "Failed to activate SuperNode" in h.output("rogue")
    assert "No SuperNode found with the given public key" in \
        (tmp / "coord" / "superlink.log").read_text()
    assert "refused to activate this site's node: its key is not registered there" in \
        h.output("rogue")  # said as what it is, not as a network fault
    assert not (tmp / "state-rogue").exists()  # never trained; the directory it made is gone


def test_every_process_is_stopped(deployment):
    assert deployment["left"] == []
    for name, proc in deployment["h"].procs.items():
        assert proc.poll() is not None, name


@pytest.mark.parametrize("attack", ["ls", "supernode ls", "register", "run", "stop"])
def test_the_public_address_serves_no_control_api(deployment, attack):
    answer = deployment["attacks"][attack]
    assert answer["success"] is False, answer
    assert "404" in answer["error-message"], answer  # nginx: no such route here


def test_the_superlink_listens_on_loopback_only(deployment):
    listening = deployment["listening"]
    assert listening.get("flower-superlink"), listening  # found it
    for cmd, addresses in listening.items():
        assert all(a.startswith("127.0.0.1:") for a in addresses), (cmd, addresses)


def test_no_spelling_of_a_path_reaches_past_the_fleet_routes(deployment):
    for request, (status, body) in deployment["attacks"]["raw"].items():
        # nginx's own refusal (403/404 page), never an answer of the SuperLink (JSON)
        assert status in (403, 404), (request, status, body)
        assert "nginx" in body and "detail" not in body, (request, body)


def test_a_stranger_could_not_register_and_cannot_join(deployment):
    assert {s["site"] for s in deployment["status_before"]["sites"]} == set(SITES)
    assert not (deployment["tmp"] / "stranger-run").exists()
    test_unlisted_site_is_refused(deployment)  # the rogue's key was never listed


def test_the_coordinator_runs_status_and_stops_over_loopback(deployment):
    status = deployment["status_before"]
    assert status["api-address"].startswith("127.0.0.1:")
    assert status["fleet-address"] != status["api-address"]
    assert {s["site"]: s["max-examples"] for s in status["sites"]}["site-2"] == 10
    after = deployment["status_after"]
    assert {s["site"]: s["status"] for s in after["sites"]} == dict.fromkeys(SITES, "online")
    assert all(s["online-at"] for s in after["sites"])
    led = json.loads((deployment["tmp"] / "run" / "ledger.json").read_text())
    (row,) = [r for r in after["ledgers"] if r["run-dir"] == str(deployment["tmp"] / "run")]
    assert row["rounds"] == 2 and row["global-epsilon"] == led["rounds"][-1]["global_epsilon"]
    assert deployment["stop"].returncode == 0, deployment["stop"].stderr
    assert deployment["stopped_run"]["status"] == "finished:stopped"


@pytest.mark.parametrize("key, value", [("run-dir", "/etc/x"), ("base-model", "../../x")])
def test_a_run_config_naming_paths_outside_is_refused(deployment, key, value):
    cli_run = deployment["bad"][f"cli {key}"]
    assert cli_run.returncode != 0
    assert f"run config: {key}" in cli_run.stderr, cli_run.stderr
    raw = deployment["bad"][f"raw {key}"]
    assert raw["success"] is True  # the Control API took it (over loopback) ...
    status = {str(r["run-id"]): r["status"] for r in deployment["bad"]["runs"]}
    assert status[str(raw["run-id"])] == "finished:failed"  # ... the ServerApp refused it
    assert f"ConfigError: run config: {key}" in deployment["bad"][f"log {key}"]
    assert not Path("/etc/x").exists()
    assert not (deployment["tmp"] / "coord" / "x").exists()


def test_a_weight_above_the_enrolled_bound_is_rejected_and_logged(deployment):
    run = deployment["tmp"] / "run"
    led = json.loads((run / "ledger.json").read_text())
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["round"] for e in logged] == [1, 2]
    for rnd, line in zip(led["rounds"], logged):
        assert set(rnd["rejected"]) == set(line["rejected"]) == {"site-2"}
        assert "num-examples 48 exceeds the 10 examples" in rnd["rejected"]["site-2"]
        assert line["accepted"] == 2  # the average is the other two's
        assert "site-2" in rnd["sites"]  # its spend is on record all the same
    shown = [ln for ln in deployment["run"].stdout.splitlines() if ln.startswith("round ")]
    assert len(shown) == 2  # dpfl-server run printed each round as it was recorded
    assert all("rejected site-2 (num-examples 48 exceeds the 10" in ln for ln in shown), shown
    server_log = (run / "server.log").read_text()  # the ServerApp's own log, in the run dir
    assert "update from site-2 rejected: num-examples 48 exceeds the 10" in server_log
