"""Benchmark (not a test): the coordinator's own work per round as a function of the
number of replies M, and the M at which it reaches 5 % of a round.

Per round the coordinator (``dpfl.server.rounds.run_federation``, record-level DP, no
SecAgg) does, in order, for M sampled sites:

- ``configure``: sample M nodes (:class:`AdapterFedAvg`) and serialise M instructions, each
  carrying the global adapter (Flower's protobuf, as its gRPC grid does before sending);
- ``receive``: parse M replies from their wire bytes into Flower ``Message`` objects;
- ``validate``: :meth:`AdapterFedAvg.split_replies` (keys, shapes, dtypes, finiteness,
  distance from the global adapter, FedAvg weight) and the site reports;
- ``ledger``: :meth:`PrivacyLedger.record_round`, an atomic, fsynced rewrite of the whole
  ledger, which already holds ``--history`` earlier rounds of M sites;
- ``aggregate``: :meth:`AdapterFedAvg.aggregate_valid` (Flower's weighted FedAvg);
- ``checkpoint``: :meth:`GlobalCheckpoint.save` (atomic, fsynced safetensors).

The adapter is the fmnist experiments' (``--model models/fmnist-base``, ``--preset
attention+proj --rank 8``, class embedding trained) or the tiny preset's (``--model tiny``).
Replies differ from the global adapter by small noise. A straight line t(M) = a + b M is
fitted to the medians; the M at which it reaches 5 % of a round of ``--round-s`` seconds
(a site's DP-LoRA training; the sites train in parallel) is reported. The optional sample
grid (``--grid-steps``, the coordinator's ``sample-every``) costs the same for every M and is
reported apart. Prints and writes one JSON document::

    OMP_NUM_THREADS=1 nice -n 5 python bench/bench_aggregate.py --model models/fmnist-base \
        --ms 1,2,5,10,20,50,100,200,500 --history 50 --round-s 60,120,184 \
        --out runs/load/aggregate.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from dpfl.server.rounds import GlobalCheckpoint
from dpfl.server.strategy import AdapterFedAvg, site_report
from dpfl.shared.federation.config import RoundPlan
from dpfl.shared.federation.ledger import PrivacyLedger
from dpfl.shared.federation.protocol import ARRAYS, METRICS, SITE, SITE_ID, SiteReport
from dpfl.shared.ldm.lora import adapter_state, spec_for_plan, wrap_unet
from dpfl.shared.ldm.models import build_ldm, load_ldm

STAGES = ("configure", "receive", "validate", "ledger", "aggregate", "checkpoint")


def task_identity() -> None:
    """Flower stamps messages with the current run; outside a run, pretend to be run 1."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_task_id", "_node_id"):
        setattr(TaskIdentity, name, 1)


def build_adapter(model: str, preset: str, rank: int) -> tuple[dict[str, np.ndarray], RoundPlan]:
    ldm = build_ldm("tiny", seed=0) if model == "tiny" else load_ldm(model)
    plan = RoundPlan(lora_preset=preset, lora_rank=rank, lora_alpha=2.0 * rank)
    torch.manual_seed(0)
    peft = wrap_unet(ldm.unet, spec_for_plan(plan))
    return {k: v.numpy() for k, v in adapter_state(peft).items()}, plan


class FakeGrid:
    """The part of a Flower grid that sampling uses."""

    def __init__(self, nodes: int):
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


def site_report_of(i: int) -> SiteReport:
    """What site i reports after a round (an fmnist-sized silo, three rounds in)."""
    return SiteReport(site=f"site-{i}", epsilon=6.7, delta=1e-5, budget=10.0, sigma=0.8167,
                      sample_rate=0.111, steps=18 * 3, examples=1500 + i)


def reply_bytes(adapter: dict[str, np.ndarray], i: int, rng: np.random.Generator) -> bytes:
    """Wire bytes of site i's reply: its DP-trained adapter and its privacy scalars."""
    update = {k: (v + rng.normal(0, 1e-3, v.shape)).astype(v.dtype) for k, v in adapter.items()}
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in update.items()}),
                          METRICS: MetricRecord(site_report_of(i).to_metrics()),
                          SITE: ConfigRecord({SITE_ID: f"site-{i}"})})
    msg = Message(content=content, dst_node_id=0, message_type="train")
    return message_to_proto(msg).SerializeToString()


class Stopwatch:
    """``with clock(name):`` adds wall seconds as ``name`` and CPU seconds of this process
    as ``cpu_name`` (CPU time is what a quiet machine would take; on a shared one the wall
    time also holds the waits for a core, and fsync's for the disk)."""

    def __init__(self, into: dict[str, float]):
        self.into = into

    @contextlib.contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.process_time()
        yield
        self.into[name] = time.perf_counter() - w
        self.into[f"cpu_{name}"] = time.process_time() - c


