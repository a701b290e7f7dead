"""Distances between image distributions in a feature space.

- Fréchet distance between the Gaussians fitted to two feature sets (Heusel et al., "GANs
  Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", NeurIPS
  2017): ``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``. With Inception-v3 pool features
  it is the FID; with the features of a classifier trained on public data of the domain it
  is the domain Fréchet distance dpfl reports by default.
- Improved precision and recall (Kynkäänniemi et al., "Improved Precision and Recall Metric
  for Assessing Generative Models", NeurIPS 2019): each set's manifold is the union of balls
  around its points reaching their k-th nearest neighbour; precision is the share of
  generated points inside the real manifold, recall the share of real points inside the
  generated one.
- Inception features from NVIDIA's TorchScript ``inception-2015-12-05.pt`` (the network
  StyleGAN2-ADA and clean-fid use), read from a local file only: dpfl never downloads it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch

from dpfl.shared.errors import DataError, ModelError

log = logging.getLogger(__name__)

INCEPTION_ENV = "DPFL_INCEPTION"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_SIZE = 299


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``(D,)`` and covariance ``(D, D)`` (float64) of ``n`` feature vectors."""

    mean: np.ndarray
    cov: np.ndarray
    n: int

    @classmethod
    def of(cls, features: np.ndarray | torch.Tensor) -> GaussianStats:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise DataError(f"feature statistics need a (N, D) array with N >= 2, got shape "
                            f"{f.shape}")
        return cls(f.mean(0), np.cov(f, rowvar=False), len(f))


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """Fréchet distance between N(a.mean, a.cov) and N(b.mean, b.cov)."""
    if a.mean.shape != b.mean.shape:
        raise DataError(f"feature dimensions differ: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    diff = a.mean - b.mean
    covmean = scipy.linalg.sqrtm(a.cov @ b.cov)
    if not np.isfinite(covmean).all():
        # singular product (e.g. fewer samples than dimensions): regularise both covariances
        log.warning("Fréchet distance: singular covariance product; adding %g to the diagonal", eps)
        offset = np.eye(len(a.cov)) * eps
        covmean = scipy.linalg.sqrtm((a.cov + offset) @ (b.cov + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        if imag > 1e-3 * max(1.0, np.abs(covmean.real).max()):
            log.warning("Fréchet distance: matrix square root has an imaginary part of %.3g", imag)
        covmean = covmean.real
    value = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def frechet_from_features(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    return frechet_distance(GaussianStats.of(x), GaussianStats.of(y))


# -- precision / recall ----------------------------------------------------------------------
def _kth_neighbour_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    radii = []
    for part in x.split(chunk):
        d = torch.cdist(part, x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the first is the point itself (0)
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
            chunk: int) -> torch.Tensor:
    hits = []
    for part in points.split(chunk):
        hits.append((torch.cdist(part, centres) <= radii[None, :]).any(1))
    return torch.cat(hits)


def precision_recall(real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor,
                     k: int = 3, max_points: int = 10000, seed: int = 0,
                     chunk: int = 1024) -> dict[str, float | int]:
    """Improved precision/recall (k-NN manifolds). Both sets are subsampled (seeded) to the
    size of the smaller one, at most ``max_points``, so that the two manifolds compare fairly."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    n = min(len(r), len(f), max_points)
    if n <= k:
        raise DataError(f"precision/recall with k={k} needs more than {k} points in each set, "
                        f"got {len(r)} real and {len(f)} generated")
    rng = np.random.default_rng(seed)
    r = r[np.sort(rng.choice(len(r), n, replace=False))] if len(r) > n else r
    f = f[np.sort(rng.choice(len(f), n, replace=False))] if len(f) > n else f
    r_radii = _kth_neighbour_radii(r, k, chunk)
    f_radii = _kth_neighbour_radii(f, k, chunk)
    precision = _inside(f, r, r_radii, chunk).double().mean().item()
    recall = _inside(r, f, f_radii, chunk).double().mean().item()
    return {"precision": precision, "recall": recall, "k": k, "points": n}


# -- Inception (FID) -------------------------------------------------------------------------
def inception_path(path: str | Path | None = None) -> Path | None:
    """The Inception weights file to use: ``path``, else ``$DPFL_INCEPTION``, else None
    (FID not requested). A given path that does not exist is an error."""
    chosen = path if path else os.environ.get(INCEPTION_ENV) or None
    if chosen is None:
        return None
    p = Path(chosen).expanduser()
    if not p.is_file():
        origin = "--inception" if path else f"${INCEPTION_ENV}"
        raise ModelError(
            f"Inception weights not found at {p} (from {origin}). FID needs NVIDIA's TorchScript "
            f"Inception-v3, the file {INCEPTION_FILE} used by StyleGAN2-ADA and clean-fid; dpfl "
            f"never downloads it. Copy it to this machine and pass --inception PATH or set "
            f"{INCEPTION_ENV}=PATH (or leave both unset to skip FID).")
    return p


def load_inception(path: str | Path, device: str = "cpu") -> torch.jit.ScriptModule:
    """Load the TorchScript Inception network (``torch.jit.load``) from a local file."""
    p = Path(path)
    try:
        net = torch.jit.load(str(p), map_location=device)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelError(f"{p} is not a TorchScript Inception network ({exc}); expected "
                         f"NVIDIA's {INCEPTION_FILE}") from exc
    return net.eval()


def to_inception_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) float in [0, 1] -> (N, 3, 299, 299) uint8: grayscale repeated to three
    channels, bilinear resize to 299x299, rounded to 8 bits (the network takes uint8 NCHW)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != 3:
        raise DataError(f"FID takes grayscale or RGB images, got {x.shape[1]} channels")
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = torch.nn.functional.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE),
                                            mode="bilinear", align_corners=False)
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def inception_features(net: torch.nn.Module, images: np.ndarray, batch_size: int = 64,
                       device: str = "cpu", progress: bool = False) -> np.ndarray:
    """2048-d pool features, ``net(uint8 NCHW 299x299, return_features=True)``."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="inception", disable=not progress):
        x = to_inception_input(images[i:i + batch_size]).to(device)
        out.append(net(x, return_features=True).double().cpu())
    return torch.cat(out).numpy()
