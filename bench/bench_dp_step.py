"""Benchmark (not a test): one DP-SGD step vs the same non-private step.

``--mode lora`` (default): LoRA adapters only (DP-LoRA); ``--mode full``: every UNet
parameter (the DPDM-style from-scratch baseline, :mod:`dpfl.shared.privacy.full`). Same model,
batch and K; K = 1, 4, 8. Prints one JSON line per K and the DP/plain ratio (product goal
for DP-LoRA: <= 1.3). Usage::

    python bench/bench_dp_step.py --preset tiny --batch 16 --lora attention --repeats 5
    python bench/bench_dp_step.py --model models/fmnist-base --mode full --ks 4
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


def _time(fn, repeats: int, dev: torch.device) -> float:
    fn()  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(dev)
    return (time.perf_counter() - t0) / repeats


def bench(preset: str, lora: str, batch: int, k: int, repeats: int, dev: torch.device,
          mode: str = "lora", model_dir: str | None = None) -> dict:
    ldm = load_ldm(model_dir) if model_dir else build_ldm(preset)
    ldm.unet.to(dev)
    z = torch.randn(batch, *ldm.latent_shape, device=dev)
    y = torch.randint(0, ldm.spec.num_classes, (batch,), device=dev)
    gen = torch.Generator().manual_seed(0)

    def trainee() -> torch.nn.Module:
        m = full_unet(ldm.unet) if mode == "full" else wrap_unet(ldm.unet, LoraSpec(lora))
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

    t_plain = _time(plain_step, repeats, dev)
    t_dp = _time(dp_step, repeats, dev)
    return {"model": model_dir or preset, "mode": mode, "lora": lora if mode == "lora" else None,
            "trainable": trainable_count(model), "batch": batch, "k": k, "device": str(dev),
            "plain_s": round(t_plain, 5), "dp_s": round(t_dp, 5),
            "ratio": round(t_dp / t_plain, 3), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--lora", default="attention")
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
        r = bench(args.preset, args.lora, args.batch, k, args.repeats, dev, args.mode, args.model)
        print(json.dumps(r))
        print(f"{args.mode} K={k}: DP step {r['dp_s'] * 1e3:.1f} ms vs plain "
              f"{r['plain_s'] * 1e3:.1f} ms -> ratio {r['ratio']:.2f}"
              + (" (goal <= 1.3)" if args.mode == "lora" else ""))


if __name__ == "__main__":
    main()
