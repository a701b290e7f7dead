"""Torch-free sampling from an ONNX bundle (see :mod:`dpfl.shared.export.onnx_bundle`).

numpy + onnxruntime + Pillow only: nothing here (or in what it imports) may import torch,
so a device needs neither torch nor diffusers. Classifier-free guidance (Ho & Salimans,
2022) runs the conditional and unconditional halves as one batch of 2N through one UNet call,
on buffers bound once (onnxruntime IO binding); an edge adapter
(:mod:`dpfl.shared.edge.adapter`) is bound once too. Solvers, for a v- or epsilon-predicting
model:

- ``ddim``: deterministic DDIM, eta = 0 (Song, Meng & Ermon, "Denoising Diffusion Implicit
  Models", ICLR 2021), the same update and timesteps as diffusers' ``DDIMScheduler``, so the
  output matches :func:`dpfl.shared.ldm.diffusion.ddim_sample` from the same noise.
- ``dpmpp2m``: DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et
  al., "DPM-Solver++", 2022), first order at the first and the final step; on the same
  timesteps as DDIM. It matches diffusers' ``DPMSolverMultistepScheduler`` (``solver_order=2``,
  ``lower_order_final``, ``final_sigmas_type="zero"``) given the same timesteps.
- ``unipc``: UniPC with the B(h) = e^h - 1 ("bh2") variant, second order, data prediction
  (Zhao et al., "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
  Diffusion Models", NeurIPS 2023): every model output first corrects the sample it was
  evaluated at, then predicts the next one, so the corrector costs no extra UNet call. It
  matches diffusers' ``UniPCMultistepScheduler`` (``solver_order=2``, ``final_sigmas_type=
  "zero"``) on the same timesteps; with trailing spacing it reaches at 10 steps what DDIM
  reaches at 20 (``docs/on-device.md``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpfl.shared.defaults import TIMESTEP_SPACINGS
from dpfl.shared.edge.adapter import EdgeAdapter
from dpfl.shared.errors import ConfigError, IncompatibleAdapter, ModelError

log = logging.getLogger(__name__)

BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "dpfl-onnx-bundle/1"
SOLVERS = ("ddim", "dpmpp2m", "unipc")
SPACINGS = TIMESTEP_SPACINGS

Predict = Callable[[np.ndarray, int], np.ndarray]  # (x, t) -> guided model output


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings.

    Attributes:
        steps: int, default 50, 1..num_train_timesteps. Solver steps: UNet calls per batch
            (each on 2x the images when ``guidance != 1``).
        guidance: float, default 1.0, >= 0. Classifier-free guidance scale; 1 is plain
            conditional sampling, larger values push samples toward their class.
        solver: "ddim" (default), "dpmpp2m" or "unipc".
        seed: int, default 0. Seeds numpy's generator for the initial noise.
        batch_size: int, default 64, >= 1. Images per ONNX call batch.
        spacing: None (default: the bundle scheduler's ``timestep_spacing``), "leading",
            "trailing" or "linspace". Where the steps sit in [0, 1000). ``trailing`` starts
            every run at the last training timestep, which ``leading`` (the diffusers
            default) only approaches as steps grow; with it DPM-Solver++ at 12 steps is as
            close to a 200-step reference as DDIM at 20, and UniPC at 10
            (``docs/on-device.md``).
    """

    steps: int = 50
    guidance: float = 1.0
    solver: str = "ddim"
    seed: int = 0
    batch_size: int = 64
    spacing: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.guidance, (int, float)) or self.guidance < 0:
            raise ConfigError(f"guidance must be a number >= 0, got {self.guidance!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown solver {self.solver!r}; choose one of {SOLVERS}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ConfigError(f"unknown timestep spacing {self.spacing!r}; choose one of "
                              f"{SPACINGS} (or none for the bundle's)")

    def schedule(self, sched: dict[str, Any]) -> dict[str, Any]:
        """The bundle's scheduler config with this config's spacing, if any, in force."""
        return sched if self.spacing is None else {**sched, "timestep_spacing": self.spacing}


