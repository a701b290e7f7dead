"""Benchmark: torch eager vs the torch-free ONNX sampler, merged and base+adapter. Not a test.

One model (a preset's random weights, or ``--model DIR``) and one LoRA adapter (rank 4 on
the attention layers plus a trained class embedding, random non-zero factors) are exported
twice: merged into one UNet (``dpfl-server export --adapter``) and as an adapter-swappable
base plus a small edge adapter file (``--lora-preset`` + ``export-adapter``). The variants
sample the same images (same noise, DDIM, steps, guidance, batch, threads):

``torch``     ``ddim_sample`` + decode on the merged torch UNet (eager), the model's scheduler
``torch-trailing`` the same with trailing spacing (a fairer quality baseline for ``fast``)
``merged``    ONNX sampler, merged bundle
``adapter``   ONNX sampler, base bundle + edge adapter
``fast``      ONNX sampler, base bundle + edge adapter, UniPC (bh2, order 2) with trailing
              spacing and ``--fast-steps`` UNet calls (the on-device setting)

The first three take ``--steps`` DDIM steps and give the same images (parity). ``fast``
gives other images, so it is judged by quality: every variant's mean |image - reference|,
where the reference is the same adapter sampled by DDIM at ``--ref-steps`` with trailing
spacing (the ODE solved finely from t = 999). ``fast`` counts only if its error is no larger
than both torch variants' (``fast_equal_quality``).

Each variant runs in its own fresh process, ``--rounds`` times in turn, and the best round
counts (the machine may be shared). ``images_per_cpu_s`` (images per CPU second, all
threads) is less sensitive to other load than wall time; with ``--threads 1`` it is close to
what a quiet core gives. ``peak_rss_mb`` is that process's peak resident memory
(``VmHWM``; interpreter and libraries included) as a device would see it. Not
``getrusage(RUSAGE_CHILDREN)`` in the parent: Linux carries the parent's high-water mark
into a forked child's ``ru_maxrss`` across ``exec``, so every worker would report at least
the parent's memory. The ONNX workers never import torch. Prints one JSON object.

    python bench/bench_onnx_sampler.py --preset fmnist --batch 16 --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ONNX_VARIANTS = ("merged", "adapter")
FAST_SOLVER, FAST_SPACING = "unipc", "trailing"


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _timed(fn, repeats: int):
    """Wall and CPU (user + system, all threads) seconds per call, and the last result."""
    out = fn()  # warm-up (graph optimisation, allocator)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        out = fn()
    return (time.perf_counter() - t0) / repeats, (time.process_time() - c0) / repeats, out


def _torch_run(args: argparse.Namespace, noise):
    import torch

    from dpfl.shared.export.onnx_bundle import merge_adapter
    from dpfl.shared.ldm.diffusion import ddim_sample

    torch.set_num_threads(args.threads)
    ldm = _model(args)
    unet = merge_adapter(ldm, Path(args.work) / "lora")
    y = torch.arange(args.batch) % ldm.spec.num_classes
    z0 = torch.from_numpy(noise)
    sched = ldm.scheduler
    if args.worker == "torch-trailing":
        sched = type(sched).from_config(sched.config, timestep_spacing=FAST_SPACING)

    def run():
        z = ddim_sample(unet, sched, y, ldm.latent_shape, ldm.spec.null_class,
                        steps=args.steps, guidance=args.guidance, initial_noise=z0)
        return ldm.decode(z).numpy()
    return run


def worker(args: argparse.Namespace) -> dict:
    import numpy as np

    work = Path(args.work)
    noise = np.load(work / "noise.npy", allow_pickle=False)
    if args.worker.startswith("torch"):
        run = _torch_run(args, noise)
    else:
        from dpfl.shared.edge.sampler import EdgeBundle, SamplerConfig, sample_images

        adapter = work / "site.safetensors" if args.worker != "merged" else None
        bundle = EdgeBundle.load(work / ("base" if adapter else "merged"),
                                 threads=args.threads, adapter=adapter)
        cfg = SamplerConfig(steps=args.steps, guidance=args.guidance, batch_size=args.batch)
        if args.worker == "fast":
            cfg = SamplerConfig(steps=args.fast_steps, guidance=args.guidance,
                                batch_size=args.batch, solver=FAST_SOLVER, spacing=FAST_SPACING)
        elif args.worker == "reference":
            cfg = SamplerConfig(steps=args.ref_steps, guidance=args.guidance,
                                batch_size=args.batch, spacing=FAST_SPACING)
        labels = np.arange(args.batch) % len(bundle.class_names)

        def run():
            return sample_images(bundle, labels, cfg, initial_noise=noise)
    if args.worker == "reference":  # not timed
        np.save(work / "images-reference.npy", run())
        return {}
    sec, cpu, images = _timed(run, args.repeats)
    np.save(work / f"images-{args.worker}.npy", images)
    return {"images_per_s": args.batch / sec, "seconds_per_batch": sec,
            "images_per_cpu_s": args.batch / cpu,
            "peak_rss_mb": _peak_rss_mb(), "torch_imported": "torch" in sys.modules}


def _model(args: argparse.Namespace):
    from dpfl.shared.ldm.models import build_ldm, load_ldm

    return load_ldm(args.model) if args.model else build_ldm(args.preset, seed=0)


def _adapter(ldm, path: Path) -> Path:
    """A rank-4 attention adapter with a trained class embedding and random factors."""
    import torch

    from dpfl.shared.ldm.lora import LoraSpec, save_adapter, wrap_unet

    model = wrap_unet(ldm.unet, LoraSpec(rank=4, alpha=8.0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return save_adapter(model, path)


def prepare(args: argparse.Namespace, work: Path) -> dict:
    import numpy as np

    from dpfl.shared.export.lora_graph import export_adapter
    from dpfl.shared.export.onnx_bundle import ExportConfig, export_bundle
    from dpfl.shared.privacy.guarantee import PrivacyGuarantee

    ldm = _model(args)
    adapter = _adapter(ldm, work / "lora")
    export_bundle(ldm, work / "merged", adapter_dir=adapter,
                  config=ExportConfig(parity_steps=2))
    export_bundle(ldm, work / "base", config=ExportConfig(parity_steps=2,
                                                          lora_preset="attention"))
    edge = export_adapter(ldm, adapter, work / "site.safetensors",
                          privacy=PrivacyGuarantee.from_values(2.0, 1e-5))
    noise = np.random.default_rng(0).standard_normal((args.batch, *ldm.latent_shape))
    np.save(work / "noise.npy", noise.astype(np.float32))
    mb = 1 / 2 ** 20
    return {"merged_unet_mb": (work / "merged" / "unet.onnx").stat().st_size * mb,
            "base_unet_mb": (work / "base" / "unet.onnx").stat().st_size * mb,
            "edge_adapter_mb": edge.stat().st_size * mb}


def _spawn(args: argparse.Namespace, mode: str, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--work", str(work)]
    cmd += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
            ("preset", "batch", "steps", "guidance", "threads", "repeats", "fast_steps",
              "ref_steps")]
    cmd += [f"--model={args.model}"] if args.model else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _parity(work: Path) -> dict:
    """Max/mean |image - torch's image| of each ONNX variant (same noise, same steps)."""
    import numpy as np

    ref = np.load(work / "images-torch.npy", allow_pickle=False).astype(np.float64)
    out = {}
    for m in ONNX_VARIANTS:
        d = np.abs(np.load(work / f"images-{m}.npy", allow_pickle=False) - ref)
        out[m] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean())}
    return out


