"""Black-box membership inference on a released adapter: the loss-threshold attack.

Yeom, Giacomelli, Fredrikson and Jha ("Privacy Risk in Machine Learning", CSF 2018): an
example whose loss under the released model is low is guessed a member. For a diffusion
model the loss of an example is its denoising loss averaged over several (timestep, noise)
draws (as in Carlini et al., "Extracting Training Data from Diffusion Models", 2023, and
Matsumoto et al., 2023). The attack sees only the released weights, so it gives far weaker
evidence than the white-box audit (:mod:`dpfl.shared.privacy.audit`); its ROC curve and
true-positive rate at a low false-positive rate (Carlini et al., "Membership Inference
Attacks From First Principles", S&P 2022) are what the report shows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dpfl.shared.ldm.diffusion import example_losses

FPR_POINTS = (0.001, 0.01, 0.1)


@torch.no_grad()
def diffusion_losses(unet: torch.nn.Module, scheduler, latents: torch.Tensor,
                     labels: torch.Tensor, draws: int, seed: int, batch: int = 64) -> np.ndarray:
    """Per-example diffusion loss, the mean over ``draws`` (t, noise) draws (seeded)."""
    unet.eval()
    dev = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, latents.shape[0], batch):
        z, y = latents[i:i + batch].to(dev), labels[i:i + batch].to(dev)
        out.append(example_losses(unet, scheduler, z, y, k=draws, generator=gen).cpu())
    return torch.cat(out).double().numpy()


def roc(member_loss: np.ndarray, heldout_loss: np.ndarray) -> dict[str, Any]:
    """ROC of "member iff loss <= threshold" over all thresholds: FPR, TPR, AUC and the TPR
    at each of :data:`FPR_POINTS` (the best TPR whose FPR does not exceed it)."""
    scores = np.concatenate([-member_loss, -heldout_loss])
    truth = np.concatenate([np.ones(len(member_loss)), np.zeros(len(heldout_loss))])
    order = np.argsort(-scores, kind="stable")
    tp = np.concatenate([[0.0], np.cumsum(truth[order])])
    fp = np.concatenate([[0.0], np.cumsum(1 - truth[order])])
    tpr, fpr = tp / max(len(member_loss), 1), fp / max(len(heldout_loss), 1)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids
    at = {f"{x:g}": float(tpr[fpr <= x].max()) for x in FPR_POINTS}
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "auc": auc, "tpr_at_fpr": at,
            "members": len(member_loss), "heldout": len(heldout_loss)}


def membership_inference(unet: torch.nn.Module, scheduler, members: tuple[torch.Tensor, ...],
                         heldout: tuple[torch.Tensor, ...], draws: int = 8,
                         seed: int = 0) -> dict[str, Any]:
    """Loss-threshold attack: ``members``/``heldout`` are (latents, labels) pairs."""
    m_loss = diffusion_losses(unet, scheduler, *members, draws=draws, seed=seed)
    h_loss = diffusion_losses(unet, scheduler, *heldout, draws=draws, seed=seed + 1)
    out = roc(m_loss, h_loss)
    out.update(draws=draws, member_mean_loss=float(m_loss.mean()),
               heldout_mean_loss=float(h_loss.mean()))
    return out


def plot_roc(result: dict[str, Any], path, title: str) -> None:
    """ROC curve (log-log, with the chance line) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    fpr, tpr = np.asarray(result["fpr"]), np.asarray(result["tpr"])
    keep = (fpr > 0) & (tpr > 0)
    ax.loglog(fpr[keep], tpr[keep], label=f"loss threshold (AUC {result['auc']:.3f})")
    grid = np.logspace(-3, 0, 50)
    ax.loglog(grid, grid, "k:", label="chance")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
