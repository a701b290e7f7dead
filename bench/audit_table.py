"""Benchmark (not a test): the table of docs/audit.md, claimed ε vs the audit's ε̂.

Rows: the correct mechanism at ε = 1 and 10 through ``dpfl-client audit``'s own code path
(:func:`dpfl.client.audit.run_audit`: white-box one-run ε̂, noise check, loss-threshold MIA),
then each injected bug at ε = 1 (white box only; the injections are reachable from code,
never from a command line). Usage::

    OMP_NUM_THREADS=1 python bench/audit_table.py --model /tmp/tiny-base \
        --data /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz --limit 512 \
        --batch-size 256 --epochs 8 --out runs/audit/table-tiny.json

(a tiny base model: ``python -c "from dpfl.shared.ldm.models import build_ldm, save_ldm;
save_ldm(build_ldm('tiny'), '/tmp/tiny-base')"``; the fmnist preset: ``--model
models/fmnist-base``). Prints and writes one JSON document.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dpfl.client.audit import AuditJob, run_audit, split_members
from dpfl.shared.data.encode import encode_silo, in_base_classes
from dpfl.shared.data.sources import load_source
from dpfl.shared.ldm.lora import LoraSpec
from dpfl.shared.ldm.models import load_ldm
from dpfl.shared.privacy.audit import INJECTIONS, AuditConfig, whitebox_audit
from dpfl.shared.privacy.dpsgd import DPConfig


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--preset", default="attention")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--canaries", type=int, default=1000)
    ap.add_argument("--bug-epsilon", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=0,
                    help="Further white-box-only runs of every row (spread of eps-hat).")
    ap.add_argument("--out", default="runs/audit/table.json")
    return ap.parse_args()


def main() -> None:
    a = _args()
    torch.set_num_threads(1)
    lora = LoraSpec(preset=a.preset, rank=a.rank)
    cfg = AuditConfig(canaries=a.canaries)

    def dp(eps: float) -> DPConfig:
        return DPConfig(target_epsilon=eps, batch_size=a.batch_size, max_physical_batch=64,
                        noise_multiplicity=a.k, epochs=a.epochs, device="cpu")

    rows = []
    for eps in (1.0, 10.0):
        job = AuditJob(data=a.data, model=a.model, limit=a.limit,
                       run_dir=str(Path(a.out).with_suffix("")) + f"-eps{eps:g}")
        t0 = time.time()
        rec = run_audit(job, lora, dp(eps), cfg, progress=False)
        rows.append({"mechanism": "correct", **_row(rec["whitebox"]),
                     "mia_tpr_at_1pct_fpr": rec["mia"]["tpr_at_fpr"]["0.01"],
                     "mia_auc": rec["mia"]["auc"], "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    ldm, z, y = _members(a)
    for bug in INJECTIONS:
        t0 = time.time()
        white, _ = whitebox_audit(ldm, z, y, lora, dp(a.bug_epsilon), cfg, _inject=bug)
        rows.append({"mechanism": bug, **_row(white), "seconds": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    repeats: dict[str, list] = {}
    for _ in range(a.repeats):  # white box only, on the same members: the spread of ε̂
        for label, eps, bug in [("correct", 1.0, None), ("correct", 10.0, None),
                                *[(b, a.bug_epsilon, b) for b in INJECTIONS]]:
            white, _ = whitebox_audit(ldm, z, y, lora, dp(eps), cfg, _inject=bug)
            repeats.setdefault(f"{label} at eps={eps:g}", []).append(
                [round(white["epsilon_lower_bound"], 3),
                 round(white["noise_check"]["epsilon_at_sigma_upper"], 3)])
        print(json.dumps(repeats), flush=True)
    doc = {"args": vars(a), "threads": torch.get_num_threads(), "rows": rows,
           "repeats [eps-hat, eps at measured noise]": repeats}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


def _members(a: argparse.Namespace):
    """(ldm, latents, labels) of the members ``run_audit`` trains on (seed 0)."""
    ldm = load_ldm(a.model)
    ds = in_base_classes(ldm, load_source(a.data, base_card=ldm.card))
    if a.limit and a.limit < len(ds):
        ds = ds.subset(np.sort(np.random.default_rng(0).permutation(len(ds))[:a.limit]))
    z, y = encode_silo(ldm, ds.subset(split_members(len(ds), 0)[0]))
    return ldm, z, y


def _row(w: dict) -> dict:
    return {"claimed_epsilon": round(w["claimed_epsilon"], 3),
            "epsilon_hat": round(w["epsilon_lower_bound"], 3),
            "epsilon_at_measured_noise": round(w["noise_check"]["epsilon_at_sigma_upper"], 3),
            "steps": w["steps"], "q": w["sample_rate"], "sigma": round(w["sigma"], 4),
            "examples": w["examples"]}


if __name__ == "__main__":
    main()
