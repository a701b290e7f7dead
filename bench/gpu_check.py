"""GPU readiness check (issue #15): is DP-LoRA right, and how fast, on this machine's GPU?

Three checks, one JSON summary (``gpu-check.json`` in ``--out``, whose path is printed):

1. **Per-sample gradients vs autograd** on the device, for every LoRA preset
   (:data:`dpfl.shared.ldm.lora.PRESETS`) at K = 1 and K > 1 draws per example (DPDM's noise
   multiplicity, :mod:`dpfl.shared.privacy.multiplicity`): Opacus' per-example gradient,
   reduced over its K rows, must equal the gradient autograd computes for that example alone
   (the comparison ``tests/test_dp.py`` makes on CPU). Opacus issue #820 reports LoRA updates
   silently corrupted with some Opacus/peft versions, possibly only on CUDA; corruption of
   that kind is an O(1) error, far above the tolerances here. TF32 is off during the check
   (IEEE float32), so the tolerance measures the maths, not the precision mode.
2. **One federated round** of the ``full`` experiment preset's DP settings
   (:data:`dpfl.server.experiment.PRESETS`: batch 512, K = 8, LoRA ``attention+proj`` rank 8)
   with ``dpfl-server simulate --gpus-per-site``: 3 sites share the GPU, one round of one local
   epoch over ``--round-examples`` private images (the full preset's 45,000 x 3 epochs would
   not fit the 8-minute budget on a small GPU; ``--round-examples 0`` uses them all).
3. **DP-SGD steps/s** of one physical batch (``bench/bench_dp_step.py``) at the same sizes.

Exit status: 0 every check passed; 1 a check failed; 3 no CUDA GPU is visible (nothing was
checked). ``--device cpu --quick`` runs the same code path on the tiny model: about 30 s of
CPU, 2-4 minutes of wall time on 2 busy cores, nearly all of it the round's Ray start-up
(``--skip-round``: seconds); it says nothing about CUDA. Usage::

    bash scripts/gpu-check.sh                       # on a GPU machine, under 8 minutes
    bash scripts/gpu-check.sh --device cpu --quick  # the code path, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: --help answers at once
    import torch

EXIT_OK, EXIT_FAILED, EXIT_NO_GPU = 0, 1, 3  # argparse's usage errors exit 2
BUDGET_S = 480.0  # the whole check must fit 8 minutes on one GPU
TENSOR_TOL = 1e-3  # max relative error of one parameter's per-example gradient
EXAMPLE_TOL = 1e-4  # max relative error of one example's whole gradient
SUMMARY = "gpu-check.json"
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Sizes:
    """What the check runs: the GPU sizes (default) or ``--quick`` ones (tiny model)."""

    model: str  # a model directory, or a model preset name when no such directory exists
    grad_examples: int  # examples of the per-sample-gradient comparison
    grad_ks: tuple[int, ...]  # noise multiplicities K compared
    bench_batch: int  # physical batch of the timed DP step
    bench_k: int
    bench_repeats: int
    round_sites: int
    round_examples: int  # private images of the round, all sites together (0: all)
    round_batch: int  # expected logical batch of a site
    round_k: int
    lora_preset: str
    lora_rank: int
    lr: float
    clip: float
    sample_steps: int  # DDIM steps of the round's sample grids
    delta: float


def gpu_sizes(base_model: str, round_examples: int) -> Sizes:
    """The ``full`` experiment preset's DP settings (one registry, not a copy of it)."""
    from dpfl.server.experiment import PRESETS

    full = PRESETS["full"]
    model = base_model if Path(base_model).is_dir() else "fmnist"
    return Sizes(model=model, grad_examples=4, grad_ks=(1, full.noise_multiplicity),
                 bench_batch=min(256, full.batch_size), bench_k=full.noise_multiplicity,
                 bench_repeats=10, round_sites=full.num_sites, round_examples=round_examples,
                 round_batch=full.batch_size, round_k=full.noise_multiplicity,
                 lora_preset=full.lora_preset, lora_rank=full.lora_rank, lr=full.lr,
                 clip=full.clip, sample_steps=full.sample_steps, delta=1e-5)


QUICK = Sizes(model="tiny", grad_examples=2, grad_ks=(3,), bench_batch=8, bench_k=2,
              bench_repeats=2, round_sites=2, round_examples=48, round_batch=8, round_k=2,
              lora_preset="attention", lora_rank=4, lr=5e-3, clip=1.0, sample_steps=2,
              delta=1e-3)


