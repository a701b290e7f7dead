"""The load benchmarks still run (tiny sizes; their numbers are in docs/load.md)."""

import importlib.util
import os
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_aggregate_runs_every_stage(tmp_path):
    bench = _load("bench_aggregate")
    doc = bench.main(["--model", "tiny", "--ms", "1,3", "--history", "2", "--repeats", "1",
                      "--distinct", "2", "--tmp", str(tmp_path), "--round-s", "100"])
    assert [r["m"] for r in doc["rows"]] == [1, 3]
    for row in doc["rows"]:
        assert all(row[f"{s}_s"] > 0 for s in bench.STAGES)
        assert row["total_s"] >= max(row[f"{s}_s"] for s in bench.STAGES)
    # a reply carries the adapter's float32 bytes plus Flower's framing and the scalars
    assert doc["adapter_bytes"] == 4 * doc["adapter_values"] < doc["reply_wire_bytes"]
    assert set(doc["fit_cpu"]["m_at_5pct"]) == {"100.0"}


def test_tree_sampler_sees_this_process(tmp_path):
    bench = _load("bench_many_sites")
    sampler = bench.TreeSampler(os.getpid(), 0.5, tmp_path / "metrics.jsonl")
    (tmp_path / "metrics.jsonl").write_text("{}\n{}\n")
    sampler.sample()
    row = sampler.series[0]
    assert row["driver_pss_mb"] > 0 and row["rss_mb"] >= row["driver_pss_mb"] * 0.5
    assert sampler.procs[os.getpid()]["role"] == "driver"
    assert len(sampler.round_ends) == 2  # one per metrics.jsonl line
