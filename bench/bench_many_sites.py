"""Benchmark (not a test): memory of a simulation with many virtual sites.

Runs :func:`dpfl.server.simulate.run_sites` (Flower's simulation engine on Ray) with N
virtual sites holding small IID silos of ``fmnist:private`` (``--per-site`` images each), a
fraction ``f`` of them sampled per round, and ``c`` CPUs per site, so that Ray runs
``floor(CPUs / c)`` ClientApp actors at once (the concurrency). The tiny model preset keeps
every round short.

Each configuration runs in a fresh process (the driver: ServerApp, simulation engine and
``ray.init``, which starts Ray's GCS, raylet, dashboard agents and the worker processes as
its descendants). A thread here samples that whole process tree every ``--interval``
seconds: the sum of RSS (a shared page counts in every process that maps it: an upper
bound) and of PSS (shared pages split between their processes: what the tree really
costs), by role (driver, Ray system processes, ClientApp actors, idle workers), and each
worker's peak. The silos are written in a separate, unmeasured process first. Prints and
writes one JSON document::

    OMP_NUM_THREADS=1 nice -n 5 python bench/bench_many_sites.py \
        --config 10:0.8:1 --config 100:0.08:1 --config 1000:0.008:1 --rounds 2 \
        --out runs/load/many_sites_n.json --plot docs/images/load-rss-by-n.png

``--config N:f:c`` (repeatable): N sites, fraction f sampled per round, c CPUs per site.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROLE_ORDER = ("driver", "ray-system", "actor", "idle-worker")


def _pss_mb(pid: int) -> float:
    """Proportional set size of one process (0 when it is gone or unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _role(proc: psutil.Process, root: int) -> str:
    if proc.pid == root:
        return "driver"
    try:
        title = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "ray-system"
    if "ClientAppActor" in title:
        return "actor"
    if title.startswith("ray::"):
        return "idle-worker"
    return "ray-system"


class TreeSampler(threading.Thread):
    """Samples RSS and PSS of a process and all its descendants until stopped."""

    def __init__(self, root: int, interval: float, metrics_file: Path):
        super().__init__(daemon=True)
        self.root, self.interval, self.metrics_file = root, interval, metrics_file
        self.stop_event = threading.Event()
        self.series: list[dict] = []
        self.procs: dict[int, dict] = {}  # pid -> role, name, peak rss/pss
        self.round_ends: list[float] = []
        self.t0 = time.monotonic()

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.root)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        by_role = {r: [0.0, 0.0] for r in ROLE_ORDER}
        for proc in self._tree():
            try:
                rss = proc.memory_info().rss / 2**20
            except psutil.Error:
                continue
            pss = _pss_mb(proc.pid)
            try:
                info = self.procs.setdefault(proc.pid, {
                    "role": "ray-system", "name": proc.name(), "created": proc.create_time(),
                    "peak_rss_mb": 0.0, "peak_pss_mb": 0.0})
            except psutil.Error:
                continue
            role = _role(proc, self.root)
            if info["role"] != "actor":  # a worker that ever hosted an actor stays one
                info["role"] = role
            info["peak_rss_mb"] = max(info["peak_rss_mb"], rss)
            info["peak_pss_mb"] = max(info["peak_pss_mb"], pss)
            by_role[info["role"]][0] += rss
            by_role[info["role"]][1] += pss
        self.series.append({"t": round(t, 2),
                            "rss_mb": round(sum(v[0] for v in by_role.values()), 1),
                            "pss_mb": round(sum(v[1] for v in by_role.values()), 1),
                            **{f"{r}_pss_mb": round(v[1], 1) for r, v in by_role.items()}})
        try:  # one metrics.jsonl line per finished round
            rounds = len(self.metrics_file.read_text().splitlines())
        except OSError:
            rounds = 0
        while len(self.round_ends) < rounds:
            self.round_ends.append(round(t, 2))

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)


