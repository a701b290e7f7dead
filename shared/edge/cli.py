"""``dpfl-sample``: synthetic images from an ONNX bundle, without torch.

Only numpy, onnxruntime and Pillow are needed (``pip install -r requirements/edge.txt``
then ``pip install --no-deps .``). ``--adapter FILE`` applies an edge adapter to an
adapter-swappable base bundle (shipped once), refusing one made for another base. Every
output carries the provenance: base and adapter fingerprints and the privacy guarantee the
adapter was trained under.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from dpfl.shared.defaults import default_of
from dpfl.shared.edge.grid import save_grid, to_uint8
from dpfl.shared.edge.sampler import (
    SOLVERS,
    SPACINGS,
    EdgeBundle,
    SamplerConfig,
    sample_images,
)
from dpfl.shared.errors import ConfigError, DpflError
from dpfl.shared.io import atomic_write_json

log = logging.getLogger(__name__)


def parse_classes(spec: str | None, names: Sequence[str]) -> list[int]:
    """``"0,3,Bag"`` -> class indices; ``None`` or ``"all"`` -> every class."""
    if spec is None or spec.strip().lower() == "all":
        return list(range(len(names)))
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item.isdigit() and int(item) < len(names):
            out.append(int(item))
        elif item in names:
            out.append(list(names).index(item))
        else:
            raise ConfigError(f"unknown class {item!r}; use indices 0..{len(names) - 1} or "
                              f"names {list(names)}")
    return out


def provenance(bundle: EdgeBundle, cfg: SamplerConfig) -> dict[str, Any]:
    m = bundle.meta
    adapter = bundle.adapter
    return {"bundle": str(bundle.path), "variant": bundle.variant, "created": m.get("created"),
            "base_fingerprint": m.get("base_fingerprint"),
            "adapter_fingerprint": bundle.adapter_fingerprint,
            "adapter_file": None if adapter is None else str(adapter.path),
            "adapter_created": None if adapter is None else adapter.meta.get("created"),
            "privacy": bundle.privacy,
            "sampler": {"solver": cfg.solver, "steps": cfg.steps, "guidance": cfg.guidance,
                        "seed": cfg.seed,
                        "spacing": cfg.schedule(m["scheduler"]).get("timestep_spacing")}}


def privacy_line(privacy: dict[str, Any] | None) -> str:
    p = privacy or {}
    if p.get("status") == "stated":
        return f"(eps={p['epsilon']:.3g}, delta={p['delta']:.3g})-DP"
    return "privacy guarantee: unknown"


def write_outputs(images: np.ndarray, labels: np.ndarray, bundle: EdgeBundle, out: Path,
                  prov: dict[str, Any], per_class: int, grid: bool, pngs: bool) -> list[Path]:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    out.mkdir(parents=True, exist_ok=True)
    names = bundle.class_names
    written = [out / "samples.npz", out / "provenance.json"]
    u8 = to_uint8(images)
    np.savez_compressed(written[0], images=u8, labels=labels.astype(np.int64),
                        class_names=np.array(names), provenance=np.array(json.dumps(prov)))
    atomic_write_json(written[1], prov)
    if grid:
        rows = list(dict.fromkeys(labels.tolist()))
        written.append(save_grid(images, out / "grid.png", nrow=per_class,
                                 row_labels=[names[c] for c in rows],
                                 title=f"{prov['sampler']['steps']} {prov['sampler']['solver']} "
                                       f"steps, {privacy_line(bundle.privacy)}"))
    if pngs:
        info = PngInfo()
        info.add_text("dpfl-provenance", json.dumps(prov))
        (out / "images").mkdir(exist_ok=True)
        for i, (img, y) in enumerate(zip(u8, labels)):
            p = out / "images" / f"{i:05d}_{int(y)}.png"
            Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(p, pnginfo=info)
        written.append(out / "images")
    return written


def build_parser() -> argparse.ArgumentParser:
    cfg = partial(default_of, SamplerConfig)
    ap = argparse.ArgumentParser(prog="dpfl-sample", description=__doc__.split("\n")[0])
    ap.add_argument("bundle", help="bundle directory written by 'dpfl-server export'")
    ap.add_argument("--adapter", default=None,
                    help="edge adapter file ('dpfl-server export-adapter') to apply to an "
                         "adapter-swappable base bundle [none: the bundle's own weights]")
    ap.add_argument("--out", default="samples", help="output directory [%(default)s]")
    ap.add_argument("--variant", default=default_of(EdgeBundle.load, "variant"),
                    help="fp32 or fp16 (when exported) [%(default)s]")
    ap.add_argument("--classes", default=None, help="comma list of indices or names [all]")
    ap.add_argument("--count", type=int, default=8, help="images per class [%(default)s]")
    ap.add_argument("--steps", type=int, default=cfg("steps"), help="solver steps [%(default)s]")
    ap.add_argument("--guidance", type=float, default=cfg("guidance"),
                    help="CFG scale [%(default)s]")
    ap.add_argument("--solver", choices=SOLVERS, default=cfg("solver"), help="[%(default)s]")
    ap.add_argument("--spacing", choices=SPACINGS, default=None,
                    help="timestep spacing [the bundle scheduler's]; 'trailing' with "
                         "'--solver dpmpp2m --steps 12' is the fast setting")
    ap.add_argument("--seed", type=int, default=cfg("seed"), help="noise seed [%(default)s]")
    ap.add_argument("--batch-size", type=int, default=cfg("batch_size"),
                    help="images per batch [%(default)s]")
    ap.add_argument("--threads", type=int, default=default_of(EdgeBundle.load, "threads"),
                    help="onnxruntime threads (0: auto)")
    ap.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    ap.add_argument("--pngs", action="store_true", help="also write one PNG per image")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.count < 1:
            raise ConfigError(f"--count must be >= 1, got {args.count}")
        cfg = SamplerConfig(steps=args.steps, guidance=args.guidance, solver=args.solver,
                            seed=args.seed, batch_size=args.batch_size,
                            spacing=args.spacing)
        bundle = EdgeBundle.load(args.bundle, variant=args.variant, threads=args.threads,
                                 adapter=args.adapter)
        classes = parse_classes(args.classes, bundle.class_names)
        labels = np.repeat(np.array(classes, dtype=np.int64), args.count)
        t0 = time.perf_counter()
        images = sample_images(bundle, labels, cfg)
        dt = time.perf_counter() - t0
        prov = provenance(bundle, cfg)
        written = write_outputs(images, labels, bundle, Path(args.out), prov, args.count,
                                not args.no_grid, args.pngs)
    except DpflError as exc:
        print(f"dpfl-sample: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(labels)} images in {dt:.2f}s ({len(labels) / dt:.1f} images/s), "
          f"{privacy_line(bundle.privacy)}")
    for p in written:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