# -- schedule -----------------------------------------------------------------------------

def alphas_cumprod(sched: dict[str, Any]) -> np.ndarray:
    """Cumulative product of alphas from a diffusers scheduler config (float64)."""
    n = int(sched["num_train_timesteps"])
    kind = sched.get("beta_schedule", "linear")
    if sched.get("trained_betas") is not None:
        betas = np.asarray(sched["trained_betas"], dtype=np.float64)
    elif kind == "linear":
        betas = np.linspace(sched["beta_start"], sched["beta_end"], n, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, n) ** 2
    elif kind == "squaredcos_cap_v2":
        def bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)])
    else:
        raise ConfigError(f"bundle scheduler has beta_schedule {kind!r}; the edge sampler "
                          "supports linear, scaled_linear and squaredcos_cap_v2")
    if sched.get("rescale_betas_zero_snr") or sched.get("thresholding"):
        raise ConfigError("bundle scheduler uses rescale_betas_zero_snr/thresholding, which "
                          "the edge sampler does not implement; export without them")
    return np.cumprod(1.0 - betas)


def timesteps(sched: dict[str, Any], steps: int) -> np.ndarray:
    """Descending timesteps exactly as diffusers' ``DDIMScheduler.set_timesteps``."""
    n = int(sched["num_train_timesteps"])
    if steps > n:
        raise ConfigError(f"steps={steps} exceeds the {n} training timesteps")
    spacing = sched.get("timestep_spacing", "leading")
    offset = int(sched.get("steps_offset", 0))
    if spacing == "leading":
        ts: np.ndarray = (np.arange(steps) * (n // steps)).round()[::-1] + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / steps)) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, n - 1, steps).round()[::-1]
    else:
        raise ConfigError(f"unsupported timestep_spacing {spacing!r}")
    return ts.astype(np.int64)


def _x0_eps(out: np.ndarray, x: np.ndarray, a: float, pred: str) -> tuple[np.ndarray, np.ndarray]:
    sa, sb = math.sqrt(a), math.sqrt(1 - a)
    if pred == "v_prediction":
        return sa * x - sb * out, sa * out + sb * x
    if pred == "epsilon":
        return (x - sb * out) / sa, out
    if pred == "sample":
        return out, (x - sa * out) / sb
    raise ConfigError(f"unsupported prediction_type {pred!r}")


def _unipc_update(x: np.ndarray, m: list[np.ndarray], lam: list[float], lam_t: float,
                  a_t: float, s_t: float, s_0: float, m_t: np.ndarray | None) -> np.ndarray:
    """One UniPC-bh2 update in data prediction from the sample ``x`` at the point with
    log-SNR ``lam[-1]`` (data prediction ``m[-1]``) to log-SNR ``lam_t`` (alpha ``a_t``, sigma
    ``s_t``; ``s_0`` is sigma at ``x``). ``m``/``lam`` hold the last ``order`` points, oldest
    first. ``m_t`` None: the predictor (UniP); else the corrector (UniC) with ``m_t`` the
    data prediction at the predicted point."""
    order = len(m)
    h = lam_t - lam[-1]
    hh = -h
    phi1 = math.expm1(hh)
    b_h = phi1  # bh2
    base = s_t / s_0 * x - a_t * phi1 * m[-1]
    # divided differences of the older points, at r_k = (lambda_k - lambda_0) / h
    r = [(lam[-1 - k] - lam[-1]) / h for k in range(1, order)]
    d = [(m[-1 - k] - m[-1]) / rk for k, rk in zip(range(1, order), r)]
    if m_t is None and order == 1:
        return base
    # b_k = k! phi_{k+1}(hh) / B(h), the coefficients of the order conditions
    coef, phik, fact = [], phi1 / hh - 1, 1
    for k in range(1, order + 1):
        coef.append(phik * fact / b_h)
        fact *= k + 1
        phik = phik / hh - 1 / fact
    if m_t is None:  # predictor of order p uses the first p - 1 conditions
        rho = [0.5] if order == 2 else list(np.linalg.solve(
            np.array([[rk ** i for rk in r] for i in range(order - 1)]), coef[:order - 1]))
        return base - a_t * b_h * sum(w * dk for w, dk in zip(rho, d))
    if order == 1:
        rho = [0.5]
    else:
        nodes = [*r, 1.0]
        rho = list(np.linalg.solve(np.array([[rk ** i for rk in nodes] for i in range(order)]),
                                   coef[:order]))
    corr = sum(w * dk for w, dk in zip(rho[:-1], d))
    return base - a_t * b_h * (corr + rho[-1] * (m_t - m[-1]))


def _lam(a: float) -> float:
    """log-SNR lambda = log(alpha / sigma) at alpha-bar ``a``."""
    return 0.5 * math.log(a / (1 - a))


class _DPMSolverPP:
    """DPM-Solver++(2M) updates; remembers the last data prediction and step size."""

    def __init__(self) -> None:
        self.prev_x0: np.ndarray | None = None
        self.prev_h = 0.0

    def step(self, x: np.ndarray, x0: np.ndarray, a_t: float, a_prev: float,
             last: bool) -> np.ndarray:
        if a_prev >= 1.0:  # sigma = 0 at the end: the solution is the data prediction
            return x0
        h = _lam(a_prev) - _lam(a_t)
        d = x0
        if self.prev_x0 is not None and not last:
            r = self.prev_h / h
            d = (1 + 0.5 / r) * x0 - (0.5 / r) * self.prev_x0
        self.prev_x0, self.prev_h = x0, h
        return math.sqrt((1 - a_prev) / (1 - a_t)) * x - math.sqrt(a_prev) * math.expm1(-h) * d


class _UniPC:
    """UniPC-bh2 (order 2) updates; remembers the last two data predictions and log-SNRs,
    the sample the last prediction started from, its alpha-bar and its order."""

    def __init__(self) -> None:
        self.m: list[np.ndarray] = []
        self.lam: list[float] = []
        self.last_x: np.ndarray | None = None
        self.last_a, self.order = 0.0, 0

    def step(self, x: np.ndarray, x0: np.ndarray, a_t: float, a_prev: float,
             remaining: int) -> np.ndarray:
        if self.last_x is not None:  # correct x with the model output just evaluated at it
            x = _unipc_update(self.last_x, self.m[-self.order:], self.lam[-self.order:],
                              _lam(a_t), math.sqrt(a_t), math.sqrt(1 - a_t),
                              math.sqrt(1 - self.last_a), x0)
        self.m, self.lam = [*self.m[-1:], x0], [*self.lam[-1:], _lam(a_t)]
        self.order = min(2, remaining, len(self.m))
        self.last_x, self.last_a = x, a_t
        if a_prev >= 1.0:
            return x0
        return _unipc_update(x, self.m[-self.order:], self.lam[-self.order:], _lam(a_prev),
                             math.sqrt(a_prev), math.sqrt(1 - a_prev), math.sqrt(1 - a_t), None)


def solve(predict: Predict, x: np.ndarray, sched: dict[str, Any], steps: int,
          solver: str = "ddim") -> np.ndarray:
    """Integrate from noise ``x`` to clean latents with ``predict(x, t)`` as the model."""
    acp = alphas_cumprod(sched)
    n = int(sched["num_train_timesteps"])
    final = 1.0 if sched.get("set_alpha_to_one", True) else float(acp[0])
    pred = sched.get("prediction_type", "epsilon")
    clip = float(sched.get("clip_sample_range", 1.0)) if sched.get("clip_sample") else None
    x = x.astype(np.float64)
    ts = timesteps(sched, steps)
    dpm, uni = _DPMSolverPP(), _UniPC()
    for i, t in enumerate(ts):
        if solver == "ddim":  # diffusers' DDIMScheduler.step, whatever the spacing
            prev_t = int(t) - n // steps
        else:  # the next timestep; the last step goes to sigma 0 (diffusers' final "zero")
            prev_t = int(ts[i + 1]) if i + 1 < len(ts) else -1
        a_t = float(acp[t])
        a_prev = float(acp[prev_t]) if prev_t >= 0 else final
        x0, eps = _x0_eps(predict(x.astype(np.float32), int(t)).astype(np.float64), x, a_t, pred)
        if clip is not None:
            x0 = np.clip(x0, -clip, clip)
        if solver == "ddim":
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
        elif solver == "unipc":
            x = uni.step(x, x0, a_t, a_prev, remaining=len(ts) - i)
        else:
            x = dpm.step(x, x0, a_t, a_prev, last=i == len(ts) - 1)
    return x.astype(np.float32)


# -- bundle -------------------------------------------------------------------------------

def session_options(threads: int = 0) -> Any:
    """onnxruntime settings of every sampler session: all graph optimisations (constant
    folding, fusions, the NCHWc convolution layout), ``threads`` intra-op threads (0: one per
    core), one inter-op thread and sequential execution (a UNet has no parallel branches
    worth a second pool), the memory arena and memory-pattern planning on."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.intra_op_num_threads = max(0, int(threads))
    opts.enable_cpu_mem_arena = True
    opts.enable_mem_pattern = True
    return opts


@dataclass(frozen=True)
class EdgeBundle:
    """An opened ONNX bundle: its metadata, one onnxruntime session per graph and, for an
    adapter-swappable base bundle, the edge adapter applied to it (None: the base model)."""

    path: Path
    meta: dict[str, Any]
    variant: str
    unet: Any
    decoder: Any
    adapter: EdgeAdapter | None = None

    @classmethod
    def load(cls, path: str | Path, variant: str = "fp32", threads: int = 0,
             adapter: str | Path | None = None) -> EdgeBundle:
        import onnxruntime as ort

        p = Path(path)
        meta = read_meta(p)
        variants = meta.get("variants", {})
        if variant not in variants:
            raise ModelError(f"bundle {p} has no {variant!r} variant; available: "
                             f"{sorted(variants)}")
        opened = EdgeAdapter.load(adapter) if adapter is not None else None
        if opened is not None and not meta.get("adapter_inputs"):
            raise IncompatibleAdapter(
                f"bundle {p} has its adapter merged in (or is a plain base export) and takes no "
                "adapter inputs; export the base with 'dpfl-server export BASE --lora-preset "
                "PRESET' and ship that once")
        files = variants[variant]["files"]
        opts = session_options(threads)
        sessions = [ort.InferenceSession(str(p / files[k]), opts,
                                         providers=["CPUExecutionProvider"])
                    for k in ("unet", "decoder")]
        if opened is not None:
            # inputs with a default are "overridable initializers" to onnxruntime
            args = [*sessions[0].get_inputs(), *sessions[0].get_overridable_initializers()]
            inputs = {i.name: list(i.shape) for i in args}
            opened.check_fits(meta.get("base_fingerprint"), inputs)
        return cls(p, meta, variant, sessions[0], sessions[1], adapter=opened)

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def null_class(self) -> int:
        return int(self.meta["null_class"])

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["latent"]["shape"])

    @property
    def privacy(self) -> dict[str, Any] | None:
        """The guarantee of the weights in use: the adapter's when one is applied."""
        return self.adapter.meta["privacy"] if self.adapter else self.meta.get("privacy")

    @property
    def adapter_fingerprint(self) -> str | None:
        if self.adapter is not None:
            return self.adapter.fingerprint
        return (self.meta.get("adapter") or {}).get("fingerprint")


def read_meta(path: Path) -> dict[str, Any]:
    f = path / BUNDLE_FILE
    if not f.is_file():
        raise ModelError(f"{path} is not an ONNX bundle (no {BUNDLE_FILE}); make one with "
                         "'dpfl-server export'")
    meta: dict[str, Any] = json.loads(f.read_text(encoding="utf-8"))
    if meta.get("format") != BUNDLE_FORMAT:
        raise ModelError(f"{f} has format {meta.get('format')!r}, this sampler reads "
                         f"{BUNDLE_FORMAT!r}; re-export with a matching dpfl version")
    return meta


class GuidedUNet:
    """``predict(x, t)`` for N images: one UNet call on preallocated buffers.

    With ``guidance != 1`` the batch is 2N rows, conditional labels then the null class,
    both halves on the same ``x``, and the result ``uncond + guidance * (cond - uncond)``.
    Inputs are onnxruntime values made once over numpy buffers that each step overwrites in
    place (the adapter's too, made once). Not IO binding: it cannot bind the adapter inputs,
    which onnxruntime counts as overridable initializers.
    """

    def __init__(self, bundle: EdgeBundle, labels: np.ndarray, guidance: float) -> None:
        from onnxruntime import OrtValue

        self.n, self.guidance = labels.shape[0], float(guidance)
        both = self.guidance != 1.0
        y = np.concatenate([labels, np.full_like(labels, bundle.null_class)]) if both else labels
        self.x = np.zeros((y.shape[0], *bundle.latent_shape), np.float32)
        self.t = np.zeros(y.shape[0], np.int64)
        self.y = np.ascontiguousarray(y, dtype=np.int64)
        self.session = bundle.unet
        feeds = {"sample": self.x, "timestep": self.t, "class_labels": self.y,
                 **(bundle.adapter.tensors if bundle.adapter else {})}
        self.values = {k: OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}

    def __call__(self, x: np.ndarray, t: int) -> np.ndarray:
        n = self.n
        self.x[:n] = x
        if self.x.shape[0] > n:
            self.x[n:] = x
        self.t.fill(t)
        out = self.session.run_with_ort_values(["out"], self.values)[0].numpy()
        if self.x.shape[0] == n:
            return out
        cond, uncond = out[:n], out[n:]
        return uncond + self.guidance * (cond - uncond)


def check_labels(bundle: EdgeBundle, labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    bad = labels[(labels < 0) | (labels >= len(bundle.class_names))]
    if bad.size:
        raise ConfigError(f"class labels {sorted(set(bad.tolist()))[:5]} are outside 0.."
                          f"{len(bundle.class_names) - 1} ({bundle.class_names})")
    return labels


def sample_images(bundle: EdgeBundle, labels: np.ndarray, config: SamplerConfig,
                  initial_noise: np.ndarray | None = None) -> np.ndarray:
    """Images (N, C, S, S) float32 in [-1, 1] for ``labels``.

    ``initial_noise`` (N, *latent_shape) fixes the starting latents; otherwise it is drawn
    from ``numpy.random.default_rng(config.seed)`` for all N at once, so the images do not
    depend on ``batch_size``.
    """
    labels = check_labels(bundle, labels)
    shape = (labels.shape[0], *bundle.latent_shape)
    if initial_noise is None:
        initial_noise = np.random.default_rng(config.seed).standard_normal(shape)
    noise = np.asarray(initial_noise, dtype=np.float32)
    if noise.shape != shape:
        raise ConfigError(f"initial_noise has shape {noise.shape}, expected {shape}")
    out = []
    sched = config.schedule(bundle.meta["scheduler"])
    for s in range(0, labels.shape[0], config.batch_size):
        y = labels[s:s + config.batch_size]
        z = solve(GuidedUNet(bundle, y, config.guidance), noise[s:s + config.batch_size],
                  sched, config.steps, config.solver)
        out.append(bundle.decoder.run(None, {"latents": z})[0])
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 1), np.float32)