def _quality(work: Path) -> dict:
    """Mean |image - reference| of every variant (lower is closer to the solved ODE)."""
    import numpy as np

    ref = np.load(work / "images-reference.npy", allow_pickle=False).astype(np.float64)
    return {m: round(float(np.abs(np.load(work / f"images-{m}.npy", allow_pickle=False)
                                  - ref).mean()), 4)
            for m in ("torch", "torch-trailing", *ONNX_VARIANTS, "fast")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="fmnist", choices=["tiny", "fmnist"])
    ap.add_argument("--model", default=None, help="model directory instead of --preset")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--fast-steps", type=int, default=10,
                    help="UNet calls of the fast variant (UniPC, trailing)")
    ap.add_argument("--ref-steps", type=int, default=200,
                    help="DDIM steps (trailing) of the quality reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed batches per round")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per variant")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes = prepare(args, work)
        rounds: dict[str, list[dict]] = {
            m: [] for m in ("torch", "torch-trailing", *ONNX_VARIANTS, "fast")}
        for _ in range(args.rounds):
            for mode in rounds:
                rounds[mode].append(_spawn(args, mode, work))
        _spawn(args, "reference", work)
        parity, quality = _parity(work), _quality(work)
    best = {m: max(r, key=lambda x: x["images_per_s"]) for m, r in rounds.items()}
    torch_ips = best["torch"]["images_per_s"]
    print(json.dumps({
        "preset": args.model or args.preset, "batch": args.batch, "steps": args.steps,
        "guidance": args.guidance, "threads": args.threads,
        "repeats": args.repeats, "rounds": args.rounds, "torch": torch.__version__,
        "images_per_s": {m: round(b["images_per_s"], 2) for m, b in best.items()},
        "images_per_cpu_s": {m: round(max(x["images_per_cpu_s"] for x in r), 2)
                             for m, r in rounds.items()},
        "peak_rss_mb": {m: round(b["peak_rss_mb"]) for m, b in best.items()},
        "speedup_vs_torch": {m: round(best[m]["images_per_s"] / torch_ips, 2)
                             for m in (*ONNX_VARIANTS, "fast")},
        "cpu_speedup_vs_torch": {m: round(max(x["images_per_cpu_s"] for x in rounds[m])
                                          / max(x["images_per_cpu_s"] for x in rounds["torch"]), 2)
                                 for m in (*ONNX_VARIANTS, "fast")},
        "fast": {"solver": FAST_SOLVER, "spacing": FAST_SPACING, "steps": args.fast_steps},
        "error_vs_reference": quality, "reference_ddim_trailing_steps": args.ref_steps,
        "fast_equal_quality": quality["fast"] <= min(quality["torch"],
                                                     quality["torch-trailing"]),
        "all_rounds_images_per_s": {m: [round(x["images_per_s"], 2) for x in r]
                                    for m, r in rounds.items()},
        "torch_imported": {m: b["torch_imported"] for m, b in best.items()},
        "sizes_mb": {k: round(v, 3) for k, v in sizes.items()}, "image_parity_vs_torch": parity,
    }, indent=2))


if __name__ == "__main__":
    main()