def _du_mb(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def disk_usage(run_dir: Path) -> dict:
    sites = sorted((run_dir / "sites").glob("site-*"))
    states = [s / "state" for s in sites if (s / "state").is_dir()]
    state_files = [f for s in states for f in s.rglob("*")]
    return {"silos_mb": round(_du_mb([s / "silo.npz" for s in sites]), 2),
            "site_state_mb": round(_du_mb(state_files), 2),
            "sites_with_state": len(states),
            "site_state_mb_each": round(_du_mb(state_files) / max(len(states), 1), 3),
            "coordinator_mb": round(_du_mb([f for f in run_dir.rglob("*")
                                            if "sites" not in f.relative_to(run_dir).parts]),
                                    2)}


def _fed_config(args: argparse.Namespace, work: Path, n: int, f: float):
    from dpfl.shared.federation.config import FedConfig

    return FedConfig(base_model=str(work / "base"), run_dir=str(work / "run"),
                     num_rounds=args.rounds, fraction_train=f, min_available_nodes=n,
                     batch_size=16, noise_multiplicity=2, target_epsilon=8.0, lr=5e-3,
                     sample_every=0, sample_steps=2, seed=0)


def prepare(args: argparse.Namespace) -> None:
    """Child process 1 (not measured): the tiny base model and N silos on disk."""
    from dpfl.server.simulate import SimulationSetup, prepare_sites
    from dpfl.shared.ldm.models import build_ldm, save_ldm

    work, (n, f, _) = Path(args.work), args.job
    save_ldm(build_ldm("tiny", seed=0), work / "base")
    setup = SimulationSetup(data=args.data, num_sites=n, scheme="iid",
                            max_examples=n * args.per_site, epsilon_budget=8.0, delta=1e-4)
    sites = prepare_sites(setup, _fed_config(args, work, n, f))
    sites = [dataclasses.replace(s, device="cpu") for s in sites]
    (work / "sites.json").write_text(json.dumps([dataclasses.asdict(s) for s in sites]))


def federate(args: argparse.Namespace) -> None:
    """Child process 2 (measured): the federation itself."""
    import torch

    from dpfl.server.simulate import run_sites
    from dpfl.shared.federation.config import SiteConfig

    torch.set_num_threads(1)
    work, (n, f, c) = Path(args.work), args.job
    sites = [SiteConfig(**s) for s in json.loads((work / "sites.json").read_text())]
    run_sites(_fed_config(args, work, n, f), sites, cpus_per_site=c)


def _child(args: argparse.Namespace, phase: str, work: Path, job: str, log) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--phase", phase, "--work", str(work), "--job", job,
           "--rounds", str(args.rounds), "--per-site", str(args.per_site), "--data", args.data]
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def measure(args: argparse.Namespace, spec: str, work: Path) -> dict:
    n, f, c = _parse(spec)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    with open(work / "prepare.log", "w") as log:
        if _child(args, "prepare", work, spec, log).wait() != 0:
            raise RuntimeError(f"preparing {spec} failed; see {work / 'prepare.log'}")
    with open(work / "federate.log", "w") as log:
        t0 = time.monotonic()
        proc = _child(args, "federate", work, spec, log)
        sampler = TreeSampler(proc.pid, args.interval, work / "run" / "metrics.jsonl")
        sampler.start()
        rc = proc.wait()
        wall = time.monotonic() - t0
        sampler.stop_event.set()
        sampler.join()
    if rc != 0:
        raise RuntimeError(f"federation {spec} failed (rc {rc}); see {work / 'federate.log'}")
    left = leftovers(sampler.procs, args.linger_wait)
    return summarise(n, f, c, wall, sampler, disk_usage(work / "run"), left)


def _alive(pid: int, info: dict) -> bool:
    try:
        return psutil.Process(pid).create_time() == info["created"]
    except psutil.Error:
        return False


def leftovers(procs: dict[int, dict], wait_s: float) -> dict:
    """Processes of the measured tree still running after the driver exited: waits up to
    ``wait_s`` for them, then terminates those that remain (they are this benchmark's own
    children's children, orphaned; the next configuration must not share the machine with
    them). Returns what was left, by name, and the seconds waited."""
    t0 = time.monotonic()
    left = {p: i for p, i in procs.items() if _alive(p, i)}
    while left and time.monotonic() - t0 < wait_s:
        time.sleep(1)
        left = {p: i for p, i in left.items() if _alive(p, i)}
    names = sorted(f"{i['name']} ({i['role']}, {i['peak_rss_mb']:.0f} MB)" for i in left.values())
    for pid in left:
        try:
            psutil.Process(pid).terminate()
        except psutil.Error:
            pass
    return {"after_s": round(time.monotonic() - t0, 1), "terminated": names}


