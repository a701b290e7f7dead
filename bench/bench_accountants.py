"""Benchmark (not a test): how much noise the PRV accountant saves over RDP, and what it costs.

For the demo's sites (``scripts/demo.sh``: 4,500 private images, 3 Dirichlet(0.5) sites,
batch 128, 3 rounds of 1 epoch) and the ``fulldata`` experiment preset's (all 45,000 private
images, 3 Dirichlet(0.5) sites, batch 256, 4 rounds of 2 epochs), each site's silo size n
comes from the same split the simulation makes (``dpfl.server.simulate.prepare_sites``, seed
0); q and the planned steps follow the site's rule (``dpfl.client.site.Site.dp_config``).
For each target ε and δ it reports σ calibrated under RDP and under PRV
(``dpfl.shared.privacy.dpsgd.calibrate_sigma``), the ε each accountant reports for the
RDP-calibrated run (``dpfl.shared.privacy.accountant.epsilon_of``), and the seconds each
calibration took. Then it times one uncached PRV and RDP ε of a long, heterogeneous ledger
(``--runs`` runs of the fulldata plan, each at its own σ: what a site's ledger looks like
after many runs). Prints a Markdown table and writes JSON::

    OMP_NUM_THREADS=1 python bench/bench_accountants.py --out runs/bench/accountants.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from dpfl.shared.data.partition import partition
from dpfl.shared.data.sources import load_source, model_card
from dpfl.shared.privacy import accountant as acc_mod
from dpfl.shared.privacy.choices import delta_for_examples
from dpfl.shared.privacy.dpsgd import calibrate_sigma
from dpfl.shared.privacy.poisson import dp_steps, sample_rate

#: (name, private images (0: all), sites, batch, rounds, local epochs, deltas)
SETTINGS = [("demo", 4500, 3, 128, 3, 1, ("1e-5",)),
            ("fulldata", 0, 3, 256, 4, 2, ("1e-5", "auto-total"))]


def site_sizes(base_model: str, max_examples: int, num_sites: int, seed: int = 0) -> list[int]:
    """Silo sizes of the simulation's split (the same steps as ``prepare_sites``)."""
    data = load_source("fmnist:private", base_card=model_card(base_model))
    labels = data.labels
    rng = np.random.default_rng(seed)
    if max_examples and max_examples < len(labels):
        labels = labels[np.sort(rng.choice(len(labels), max_examples, replace=False))]
    parts = partition(labels, num_sites, "dirichlet", seed=seed, alpha=0.5)
    return [len(p) for p in parts]


def _timed(fn, *args) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def _clear_caches() -> None:
    acc_mod._epsilon.cache_clear()
    acc_mod._rdp_per_step.cache_clear()


def compare(n: int, batch: int, rounds: int, epochs: int, target: float, delta: float
            ) -> dict[str, Any]:
    """One site's σ under each accountant for the whole planned run, and the ε each
    accountant reports for the RDP-calibrated run."""
    b = min(batch, n)
    q, steps = sample_rate(n, b), rounds * dp_steps(n, b, epochs)
    row: dict[str, Any] = {"n": n, "q": q, "steps": steps, "target": target, "delta": delta}
    for kind in ("rdp", "prv"):
        _clear_caches()
        sigma, secs = _timed(calibrate_sigma, target, delta, q, steps, kind)
        row[f"sigma_{kind}"], row[f"calibrate_s_{kind}"] = sigma, secs
    history = [(row["sigma_rdp"], q, steps)]
    row["eps_rdp_of_rdp_run"] = acc_mod.epsilon_of(history, delta, "rdp")
    row["eps_prv_of_rdp_run"] = acc_mod.epsilon_of(history, delta, "prv")
    row["eps_prv_of_prv_run"] = acc_mod.epsilon_of([(row["sigma_prv"], q, steps)], delta, "prv")
    return row


def long_history(n: int, runs: int) -> dict[str, Any]:
    """Uncached ε of a ledger of ``runs`` fulldata plans, each at its own σ (about ε=1 each)."""
    b = 256
    q, steps = sample_rate(n, b), 4 * dp_steps(n, b, 2)
    history = [(2.5 + 0.05 * i, q, steps) for i in range(runs)]
    delta = delta_for_examples(n)
    out: dict[str, Any] = {"n": n, "entries": runs, "steps": runs * steps, "delta": delta}
    for kind in ("rdp", "prv"):
        _clear_caches()
        eps, secs = _timed(acc_mod.epsilon_of, history, delta, kind)
        _, cached = _timed(acc_mod.epsilon_of, history, delta, kind)
        out[f"eps_{kind}"], out[f"seconds_{kind}"], out[f"cached_s_{kind}"] = eps, secs, cached
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-model", default="models/fmnist-base")
    ap.add_argument("--targets", default="10,1", help="target epsilons, comma-separated")
    ap.add_argument("--runs", type=int, default=10, help="runs in the long ledger")
    ap.add_argument("--out", default="runs/bench/accountants.json")
    args = ap.parse_args()
    rows = []
    print("| setting | site n | q | steps | target ε | δ | σ RDP | σ PRV | σ PRV/RDP | "
          "PRV ε of the RDP-calibrated run | calibration s RDP / PRV |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, max_ex, sites, batch, rounds, epochs, deltas in SETTINGS:
        sizes = site_sizes(args.base_model, max_ex, sites)
        total = sum(sizes)
        for target in (float(t) for t in args.targets.split(",")):
            for spec in deltas:
                delta = delta_for_examples(total) if spec == "auto-total" else float(spec)
                for n in sizes:
                    r = compare(n, batch, rounds, epochs, target, delta)
                    r.update(setting=name, delta_rule=spec)
                    rows.append(r)
                    print(f"| {name} | {n} | {r['q']:.4f} | {r['steps']} | {target:g} | "
                          f"{delta:.2g} | {r['sigma_rdp']:.4f} | {r['sigma_prv']:.4f} | "
                          f"{r['sigma_prv'] / r['sigma_rdp']:.3f} | "
                          f"{r['eps_prv_of_rdp_run']:.3f} (RDP {r['eps_rdp_of_rdp_run']:.3f}) | "
                          f"{r['calibrate_s_rdp']:.1f} / {r['calibrate_s_prv']:.1f} |",
                          flush=True)
    longest = long_history(15000, args.runs)
    print(f"\nlong ledger: {longest['entries']} entries, {longest['steps']} steps, n=15000: "
          f"PRV eps {longest['eps_prv']:.3f} in {longest['seconds_prv']:.1f} s "
          f"(memoised {longest['cached_s_prv'] * 1e3:.2f} ms), RDP eps {longest['eps_rdp']:.3f} "
          f"in {longest['seconds_rdp']:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "long_history": longest}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
