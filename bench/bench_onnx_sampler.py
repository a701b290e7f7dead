"""Benchmark: torch-free ONNX sampler (fp32, int8) vs torch eager sampling. Not a test.

Same model (random weights of a preset, same seed), same DDIM steps, guidance and batch.
Each sampler runs in its own fresh process, so "peak_rss_mb" is that process's whole peak
resident memory (interpreter and libraries included) as a device would see it; the ONNX
workers never import torch. Prints one JSON object.

    python bench/bench_onnx_sampler.py --preset tiny --batch 16 --steps 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited
    from the parent that forked us)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up (graph optimisation, allocator)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def worker(args: argparse.Namespace) -> dict:
    import numpy as np

    labels = np.arange(args.batch) % 10
    if args.worker == "torch":
        import torch

        from dpfl.shared.ldm.diffusion import ddim_sample
        from dpfl.shared.ldm.models import build_ldm

        torch.set_num_threads(args.threads)
        ldm = build_ldm(args.preset, seed=0)
        ldm.unet.eval()
        y = torch.from_numpy(labels)

        def run() -> None:
            z = ddim_sample(ldm.unet, ldm.scheduler, y, ldm.latent_shape, ldm.spec.null_class,
                            steps=args.steps, guidance=args.guidance,
                            generator=torch.Generator().manual_seed(0))
            ldm.decode(z)
    else:
        from dpfl.shared.edge.sampler import EdgeBundle, SamplerConfig, sample_images

        bundle = EdgeBundle.load(args.bundle, variant=args.worker, threads=args.threads)
        cfg = SamplerConfig(steps=args.steps, guidance=args.guidance, batch_size=args.batch)

        def run() -> None:
            sample_images(bundle, labels, cfg)
    sec = _timed(run, args.repeats)
    return {"images_per_s": args.batch / sec, "seconds_per_batch": sec,
            "peak_rss_mb": _peak_rss_mb(),
            "torch_imported": "torch" in sys.modules}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=["tiny", "fmnist"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    import torch

    from dpfl.shared.export.onnx_bundle import ExportConfig, export_bundle
    from dpfl.shared.ldm.models import build_ldm

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = export_bundle(build_ldm(args.preset, seed=0), Path(tmp) / "bundle",
                               config=ExportConfig(int8=True, parity_steps=2))
        meta = json.loads((bundle / "bundle.json").read_text())
        results = {}
        for mode in ("torch", "fp32", "int8"):
            cmd = [sys.executable, __file__, "--worker", mode, "--bundle", str(bundle)]
            cmd += [f"--{k}={getattr(args, k)}" for k in
                    ("preset", "batch", "steps", "guidance", "threads", "repeats")]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    torch_ips = results["torch"]["images_per_s"]
    report = {
        "preset": args.preset, "batch": args.batch, "steps": args.steps,
        "guidance": args.guidance, "threads": args.threads, "repeats": args.repeats,
        "solver": "ddim", "torch": torch.__version__, "results": results,
        "speedup_vs_torch": {m: results[m]["images_per_s"] / torch_ips for m in ("fp32", "int8")},
        "int8_image_max_abs_diff": meta["variants"]["int8"]["image_parity"]["max_abs_diff"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
