"""DP-SGD on the LDM's UNet: stock Opacus plus noise multiplicity, for LoRA adapters
(:func:`train_lora`) or for every UNet parameter (:func:`dpfl.shared.privacy.full.train_full`).

Papers: DPDM (Dockhorn et al., "Differentially Private Diffusion Models", TMLR 2023) for
noise multiplicity (:mod:`dpfl.shared.privacy.multiplicity`) and for training the whole
denoiser from scratch under DP-SGD (the baseline in :mod:`dpfl.shared.privacy.full`); DP-LDM
(Lyu et al., 2024) and DP-LoRA (Tsai et al., 2024) for fine-tuning only attention/projection
adapters of a public LDM; DP-SGD (Abadi et al., 2016) with Poisson sampling as implemented
by Opacus (Yousefpour et al., 2021). Both modes share one code path (:func:`dp_sgd`):
sampling, calibration, the ledger commit, the Opacus engine and the step-count checks.

Reading order: :class:`DPConfig` (the settings), :class:`DPRunStats` / :class:`TrainResult`
(what a call returns), :func:`train_lora` (the entry point), :func:`dp_sgd` (the one code
path) and its steps: :func:`_plan` (q, steps and σ, from the one step-count rule in
:mod:`dpfl.shared.privacy.poisson`), :func:`make_private` (the Opacus engine, whose loader
:func:`_check_loader` holds to the plan) and :func:`_run` (the loop over logical steps; each
physical batch is :func:`~dpfl.shared.privacy.multiplicity.physical_step`).

Known Opacus trap: its per-sample conv gradients assume contiguous inputs; convs after
diffusers' attention blocks get channels_last-strided tensors. Every trainable conv's input
is made contiguous (:func:`dpfl.shared.ldm.lora.make_conv_inputs_contiguous`), for LoRA convs
and, in full training, for every conv of the UNet. Every layer of diffusers'
``UNet2DModel`` (Conv2d, Linear, GroupNorm, Embedding; attention is Linear + GroupNorm) has
an Opacus grad sampler, so hooks mode needs no functorch fallback.

Privacy bookkeeping: the steps of a call are committed to the client's
:class:`~dpfl.shared.privacy.accountant.PersistentAccountant` (on disk) *before* training
starts, so ε is never under-reported, even after a crash; σ is calibrated for, and the
ledger records, exactly the steps Opacus' Poisson loader takes (checked against the loader
before the commit and against Opacus' own count after training). Only the noised, trained
tensors leave (adapter or UNet state); never per-example gradients or un-noised updates.
The reported ``mean_loss`` is computed on private data without noise: a local diagnostic,
not for sharing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.training_utils import EMAModel
from opacus import PrivacyEngine
from opacus.accountants.utils import MAX_SIGMA
from opacus.optimizers import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from peft import PeftModel
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from dpfl.shared.errors import ConfigError, DataError, StateError
from dpfl.shared.ldm.lora import (
    LoraSpec,
    adapter_state,
    load_adapter_state,
    trainable_count,
    wrap_unet,
)
from dpfl.shared.ldm.models import LatentDiffusion, resolve_device
from dpfl.shared.privacy import poisson
from dpfl.shared.privacy.accountant import KINDS, PersistentAccountant, epsilon_of
from dpfl.shared.privacy.choices import DEFAULT_ACCOUNTANT
from dpfl.shared.privacy.multiplicity import physical_step
from dpfl.shared.privacy.securenoise import make_secure

log = logging.getLogger(__name__)
#: callables ``hook(optimizer)`` run on each new DP optimizer; only the privacy audit
#: (dpfl.shared.privacy.audit) registers one, to read the noisy update of its canaries.
OPTIMIZER_HOOKS: list[Callable[[DPOptimizer], None]] = []
_EPS_TOLERANCE = 0.01  # calibration stops this close below the target ε (Opacus' default)
#: start of the warning ``PrivacyEngine(secure_mode=False)`` gives; not shown (only around the
#: engine's creation) when dpfl's own OS-CSPRNG noise replaces Opacus' secure mode, where it
#: would tell a site operator to turn on what is already on
OPACUS_INSECURE_RNG = "Secure RNG turned off"


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings of one local training call.

    Attributes:
        clip: per-example clipping norm C (> 0, default 1.0, as in DPDM).
        noise_multiplier: Gaussian noise σ (>= 0); noise std is σ*C on the summed clipped
            gradient. ``None`` (default): calibrate σ from ``target_epsilon``.
        target_epsilon: ε the whole planned run may reach (> 0); used to calibrate σ when
            ``noise_multiplier`` is None (default 10.0).
        delta: δ of (ε, δ)-DP (0 < δ, and < 1/n where n is the silo size; default 1e-5).
        accountant: ``prv`` (default; Gopi et al. 2021, the tighter bound: less noise for
            the same ε) or ``rdp`` (Mironov 2017); Opacus' accountants. σ is calibrated, and
            ε reported, with this one; it must be the client ledger's kind.
        batch_size: expected logical batch size under Poisson sampling (>= 1, default 256);
            the sample rate is 1 / ceil(n / batch_size) and an epoch takes the steps Opacus'
            Poisson loader takes (:func:`dpfl.shared.privacy.poisson.steps_per_epoch`).
        max_physical_batch: examples per forward/backward pass (>= 1, default 64); larger
            logical batches are split by Opacus' BatchMemoryManager (memory use grows with
            max_physical_batch * noise_multiplicity).
        noise_multiplicity: K draws of (timestep, noise) per example (>= 1, default 4).
        lr: Adam learning rate of the adapters (> 0, default 1e-3).
        epochs: passes over the silo in this call (>= 1, default 1).
        planned_steps: DP-SGD steps of the whole planned run (e.g. rounds x
            :func:`dpfl.shared.privacy.poisson.dp_steps`), used to calibrate σ; ``None``:
            this call's steps.
        cond_drop: probability a row trains the null class (classifier-free guidance;
            0 <= p < 1, default 0.1).
        secure_mode: DP noise from the OS CSPRNG with Opacus' secure-mode construction
            against floating-point attacks (``dpfl.shared.privacy.securenoise``), and the
            Poisson sampling from it too (``dpfl.shared.privacy.poisson.secure_loader``);
            default False, which logs a warning: fine for research, not for deployment.
        seed: seed of the diffusion (timestep, noise) draws only; the Poisson sampler and
            the DP noise always come from OS entropy (a recorded seed would let anyone
            regenerate them and void the guarantee).
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``.
    """

    clip: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = 10.0
    delta: float = 1e-5
    accountant: str = DEFAULT_ACCOUNTANT
    batch_size: int = 256
    max_physical_batch: int = 64
    noise_multiplicity: int = 4
    lr: float = 1e-3
    epochs: int = 1
    planned_steps: int | None = None
    cond_drop: float = 0.1
    secure_mode: bool = False
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"clip (C) must be a finite number > 0, got {self.clip!r}")
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ConfigError("give noise_multiplier (sigma) or target_epsilon to calibrate it")
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if self.target_epsilon is not None and not (self.target_epsilon > 0
                                                    and math.isfinite(self.target_epsilon)):
            raise ConfigError(f"target_epsilon must be a finite number > 0, got "
                              f"{self.target_epsilon!r}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in KINDS:
            raise ConfigError(f"accountant must be one of {sorted(KINDS)}, got {self.accountant!r}")
        for name in ("batch_size", "max_physical_batch", "noise_multiplicity", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.planned_steps is not None and (not isinstance(self.planned_steps, int)
                                               or self.planned_steps < 1):
            raise ConfigError(f"planned_steps must be an integer >= 1, got {self.planned_steps!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.cond_drop < 1:
            raise ConfigError(f"cond_drop must be in [0, 1), got {self.cond_drop!r}")

    def check_dataset(self, n: int) -> None:
        """Checks that need the silo size n."""
        if n < 1:
            raise ConfigError("the silo holds no examples; nothing to train on")
        if self.delta >= 1.0 / n:
            raise ConfigError(f"delta={self.delta:g} must be < 1/n = {1.0 / n:.3g} for a silo of "
                              f"{n} examples (a larger delta permits leaking whole examples); "
                              "lower delta")
        if self.batch_size > n:
            raise ConfigError(f"batch_size={self.batch_size} exceeds the silo size {n}; lower it")


@dataclass(frozen=True, kw_only=True)
class DPRunStats:
    """Privacy and progress figures of one DP-SGD call (nothing per-example, nothing un-noised).

    Attributes:
        examples: silo size n.
        steps: DP-SGD steps taken in this call.
        sigma: noise multiplier σ used.
        sample_rate: Poisson sampling rate q.
        epsilon: total ε this client has spent so far (all calls), at ``delta``.
        delta: δ of the accountant.
        mean_loss: mean training loss of the call (non-private diagnostic; keep local).
        history: per-step records (step, loss) and per-epoch records (epoch, epsilon).
    """

    examples: int
    steps: int
    sigma: float
    sample_rate: float
    epsilon: float
    delta: float
    mean_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class TrainResult(DPRunStats):
    """What :func:`train_lora` returns: ``adapter``, the trained adapter tensors (peft
    state-dict keys, on CPU), ``model``, the trained peft model itself (on CPU, Opacus'
    hooks removed; save it with :func:`dpfl.shared.ldm.lora.save_adapter`), and the
    :class:`DPRunStats` fields."""

    adapter: dict[str, torch.Tensor]
    model: PeftModel


# -- the entry point ----------------------------------------------------------------------
def train_lora(ldm: LatentDiffusion, latents: torch.Tensor, labels: torch.Tensor, lora: LoraSpec,
               dp: DPConfig, accountant: PersistentAccountant,
               init_adapter: dict[str, torch.Tensor] | None = None,
               progress: bool = True, ema_decay: float = 0.0) -> TrainResult:
    """DP-SGD on LoRA adapters of (a copy of) ``ldm.unet``; ``ldm`` itself is not modified.

    ``latents``/``labels`` come from :func:`dpfl.shared.data.encode.encode_silo`. Commits
    the call's steps to ``accountant`` (durably) before training; raises
    :class:`~dpfl.shared.errors.BudgetExhausted` if they would exceed its budget.
    ``ema_decay`` > 0: the adapters returned are the exponential moving average of the DP
    iterates (diffusers' ``EMAModel`` with warm-up; averaging DP iterates is post-processing
    and costs no privacy; DPDM samples from an EMA too). 0 (default): the last iterate.
    """
    if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) \
            or not 0 <= ema_decay < 1:
        raise ConfigError(f"ema_decay must be a number in [0, 1) (0 disables the EMA), got "
                          f"{ema_decay!r}")
    check_silo(latents, labels, dp)
    model = wrap_unet(ldm.unet, lora).to(resolve_device(dp.device))
    if init_adapter is not None:
        load_adapter_state(model, init_adapter)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(trainable, decay=ema_decay, use_ema_warmup=True) if ema_decay > 0 else None
    after_step = (lambda: ema.step(trainable)) if ema is not None else None
    stats = dp_sgd(ldm, model, latents, labels, dp, accountant, progress, "DP-LoRA", after_step)
    if ema is not None:
        ema.copy_to(trainable)
    model.to("cpu")
    return TrainResult(adapter=adapter_state(model), model=model, **stats)


def check_silo(latents: torch.Tensor, labels: torch.Tensor, dp: DPConfig) -> None:
    """Labels fit the latents, and the silo size fits ``dp`` (δ < 1/n, batch <= n)."""
    n = int(latents.shape[0])
    if labels.shape != (n,):
        raise DataError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    dp.check_dataset(n)


# -- the one DP-SGD code path -------------------------------------------------------------
def dp_sgd(ldm: LatentDiffusion, model: torch.nn.Module, latents: torch.Tensor,
           labels: torch.Tensor, dp: DPConfig, accountant: PersistentAccountant,
           progress: bool, label: str,
           after_step: Callable[[], None] | None = None) -> dict[str, Any]:
    """The one DP-SGD code path of every mode: trains, in place, the parameters of ``model``
    (already on its device) that require grad; ``after_step`` runs after each logical step's
    update (e.g. an EMA). Checks that Opacus' loader takes the planned steps, commits them to
    ``accountant`` before the first one and checks that Opacus took exactly that many.
    Returns the :class:`DPRunStats` fields; ``model`` is left without Opacus' hooks."""
    n = int(latents.shape[0])
    dev = next(model.parameters()).device
    model.train()
    n_train = trainable_count(model)
    # Poisson sampling must be secret too (amplification by subsampling assumes nobody knows
    # which examples were drawn): seed it from OS entropy, never from the recorded seed (in
    # secure mode make_private draws it from the OS CSPRNG itself).
    data_gen = torch.Generator().manual_seed(secrets.randbits(63))
    loader = DataLoader(TensorDataset(latents.float(), labels.long()), batch_size=dp.batch_size,
                        generator=data_gen)
    q, steps, sigma = _plan(n, dp, accountant)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=dp.lr)
    engine, gsm, opt, dl = make_private(model, optimizer, loader, dp, sigma, dev)
    _check_loader(dl, q, steps // dp.epochs)
    prior = list(accountant.history)
    accountant.commit(sigma, q, steps)  # durable before any step is taken
    log.info("%s: n=%d, %d trainable parameters, q=%.5f (expected batch %d), sigma=%.4f, "
             "C=%g, K=%d, %d steps", label, n, n_train, q, opt.expected_batch_size, sigma,
             dp.clip, dp.noise_multiplicity, steps)

    def epsilon_at(done: int) -> float:
        return epsilon_of(prior + [(sigma, q, done)], accountant.delta, accountant.kind)

    history = _run(ldm, gsm, opt, dl, dp, steps, progress, epsilon_at, label, after_step)
    taken = sum(h[2] for h in engine.accountant.history)
    if taken != steps:
        raise StateError(f"Opacus took {taken} steps but {steps} were committed to the ledger; "
                         "refusing to return the trained weights")
    gsm.cleanup()  # hooks and per-sample gradients off the trained model
    losses = [h["loss"] for h in history if "loss" in h and math.isfinite(h["loss"])]
    return dict(examples=n, steps=steps, sigma=sigma, sample_rate=q,
                epsilon=accountant.epsilon(), delta=accountant.delta,
                mean_loss=float(sum(losses) / len(losses)) if losses else float("nan"),
                history=history)


def _plan(n: int, dp: DPConfig, accountant: PersistentAccountant) -> tuple[float, int, float]:
    """(sample rate, steps of this call, σ), after checking the accountant matches. Steps
    and q follow Opacus' Poisson loader (:mod:`dpfl.shared.privacy.poisson`)."""
    if accountant.kind != dp.accountant or accountant.delta != dp.delta:
        raise ConfigError(f"DPConfig asks for accountant={dp.accountant}, delta={dp.delta:g} but "
                          f"the client's ledger {accountant.path} uses {accountant.kind}, "
                          f"delta={accountant.delta:g}; they must agree")
    q = poisson.sample_rate(n, dp.batch_size)
    steps = poisson.dp_steps(n, dp.batch_size, dp.epochs)
    planned = dp.planned_steps if dp.planned_steps is not None else steps
    if planned < steps:
        raise ConfigError(f"planned_steps={planned} is fewer than this call's {steps} steps "
                          f"({dp.epochs} epoch(s) x {steps // dp.epochs} steps); plan the "
                          "whole run")
    if dp.noise_multiplier is not None:
        sigma = float(dp.noise_multiplier)
    elif dp.target_epsilon is not None:
        sigma = calibrate_sigma(dp.target_epsilon, dp.delta, q, planned, dp.accountant)
        log.info("calibrated sigma=%.4f for eps=%g, delta=%g over %d planned steps at q=%.5f",
                 sigma, dp.target_epsilon, dp.delta, planned, q)
    else:  # DPConfig refuses this; kept so that no path runs without a σ
        raise ConfigError("give noise_multiplier (sigma) or target_epsilon to calibrate it")
    return q, steps, sigma


def calibrate_sigma(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = DEFAULT_ACCOUNTANT,
                    prior: list[tuple[float, float, int]] | None = None) -> float:
    """σ so that ``steps`` Poisson-sampled steps at rate q reach at most (ε, δ) under the
    given accountant (:func:`epsilon_of`, the ε the ledger will report): Opacus' search
    (``get_noise_multiplier``: double σ from 20 until ε <= target, then narrow the bracket
    until ε is within its tolerance below the target) with safeguarded secant steps
    instead of halving, so that a PRV calibration costs a handful of evaluations. A σ the
    accountant refuses (too small for ``prv``) or a NaN ε counts as too little noise, so
    calibration never runs the accountant out of memory. The σ returned is always one
    whose ε was computed and found below the target. ``prior``: mechanisms the same ledger
    holds before these steps, (σ, q, steps) each (a class-means release, say): the target
    is then the ε of all of them together."""
    before = list(prior or [])

    def eps(sigma: float) -> float:
        try:
            e = epsilon_of(before + [(sigma, sample_rate, steps)], delta, accountant)
        except ConfigError:
            return math.inf
        return math.inf if math.isnan(e) else e

    low, eps_low, high = 0.0, math.inf, 20.0
    eps_high = eps(high)
    while not eps_high <= target_epsilon:
        low, eps_low, high = high, eps_high, high * 2
        if high > MAX_SIGMA:
            raise ConfigError(f"no sigma up to {MAX_SIGMA:g} reaches epsilon={target_epsilon:g} "
                              f"at delta={delta:g} over {steps} steps at q={sample_rate:.4g} "
                              f"with the {accountant} accountant; raise the budget or train "
                              "fewer steps")
        eps_high = eps(high)
    # stop on ε's tolerance (Opacus' rule) or when the bracket is exhausted: ε(σ) may jump
    # (a refused or NaN σ just below a usable one), and ``high`` always satisfies the target
    aim, tries = target_epsilon - _EPS_TOLERANCE / 2, 0
    while target_epsilon - eps_high > _EPS_TOLERANCE and high - low > 1e-9 * high:
        tries += 1  # every third step bisects: the bracket at least halves every three steps
        mid = _secant_step(low, high, eps_low, eps_high, aim, bisect=tries % 3 == 0)
        e = eps(mid)
        if e < target_epsilon:
            high, eps_high = mid, e
        else:
            low, eps_low = mid, e
    return float(high)


def _secant_step(low: float, high: float, eps_low: float, eps_high: float, aim: float,
                 bisect: bool) -> float:
    """The next σ inside (low, high). ``bisect``, or when σ_low was refused (infinite or
    NaN ε): the midpoint. Otherwise where the line through (log σ, log ε) at ``low`` and
    ``high`` meets ``aim`` (ε of a subsampled Gaussian is close to a power of σ; with
    nothing evaluated below ``high`` yet, the slope is taken as -1, ε ∝ 1/σ), kept a tenth
    of the bracket away from its ends."""
    width = high - low
    if bisect or not (eps_high > 0 and aim > 0) or (low > 0 and not eps_low > eps_high):
        return low + width / 2
    slope = -1.0
    if low > 0:
        slope = (math.log(eps_low) - math.log(eps_high)) / (math.log(low) - math.log(high))
    guess = high * math.exp((math.log(aim) - math.log(eps_high)) / slope)
    return min(max(guess, low + width / 10), high - width / 10)


def make_private(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 loader: torch.utils.data.DataLoader, dp: DPConfig, sigma: float,
                 device: torch.device):
    """Opacus PrivacyEngine with Poisson sampling, flat clipping at C and noise σ; in
    secure mode the noise and the sampling come from the OS CSPRNG."""
    # Opacus' own secure mode needs torchcsprng (no release for current torch); the secure
    # noise source and Poisson sampler are swapped in below instead
    # (dpfl.shared.privacy.securenoise, dpfl.shared.privacy.poisson.secure_loader).
    # Opacus warns that *its* secure RNG is off; in secure mode dpfl's own noise is secure
    with _without_opacus_rng_warning() if dp.secure_mode else contextlib.nullcontext():
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=False)
    if dp.secure_mode:
        noise_gen = None
    else:
        log.warning("*** secure_mode is OFF: DP noise and Poisson sampling come from torch's "
                    "PRNG (seeded from OS "
                    "entropy), fine for research but NOT a cryptographic guarantee. Turn "
                    "secure_mode on for deployment. ***")
        # Never derive the noise from ``dp.seed``: that seed is in the run's config.json, and
        # noise anyone can regenerate and subtract protects nothing. OS entropy instead.
        noise_gen = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    gsm, opt, dl = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                       noise_multiplier=sigma, max_grad_norm=dp.clip,
                                       poisson_sampling=True, loss_reduction="mean",
                                       grad_sample_mode="hooks", noise_generator=noise_gen)
    if not isinstance(opt, DPOptimizer):
        raise ConfigError(f"Opacus returned {type(opt).__name__}, expected a DPOptimizer")
    if dp.secure_mode:  # noise and Poisson sampling both from the OS CSPRNG
        opt, dl = make_secure(opt), poisson.secure_loader(dl)
    for hook in OPTIMIZER_HOOKS:
        hook(opt)
    return engine, gsm, opt, dl


