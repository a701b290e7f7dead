"""Benchmark (not a test): one DP-SGD LoRA step vs the same non-private LoRA step.

Same model, batch and K; K = 1, 4, 8. Prints one JSON line per K and the DP/plain ratio
(product goal: <= 1.3). Usage::

    python bench/bench_dp_step.py --preset tiny --batch 16 --lora attention --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from dpfl.shared.diffusion import expand_draws, row_losses
from dpfl.shared.dp import physical_step, resolve_device
from dpfl.shared.lora import LoraSpec, wrap_unet
from dpfl.shared.models import build_ldm


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


def bench(preset: str, lora: str, batch: int, k: int, repeats: int, dev: torch.device) -> dict:
    ldm = build_ldm(preset)
    ldm.unet.to(dev)
    z = torch.randn(batch, *ldm.latent_shape, device=dev)
    y = torch.randint(0, ldm.spec.num_classes, (batch,), device=dev)
    gen = torch.Generator().manual_seed(0)

    plain = wrap_unet(ldm.unet, LoraSpec(lora)).to(dev).train()
    popt = torch.optim.Adam([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

    def plain_step() -> None:
        noisy, t, yy, target = expand_draws(z, y, ldm.scheduler, k, generator=gen)
        loss = row_losses(plain, noisy, t, yy, target).mean()
        popt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()

    model = wrap_unet(ldm.unet, LoraSpec(lora)).to(dev).train()
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
    return {"preset": preset, "lora": lora, "batch": batch, "k": k, "device": str(dev),
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
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dev = resolve_device(args.device)
    for k in (int(s) for s in args.ks.split(",")):
        r = bench(args.preset, args.lora, args.batch, k, args.repeats, dev)
        print(json.dumps(r))
        print(f"K={k}: DP step {r['dp_s'] * 1e3:.1f} ms vs plain {r['plain_s'] * 1e3:.1f} ms "
              f"-> ratio {r['ratio']:.2f} (goal <= 1.3)")


if __name__ == "__main__":
    main()