def one_round(m: int, adapter: dict[str, np.ndarray], plan: RoundPlan, wire: list[bytes],
              ledger: PrivacyLedger, ckpt: GlobalCheckpoint, rnd: int) -> dict[str, float]:
    """Seconds per stage of one coordinator round with M replies."""
    t: dict[str, float] = {}
    clock = Stopwatch(t)
    strategy = AdapterFedAvg(excluded=lambda n: False, sample_seed=rnd, fraction_train=1.0,
                             fraction_evaluate=0.0, min_available_nodes=m)
    with clock("configure"):
        msgs = list(strategy.configure_train(
            rnd, ArrayRecord({k: Array(v) for k, v in adapter.items()}),
            ConfigRecord(plan.to_record()), FakeGrid(m)))
        out_bytes = sum(len(message_to_proto(x).SerializeToString()) for x in msgs)
    with clock("receive"):
        replies = [message_from_proto(ProtoMessage.FromString(wire[i % len(wire)]))
                   for i in range(m)]
    with clock("validate"):
        reports = [r for r in map(site_report, replies) if r is not None]
        ok, rejected = strategy.split_replies(rnd, replies, adapter,
                                              reported={r.site for r in reports})
    if rejected or len(ok) != m:
        raise RuntimeError(f"benchmark replies were rejected: {rejected}")
    with clock("ledger"):
        ledger.record_round(rnd, reports, rejected)
    with clock("aggregate"):
        agg, _ = strategy.aggregate_valid(rnd, ok)
        new = {k: v.numpy() for k, v in agg.items()}
    with clock("checkpoint"):
        ckpt.save(rnd, new, "sha256:bench")
    t["cpu_total"] = sum(t[f"cpu_{s}"] for s in STAGES)
    t["total"] = sum(t[s] for s in STAGES)
    t["instruction_bytes"] = out_bytes / max(len(msgs), 1)
    return t


def fill_ledger(ledger: PrivacyLedger, rounds: int, m: int) -> None:
    """``rounds`` earlier rounds of M sites (the ledger is rewritten whole every round)."""
    for r in range(1, rounds + 1):
        ledger.rounds.append({"round": r, "rerun": False, "rejected": {},
                              "sites": {f"site-{i}": asdict(site_report_of(i))
                                        for i in range(m)},
                              "global_epsilon": 6.7, "global_delta": 1e-5})


def bench_m(m: int, adapter, plan, wire, history: int, repeats: int, folder: Path) -> dict:
    runs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            ledger = PrivacyLedger(Path(tmp) / "ledger.json")
            fill_ledger(ledger, history, m)
            ckpt = GlobalCheckpoint(Path(tmp) / "global")
            ckpt.folder.mkdir()
            runs.append(one_round(m, adapter, plan, wire, ledger, ckpt, history + 1))
            ledger_bytes = ledger.path.stat().st_size
    keys = (*STAGES, "total", *(f"cpu_{s}" for s in STAGES), "cpu_total")
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    return {"m": m, **{f"{k}_s": round(v, 5) for k, v in med.items()},
            "ledger_bytes": ledger_bytes, "instruction_bytes": int(runs[0]["instruction_bytes"])}


def fit(rows: list[dict], round_s: list[float], key: str = "total_s") -> dict:
    """t(M) = a + b M by least squares; M where t reaches 5 % of each round length."""
    ms = np.array([r["m"] for r in rows], float)
    ts = np.array([r[key] for r in rows], float)
    b, a = np.polyfit(ms, ts, 1)
    return {"fixed_s": round(float(a), 4), "per_reply_s": round(float(b), 6),
            "m_at_5pct": {str(t): int(max((0.05 * t - a) / b, 0)) for t in round_s}}


def grid_seconds(model: str, steps: int) -> tuple[float, float]:
    """One global sample grid (6 per class, as the coordinator writes every sample-every)."""
    from dpfl.shared.ldm.sampling import class_grid

    ldm = build_ldm("tiny", seed=0) if model == "tiny" else load_ldm(model)
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        class_grid(ldm, Path(tmp) / "grid.png", per_class=6, steps=steps, seed=0, title="bench")
        return time.perf_counter() - t0, time.process_time() - c0


def run(args: argparse.Namespace) -> dict:
    task_identity()
    adapter, plan = build_adapter(args.model, args.preset, args.rank)
    rng = np.random.default_rng(0)
    wire = [reply_bytes(adapter, i, rng) for i in range(min(args.distinct, max(args.ms)))]
    folder = Path(args.tmp)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in args.ms:
        rows.append(bench_m(m, adapter, plan, wire, args.history, args.repeats, folder))
        print(json.dumps(rows[-1]), flush=True)
    values = sum(v.size for v in adapter.values())
    doc = {"model": args.model, "preset": args.preset, "rank": args.rank,
           "adapter_tensors": len(adapter), "adapter_values": int(values),
           "adapter_bytes": int(sum(v.nbytes for v in adapter.values())),
           "reply_wire_bytes": len(wire[0]), "history_rounds": args.history,
           "repeats": args.repeats, "threads": torch.get_num_threads(),
           "load_average": os.getloadavg(), "rows": rows, "fit_wall": fit(rows, args.round_s),
           "fit_cpu": fit(rows, args.round_s, "cpu_total_s")}
    if args.grid_steps:
        wall, cpu = grid_seconds(args.model, args.grid_steps)
        doc["sample_grid_s"], doc["sample_grid_cpu_s"] = round(wall, 2), round(cpu, 2)
        doc["grid_steps"] = args.grid_steps
    return doc


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="models/fmnist-base", help="model directory or 'tiny'")
    ap.add_argument("--preset", default="attention+proj")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--ms", type=_ints, default=_ints("1,2,5,10,20,50,100,200"))
    ap.add_argument("--history", type=int, default=50, help="earlier rounds in the ledger")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--distinct", type=int, default=16, help="distinct reply payloads")
    ap.add_argument("--round-s", type=_floats, default=_floats("60,120,184"))
    ap.add_argument("--grid-steps", type=int, default=0, help="also time a sample grid")
    ap.add_argument("--tmp", default="runs/load/aggregate-tmp",
                    help="where ledgers and checkpoints are written (a real disk: fsync)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    doc = run(args)
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
    return doc


if __name__ == "__main__":
    main()