def summarise(n: int, f: float, c: float, wall: float, s: TreeSampler, disk: dict,
              left: dict) -> dict:
    cpus = psutil.cpu_count()
    workers = [p for p in s.procs.values() if p["role"] == "actor"]
    peak = max(s.series, key=lambda r: r["pss_mb"])
    ends = s.round_ends
    return {
        "num_sites": n, "fraction_train": f, "cpus_per_site": c,
        "concurrency": int(cpus / c), "sites_per_round": max(int(n * f), 1),
        "wall_s": round(wall, 1), "round_end_s": ends,
        "round_s": [round(b - a, 1) for a, b in zip(ends, ends[1:])],
        "peak_rss_total_mb": round(max(r["rss_mb"] for r in s.series), 1),
        "peak_pss_total_mb": peak["pss_mb"],
        "pss_by_role_at_peak_mb": {r: peak[f"{r}_pss_mb"] for r in ROLE_ORDER},
        "peak_by_role_mb": {r: round(max(x[f"{r}_pss_mb"] for x in s.series), 1)
                            for r in ROLE_ORDER},
        "actor_processes": len(workers),
        "actor_peak_rss_mb": sorted(round(p["peak_rss_mb"], 1) for p in workers),
        "actor_peak_pss_mb": sorted(round(p["peak_pss_mb"], 1) for p in workers),
        "driver_peak_rss_mb": round(max(p["peak_rss_mb"] for p in s.procs.values()
                                        if p["role"] == "driver"), 1),
        "processes_seen": len(s.procs), "left_running_after_exit": left,
        "disk": disk, "series": s.series}


def _parse(spec: str) -> tuple[int, float, float]:
    try:
        n, f, c = spec.split(":")
        return int(n), float(f), float(c)
    except ValueError:
        raise SystemExit(f"--config must be N:f:c (e.g. 100:0.1:1), got {spec!r}") from None


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for r in results:
        t = [x["t"] for x in r["series"]]
        line, = ax.plot(t, [x["pss_mb"] for x in r["series"]],
                        label=f"N={r['num_sites']}, f={r['fraction_train']}, "
                              f"concurrency {r['concurrency']}")
        for e in r["round_end_s"]:
            ax.axvline(e, color=line.get_color(), lw=0.6, ls=":")
    ax.set_xlabel("seconds since the driver started (dotted: end of a round)")
    ax.set_ylabel("PSS of the process tree (MiB)")
    ax.set_title("Simulation memory: driver + Ray + ClientApp actors (tiny model)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", default=None, help="N:f:c (repeatable)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--per-site", type=int, default=40, help="images per site")
    ap.add_argument("--data", default="fmnist:private")
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("--linger-wait", type=float, default=30.0,
                    help="seconds to wait for orphaned Ray workers before terminating them")
    ap.add_argument("--work", default="runs/load/many_sites")
    ap.add_argument("--out", default="runs/load/many_sites.json")
    ap.add_argument("--plot", default=None, help="PNG of PSS over time")
    ap.add_argument("--phase", default=None, choices=["prepare", "federate"],
                    help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        args.job = _parse(args.job)
        (prepare if args.phase == "prepare" else federate)(args)
        return
    results = []
    for spec in args.config or ["10:1.0:1", "100:0.1:1"]:
        res = measure(args, spec, Path(args.work) / spec.replace(":", "_"))
        print(json.dumps({k: v for k, v in res.items() if k != "series"}), flush=True)
        results.append(res)
    doc = {"machine": {"cpus": psutil.cpu_count(), "ram_gb": round(
        psutil.virtual_memory().total / 2**30, 1), "load_average": os.getloadavg()},
        "rounds": args.rounds, "per_site": args.per_site, "data": args.data,
        "interval_s": args.interval, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
