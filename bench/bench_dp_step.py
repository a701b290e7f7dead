"""Benchmark (not a test): one DP-SGD step vs the same non-private step.

``--mode lora`` (default): LoRA adapters only (DP-LoRA); ``--mode full``: every UNet
parameter (the DPDM-style from-scratch baseline, :mod:`dpfl.shared.privacy.full`). Same model,
batch and K; K = 1, 4, 8. Prints one JSON line per K and the DP/plain ratio (issue #15's
goal for DP-LoRA: <= 1.15 at K = 1), by wall time and by CPU time (user + system, all
threads): on a shared machine the CPU ratio is the steadier one. Plain and DP steps
alternate ``--repeats`` times after a warm-up, and each keeps its fastest step. Usage::

    python bench/bench_dp_step.py --preset tiny --batch 16 --lora attention --repeats 5
    python bench/bench_dp_step.py --model models/fmnist-base --mode full --ks 4
    python bench/bench_dp_step.py --model models/fmnist-base --lora attention+proj --rank 8 \
        --batch 32 --ks 1,4 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from dpfl.shared.ldm.diffusion import expand_draws, row_losses
from dpfl.shared.ldm.lora import LoraSpec, trainable_count, wrap_unet
from dpfl.shared.ldm.models import build_ldm, load_ldm, resolve_device
from dpfl.shared.privacy.full import full_unet
from dpfl.shared.privacy.multiplicity import physical_step


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_pair(a, b, repeats: int, dev: torch.device) -> tuple[tuple[float, float], ...]:
    """Fastest (wall, CPU) seconds of ``a`` and of ``b``, run alternately ``repeats`` times
    after one warm-up each (alternating spreads a shared machine's slow spells over both)."""
    best = [[float("inf")] * 2, [float("inf")] * 2]
    for fn in (a, b):
        fn()
    for _ in range(repeats):
        for i, fn in enumerate((a, b)):
            _sync(dev)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            _sync(dev)
            best[i][0] = min(best[i][0], time.perf_counter() - t0)
            best[i][1] = min(best[i][1], time.process_time() - c0)
    return tuple(tuple(x) for x in best)  # type: ignore[return-value]


def bench(preset: str, lora: str, batch: int, k: int, repeats: int, dev: torch.device,
          mode: str = "lora", model_dir: str | None = None, rank: int = 4) -> dict:
    ldm = load_ldm(model_dir) if model_dir else build_ldm(preset)
    ldm.unet.to(dev)
    z = torch.randn(batch, *ldm.latent_shape, device=dev)
    y = torch.randint(0, ldm.spec.num_classes, (batch,), device=dev)
    gen = torch.Generator().manual_seed(0)

    def trainee() -> torch.nn.Module:
        m = full_unet(ldm.unet) if mode == "full" else wrap_unet(ldm.unet,
                                                                  LoraSpec(lora, rank=rank))
        return m.to(dev).train()

    plain = trainee()
    popt = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

    def plain_step() -> None:
        noisy, t, yy, target = expand_draws(z, y, ldm.scheduler, k, generator=gen)
        loss = row_losses(plain, noisy, t, yy, target).mean()
        popt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()

    model = trainee()
    gsm = GradSampleModule(model, loss_reduction="mean")
    params = [p for p in gsm.parameters() if p.requires_grad]
    dopt = DPOptimizer(torch.optim.Adam(params, lr=1e-4), noise_multiplier=1.0,
                       max_grad_norm=1.0, expected_batch_size=batch)

    def dp_step() -> None:
        physical_step(gsm, ldm.scheduler, z, y, k, gen, ldm.spec.null_class, 0.0)
        dopt.step()
        dopt.zero_grad(set_to_none=True)

    (t_plain, c_plain), (t_dp, c_dp) = _time_pair(plain_step, dp_step, repeats, dev)
    return {"model": model_dir or preset, "mode": mode, "lora": lora if mode == "lora" else None,
            "rank": rank if mode == "lora" else None,
            "trainable": trainable_count(model), "batch": batch, "k": k, "device": str(dev),
            "plain_s": round(t_plain, 5), "dp_s": round(t_dp, 5),
            "ratio": round(t_dp / t_plain, 3), "plain_cpu_s": round(c_plain, 5),
            "dp_cpu_s": round(c_dp, 5), "cpu_ratio": round(c_dp / c_plain, 3),
            "dp_examples_per_s": round(batch / t_dp, 2), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--lora", default="attention")
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ks", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--mode", choices=("lora", "full"), default="lora",
                    help="train LoRA adapters, or every UNet parameter")
    ap.add_argument("--model", default=None, help="model directory (instead of --preset)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dev = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    for k in (int(s) for s in args.ks.split(",")):
        r = bench(args.preset, args.lora, args.batch, k, args.repeats, dev, args.mode, args.model,
                  args.rank)
        print(json.dumps(r))
        print(f"{args.mode} K={k}: DP step {r['dp_s'] * 1e3:.1f} ms vs plain "
              f"{r['plain_s'] * 1e3:.1f} ms -> ratio {r['ratio']:.2f} (CPU time "
              f"{r['cpu_ratio']:.2f}); {r['dp_examples_per_s']:.1f} examples/s under DP"
              + (" (goal at K = 1: <= 1.15)" if args.mode == "lora" else ""))


if __name__ == "__main__":
    main()