@contextlib.contextmanager
def _without_opacus_rng_warning() -> Iterator[None]:
    """Opacus' "Secure RNG turned off" warning is not shown inside this block; every other
    warning is. Done at ``warnings.showwarning`` (the documented hook), not with a warnings
    filter: changing the filters resets Python's once-per-place memory of every module, and
    other warnings would then repeat each round."""
    show = warnings.showwarning

    def unless_opacus_rng(message, category, filename, lineno, file=None, line=None):
        if not (issubclass(category, UserWarning) and "opacus" in str(filename)
                and str(message).startswith(OPACUS_INSECURE_RNG)):
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = unless_opacus_rng
    try:
        yield
    finally:
        warnings.showwarning = show


def _check_loader(dl: DataLoader, q: float, per_epoch: int) -> None:
    """Refuse, before anything is committed, when Opacus' loader would sample at another
    rate or take another number of steps than σ was calibrated for."""
    rate = getattr(dl, "sample_rate", None)
    if rate != q or len(dl) != per_epoch:
        raise StateError(f"Opacus' Poisson loader samples at q={rate} for {len(dl)} steps per "
                         f"epoch, but q={q} and {per_epoch} steps were planned "
                         "(dpfl.shared.privacy.poisson); nothing was committed or trained")


def _run(ldm: LatentDiffusion, gsm, opt: DPOptimizer, dl: DataLoader, dp: DPConfig, steps: int,
         progress: bool, epsilon_at: Callable[[int], float], label: str,
         after_step: Callable[[], None] | None) -> list[dict[str, Any]]:
    """The training loop: ``dp.epochs`` passes of the Poisson loader, split into physical
    batches; returns per-step (loss) and per-epoch (ε) records."""
    dev = next(gsm.parameters()).device
    draw_gen = torch.Generator().manual_seed(dp.seed + 1)
    done: list[int] = []
    previous_hook = opt.step_hook

    def count_step(o: DPOptimizer) -> None:
        if previous_hook is not None:
            previous_hook(o)
        done.append(1)

    opt.attach_step_hook(count_step)
    history: list[dict[str, Any]] = []
    bar = tqdm(total=steps, desc=label, disable=not progress)
    t0, rows, loss_sum = time.time(), 0, 0.0
    with BatchMemoryManager(data_loader=dl, max_physical_batch_size=dp.max_physical_batch,
                            optimizer=opt) as mem_loader:
        for epoch in range(dp.epochs):
            for z, y in mem_loader:
                before = len(done)
                loss = physical_step(gsm, ldm.scheduler, z.to(dev), y.to(dev),
                                     dp.noise_multiplicity, draw_gen, ldm.spec.null_class,
                                     dp.cond_drop)
                if z.shape[0]:
                    rows, loss_sum = rows + z.shape[0], loss_sum + loss * z.shape[0]
                opt.step()
                opt.zero_grad(set_to_none=True)
                if len(done) > before:  # a logical step ended (its update is applied)
                    if after_step is not None:
                        after_step()
                    rec = {"step": len(done), "epoch": epoch + 1, "examples": rows,
                           "loss": loss_sum / rows if rows else float("nan"),
                           "seconds": round(time.time() - t0, 3)}
                    history.append(rec)
                    bar.update(1)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}")
                    rows, loss_sum = 0, 0.0
            history.append({"epoch": epoch + 1, "step": len(done),
                            "epsilon": epsilon_at(len(done))})
    bar.close()
    return history
