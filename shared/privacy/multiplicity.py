"""Noise multiplicity under stock Opacus: K (timestep, noise) draws per example, one clip.

Paper: DPDM (Dockhorn, Cao, Vahdat, Kreis, "Differentially Private Diffusion Models", TMLR
2023). For each example draw K (noise level, noise) pairs, average the K losses inside that
example's loss, and clip the per-example gradient of that average. The variance of the
gradient estimate drops at no privacy cost, because each example is still clipped once.

How, with Opacus' per-sample gradients: each example of a physical batch becomes K rows
(:func:`dpfl.shared.ldm.diffusion.expand_draws`, example-major), the UNet sees B*K rows, and
the loss is the mean over rows with ``loss_reduction="mean"``, so Opacus' per-row gradient
is the gradient of that row's loss. Before the optimizer clips, every ``grad_sample`` is
reshaped to (B, K, ...) and averaged over K (:func:`reduce_noise_multiplicity`): each
example's gradient is the gradient of its mean K-draw loss and is clipped *once* at C.
(Repeating each example K times and letting Opacus clip every row would give sensitivity
K*C with noise sized for C.)

Two hooks serve the empirical privacy audit (:mod:`dpfl.shared.privacy.audit`) and nothing
else: :data:`GRAD_SAMPLE_HOOKS` may append rows (gradient-space canaries, K rows per canary)
to the per-row gradients before the reduction, so canaries take the exact path of an
example; :data:`_INJECT_ROWS_CLIPPED_SEPARATELY` is a switch for the audit's own tests that
skips the reduction (every row clipped by Opacus on its own: the K*C trap above), to prove
the audit catches it. No command line or configuration reaches either.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dpfl.shared.errors import ConfigError
from dpfl.shared.ldm.diffusion import expand_draws, row_losses

#: callables ``hook(trainable_params, k)`` run after each physical backward pass and before
#: the reduction; only the privacy audit registers one (and removes it afterwards).
GRAD_SAMPLE_HOOKS: list[Callable[[list[torch.nn.Parameter], int], None]] = []
#: TEST-ONLY broken mechanism for the audit's tests: leave the K rows of each example
#: unreduced, so Opacus clips each row at C and one example moves the sum by K*C.
_INJECT_ROWS_CLIPPED_SEPARATELY = False


def physical_step(model: torch.nn.Module, scheduler, latents: torch.Tensor, labels: torch.Tensor,
                  k: int, generator: torch.Generator | None, null_class: int | None,
                  cond_drop: float) -> float:
    """Forward/backward of one physical batch with K draws per example; reduces the
    per-row gradients to per-example ones. Returns the (non-private) mean loss."""
    params = list(model.parameters())
    if latents.shape[0] == 0:
        mark_empty_batch(params)
        value = float("nan")
    else:
        noisy, t, y, target = expand_draws(latents, labels, scheduler, k, null_class,
                                           cond_drop, generator)
        loss = row_losses(model, noisy, t, y, target).mean()
        loss.backward()
        value = float(loss.detach())
    for hook in GRAD_SAMPLE_HOOKS:
        hook(_grad_sample_params(params), k)
    reduce_noise_multiplicity(params, k)
    return value


def reduce_noise_multiplicity(params: list[torch.nn.Parameter], k: int) -> None:
    """Average each example's K per-row gradients, in place, before Opacus clips.

    ``p.grad_sample`` of shape (B*K, ...) (example-major rows) becomes (B, ...). Must run
    after every backward pass and before ``optimizer.step()``.
    """
    if k == 1 or _INJECT_ROWS_CLIPPED_SEPARATELY:
        return
    for p in _grad_sample_params(params):
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise ConfigError("a trainable parameter has no per-sample gradient; was the loss "
                              "computed through the Opacus GradSampleModule?")
        parts = gs if isinstance(gs, list) else [gs]
        reduced = []
        for g in parts:
            if g.shape[0] % k:
                raise ConfigError(f"per-sample gradient has {g.shape[0]} rows, not a multiple "
                                  f"of noise multiplicity K={k}")
            reduced.append(g.view(g.shape[0] // k, k, *g.shape[1:]).mean(dim=1))
        p.grad_sample = reduced if isinstance(gs, list) else reduced[0]  # type: ignore[attr-defined]


def mark_empty_batch(params: list[torch.nn.Parameter]) -> None:
    """Give every trainable parameter an empty per-sample gradient (Poisson empty batch):
    the step then adds pure noise, as DP-SGD with Poisson sampling requires."""
    for p in _grad_sample_params(params):
        empty = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        p.grad_sample = empty  # type: ignore[attr-defined]


def _grad_sample_params(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.requires_grad]