# -- 1. per-sample gradients vs autograd ---------------------------------------------------
@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Full float32 in cuDNN convolutions and matmuls (no TF32) inside the block."""
    import torch

    conv = torch.backends.cudnn.conv.fp32_precision
    matmul = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision = conv
        torch.backends.cuda.matmul.fp32_precision = matmul


def per_sample_grad_errors(ldm, preset: str, k: int, dev: torch.device, examples: int = 2,
                           seed: int = 0) -> tuple[float, float]:
    """(max per-parameter, max per-example) relative error of Opacus' per-example gradients
    of the LoRA ``preset``, K draws per example, against autograd on each example alone."""
    import torch
    from opacus import GradSampleModule

    from dpfl.shared.ldm.diffusion import expand_draws, row_losses
    from dpfl.shared.ldm.lora import LoraSpec, wrap_unet
    from dpfl.shared.privacy.multiplicity import physical_step

    g = torch.Generator().manual_seed(seed)
    model = wrap_unet(ldm.unet, LoraSpec(preset=preset, rank=4))
    with torch.no_grad():  # a non-zero B, so that A gets gradients too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ref = copy.deepcopy(model).to(dev).train()
    gsm = GradSampleModule(model.to(dev).train(), loss_reduction="mean")
    z = torch.randn(examples, *ldm.latent_shape, generator=g).to(dev)
    y = torch.randint(0, ldm.spec.num_classes, (examples,), generator=g).to(dev)
    physical_step(gsm, ldm.scheduler, z, y, k, torch.Generator().manual_seed(seed + 1),
                  ldm.spec.null_class, 0.0)
    noisy, t, yy, target = expand_draws(z, y, ldm.scheduler, k,
                                        generator=torch.Generator().manual_seed(seed + 1))
    got = {n: p for n, p in gsm._module.named_parameters() if p.requires_grad}
    worst_tensor = worst_example = 0.0
    for i in range(examples):
        ref.zero_grad()
        rows = slice(i * k, (i + 1) * k)
        row_losses(ref, noisy[rows], t[rows], yy[rows], target[rows]).mean().backward()
        diff2 = norm2 = 0.0
        for name, p in ref.named_parameters():
            if not p.requires_grad:
                continue
            gs = getattr(got[name], "grad_sample", None)
            if gs is None or p.grad is None or gs[i].shape != p.shape:
                diff2 = worst_tensor = math.inf  # a parameter Opacus missed: the worst error
                break
            err = float((gs[i] - p.grad).norm() / p.grad.norm().clamp_min(1e-12))
            worst_tensor = max(worst_tensor, err if math.isfinite(err) else math.inf)
            diff2 += float((gs[i] - p.grad).pow(2).sum())
            norm2 += float(p.grad.pow(2).sum())
        example = math.sqrt(diff2 / max(norm2, 1e-24))  # NaN counts as worst (max() drops NaN)
        worst_example = max(worst_example, example if math.isfinite(example) else math.inf)
    gsm.cleanup()  # Opacus' hooks and per-sample gradients off the model
    return worst_tensor, worst_example


def grad_check(ldm, sizes: Sizes, dev: torch.device) -> dict[str, Any]:
    from dpfl.shared.ldm.lora import PRESETS

    cases = []
    with ieee_fp32():
        for preset in sorted(PRESETS):
            for k in sizes.grad_ks:
                tensor, example = per_sample_grad_errors(ldm, preset, k, dev,
                                                         sizes.grad_examples)
                ok = tensor < TENSOR_TOL and example < EXAMPLE_TOL
                cases.append({"preset": preset, "k": k, "max_rel_error_tensor": tensor,
                              "max_rel_error_example": example, "passed": ok})
                print(f"  per-sample grads {preset:15s} K={k}: rel error {tensor:.2e} "
                      f"(tensor), {example:.2e} (example) {'ok' if ok else 'FAILED'}")
    return {"passed": all(c["passed"] for c in cases), "tf32": False,
            "tolerance": {"tensor": TENSOR_TOL, "example": EXAMPLE_TOL},
            "max_rel_error": max(c["max_rel_error_tensor"] for c in cases), "cases": cases}


# -- 2. one federated round in simulation ------------------------------------------------
def round_command(sizes: Sizes, base_model: str, data: str, run_dir: Path,
                  gpus_per_site: float) -> list[str]:
    """``dpfl-server simulate`` of one round at ``sizes`` (argv after the program name)."""
    settings = {"num-rounds": 1, "local-epochs": 1, "batch-size": sizes.round_batch,
                "noise-multiplicity": sizes.round_k, "clip": sizes.clip, "lr": sizes.lr,
                "target-epsilon": 10.0, "lora-preset": sizes.lora_preset,
                "lora-rank": sizes.lora_rank, "lora-alpha": 2.0 * sizes.lora_rank,
                "sample-steps": sizes.sample_steps, "seed": 0}
    argv = ["simulate", "--base-model", base_model, "--data", data,
            "--sites", str(sizes.round_sites), "--scheme", "iid",
            "--max-examples", str(sizes.round_examples), "--epsilon-budget", "10",
            "--delta", f"{sizes.delta:g}", "--cpus-per-site", "1",
            "--gpus-per-site", f"{gpus_per_site:g}", "--run-dir", str(run_dir)]
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def round_inputs(sizes: Sizes, out: Path, ldm, quick: bool) -> tuple[str, str, str]:
    """(base model dir, data spec, what the data is): the real private split when the base
    model is the shipped one and Fashion-MNIST is installed, else random images (this is a
    check of the hardware path, not of utility)."""
    import numpy as np

    from dpfl.shared.data.readers import ImageSet, write_npz
    from dpfl.shared.ldm.models import FASHION_MNIST_CLASSES, save_ldm

    shipped = Path(sizes.model).is_dir()
    base = sizes.model if shipped else str(save_ldm(ldm, out / f"{sizes.model}-base"))
    fmnist = Path(os.environ.get("DPFL_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
    if shipped and not quick and (fmnist / "train-images-idx3-ubyte.gz").exists():
        return base, "fmnist:private", "Fashion-MNIST private split"
    n = sizes.round_examples or 45_000
    rng = np.random.default_rng(0)
    write_npz(out / "round-data.npz", ImageSet(rng.random((n, 28, 28, 1), dtype=np.float32),
                                               rng.integers(0, 10, n), FASHION_MNIST_CLASSES))
    return base, str(out / "round-data.npz"), f"{n} random images"


def federated_round(argv: list[str], run_dir: Path, sites: int, timeout: float
                    ) -> dict[str, Any]:
    """Run the simulation in its own process; pass when round 1 accepted every site."""
    log = run_dir.parent / "simulate.log"
    env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc: int | str = subprocess.run([sys.executable, "-m", "dpfl.server.cli", *argv],
                                           stdout=f, stderr=subprocess.STDOUT, env=env,
                                           timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = f"timed out after {timeout:.0f} s"
    rec: dict[str, Any] = {"returncode": rc, "wall_s": round(time.perf_counter() - t0, 1),
                           "log": str(log)}
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(s) for s in metrics.read_text().splitlines()] if metrics.exists() else []
    last = rows[-1] if rows else {}
    rec.update(accepted=last.get("accepted"), global_epsilon=last.get("global_epsilon"))
    rec["passed"] = (rc == 0 and last.get("round") == 1 and last.get("accepted") == sites
                     and math.isfinite(float(last.get("global_epsilon", math.nan))))
    if rec["passed"]:
        print(f"  round 1: {rec['accepted']} of {sites} sites accepted, global epsilon "
              f"{rec['global_epsilon']:.2f}, {rec['wall_s']:.0f} s (log: {log})")
    else:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        print("  federated round FAILED; end of " + str(log) + ":\n    " + "\n    ".join(tail))
    return rec


# -- 3. DP-SGD steps/s -------------------------------------------------------------------
def dp_steps_per_s(sizes: Sizes, dev: torch.device) -> dict[str, Any]:
    spec = importlib.util.spec_from_file_location("bench_dp_step", HERE / "bench_dp_step.py")
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {HERE / 'bench_dp_step.py'}")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    is_dir = Path(sizes.model).is_dir()
    r = bench.bench(sizes.model, sizes.lora_preset, sizes.bench_batch, sizes.bench_k,
                    sizes.bench_repeats, dev, "lora", sizes.model if is_dir else None)
    r.update(steps_per_s=round(1.0 / r["dp_s"], 3),
             examples_per_s=round(sizes.bench_batch / r["dp_s"], 1), passed=True)
    return r


# -- the run -----------------------------------------------------------------------------
def versions(dev: torch.device) -> dict[str, Any]:
    from importlib.metadata import version

    import torch

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    return {"device": str(dev), "device_name": name or platform.machine(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            **{pkg: version(pkg) for pkg in ("opacus", "peft", "diffusers", "flwr")},
            "python": platform.python_version()}


def guarded(name: str, fn, *args) -> dict[str, Any]:
    """Run one check; an exception fails that check (recorded), not the whole run."""
    print(f"== {name}", flush=True)
    try:
        return fn(*args)
    except Exception as exc:  # any crash is a failed check, reported as such
        print(f"  {name} FAILED: {type(exc).__name__}: {exc}")
        return {"passed": False, "error": f"{type(exc).__name__}: {exc}"}


def run_checks(args: argparse.Namespace, dev: torch.device, out: Path) -> dict[str, Any]:
    from dpfl.shared.ldm.models import build_ldm, load_ldm

    t0 = time.perf_counter()
    sizes = QUICK if args.quick else gpu_sizes(args.base_model, args.round_examples)
    ldm = load_ldm(sizes.model) if Path(sizes.model).is_dir() else build_ldm(sizes.model)
    checks = {"per_sample_grads": guarded("per-sample gradients vs autograd", grad_check,
                                          ldm, sizes, dev)}
    if args.skip_round:
        checks["federated_round"] = {"passed": None, "skipped": "--skip-round"}
    else:
        gpus = 1.0 / sizes.round_sites if dev.type == "cuda" else 0.0
        base, data, what = round_inputs(sizes, out, ldm, args.quick)
        argv = round_command(sizes, base, data, out / "round", gpus)
        name = f"one federated round: {sizes.round_sites} sites, {what}, --gpus-per-site {gpus:g}"
        timeout = max(60.0, args.budget_s - (time.perf_counter() - t0))
        checks["federated_round"] = guarded(name, federated_round, argv, out / "round",
                                            sizes.round_sites, timeout)
        checks["federated_round"].update(data=what, command="dpfl-server " + " ".join(argv))
    checks["dp_steps"] = guarded("DP-SGD steps/s", dp_steps_per_s, sizes, dev)
    steps = checks["dp_steps"].get("steps_per_s")
    if steps is not None:
        print(f"  DP steps/s: {steps:.2f} (physical batch {sizes.bench_batch}, "
              f"K={sizes.bench_k}, LoRA {sizes.lora_preset}: "
              f"{checks['dp_steps']['examples_per_s']:.0f} examples/s, "
              f"DP/plain {checks['dp_steps']['ratio']:.2f})")
    wall = time.perf_counter() - t0
    return {"max_per_sample_grad_error": checks["per_sample_grads"].get("max_rel_error"),
            "steps_per_s": steps, "round_wall_s": checks["federated_round"].get("wall_s"),
            "wall_s": round(wall, 1), "budget_s": args.budget_s,
            "within_budget": wall <= args.budget_s, "sizes": asdict(sizes), "checks": checks,
            "passed": all(c["passed"] for c in checks.values() if "skipped" not in c)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto",
                    help="auto (the GPU; exit 3 without one), cuda[:N], or cpu")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model and sizes: the code path, in minutes on a CPU")
    ap.add_argument("--skip-round", action="store_true",
                    help="leave out the federated round (Ray start-up is most of a quick run)")
    ap.add_argument("--base-model", default="models/fmnist-base",
                    help="model of the GPU sizes (the 'fmnist' preset, untrained, if absent)")
    ap.add_argument("--round-examples", type=int, default=9000,
                    help="private images of the round, all sites (0: all 45,000)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help="seconds the whole check may take (the round is stopped at it)")
    ap.add_argument("--out", default=None,
                    help="output folder (default runs/gpu-check/<UTC time>)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or f"runs/gpu-check/{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    wants_gpu = args.device == "auto" or args.device.startswith("cuda")
    summary: dict[str, Any] = {"date": stamp, "quick": args.quick}
    if wants_gpu and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu-check: NO GPU: torch {torch.__version__} ({build}) sees no CUDA device, "
              f"so nothing was checked. Run it on a GPU machine; '--device cpu --quick' "
              f"exercises the code path on CPU but proves nothing about CUDA.", file=sys.stderr)
        summary.update(versions(torch.device("cpu")), status="no-gpu", passed=False,
                       exit_code=EXIT_NO_GPU)
    else:
        from dpfl.shared.ldm.models import resolve_device

        dev = resolve_device(args.device)
        summary.update(versions(dev))
        print(f"gpu-check on {summary['device_name']} ({dev}): torch {summary['torch']}, "
              f"opacus {summary['opacus']}, peft {summary['peft']}", flush=True)
        summary.update(run_checks(args, dev, out))
        code = EXIT_OK if summary["passed"] else EXIT_FAILED
        summary.update(status="passed" if summary["passed"] else "failed", exit_code=code)
    path = out / SUMMARY
    path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"gpu-check: {summary['status'].upper()} (exit {summary['exit_code']}); "
          f"summary: {path}")
    return int(summary["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
