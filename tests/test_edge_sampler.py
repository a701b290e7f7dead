"""The torch-free sampler: schedule maths vs diffusers, parity with torch, no torch import."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UniPCMultistepScheduler,
)

from dpfl.shared.edge.sampler import (
    EdgeBundle,
    SamplerConfig,
    alphas_cumprod,
    sample_images,
    solve,
    timesteps,
)
from dpfl.shared.errors import ConfigError
from dpfl.shared.export.onnx_bundle import ExportConfig, export_bundle, merge_adapter
from dpfl.shared.ldm.diffusion import ddim_sample
from dpfl.shared.ldm.models import build_ldm
from dpfl.shared.privacy.guarantee import PrivacyGuarantee

from .test_export import make_adapter

# Stated tolerance: fp32 ONNX + numpy DDIM vs torch ddim_sample + decode, same noise.
IMAGE_ATOL = 1e-4


@pytest.fixture(scope="module")
def lora_bundle(tmp_path_factory, tiny_ldm):
    root = tmp_path_factory.mktemp("edge")
    adapter = make_adapter(tiny_ldm.unet, root / "lora", seed=3)
    path = export_bundle(tiny_ldm, root / "bundle", adapter_dir=adapter,
                         privacy=PrivacyGuarantee.from_values(2.0, 1e-5),
                         config=ExportConfig(parity_steps=2))
    return path, merge_adapter(tiny_ldm, adapter)


@pytest.mark.parametrize("kw", [
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="linear", timestep_spacing="trailing"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
         timestep_spacing="linspace", steps_offset=1),
])
def test_schedule_matches_diffusers(kw):
    ddim = DDIMScheduler(num_train_timesteps=1000, **kw)
    cfg = dict(ddim.config)
    np.testing.assert_allclose(alphas_cumprod(cfg), ddim.alphas_cumprod.numpy(), atol=2e-6)
    for steps in (1, 7, 50):
        ddim.set_timesteps(steps)
        np.testing.assert_array_equal(timesteps(cfg, steps), ddim.timesteps.numpy())


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_matches_torch_ddim_and_decode_from_same_noise(lora_bundle, tiny_ldm, guidance):
    path, merged = lora_bundle
    labels = torch.tensor([0, 3, 9, 5])
    noise = torch.randn(4, *tiny_ldm.latent_shape, generator=torch.Generator().manual_seed(7))
    z = ddim_sample(merged, tiny_ldm.scheduler, labels, tiny_ldm.latent_shape,
                    tiny_ldm.spec.null_class, steps=6, guidance=guidance, initial_noise=noise)
    ref = tiny_ldm.decode(z).numpy()
    bundle = EdgeBundle.load(path)
    got = sample_images(bundle, labels.numpy(), SamplerConfig(steps=6, guidance=guidance),
                        initial_noise=noise.numpy())
    assert got.shape == ref.shape == (4, 1, 28, 28)
    assert np.abs(got - ref).max() < IMAGE_ATOL


def test_spacing_option_matches_torch_with_that_spacing(lora_bundle, tiny_ldm):
    """``spacing="trailing"`` samples what diffusers' DDIM gives with a trailing scheduler,
    and differs from the bundle's own (leading) spacing; unknown spacings are refused."""
    path, merged = lora_bundle
    labels = torch.tensor([2, 7])
    noise = torch.randn(2, *tiny_ldm.latent_shape, generator=torch.Generator().manual_seed(3))
    trailing = DDPMScheduler.from_config(tiny_ldm.scheduler.config, timestep_spacing="trailing")
    z = ddim_sample(merged, trailing, labels, tiny_ldm.latent_shape, tiny_ldm.spec.null_class,
                    steps=5, guidance=2.0, initial_noise=noise)
    # the torch sampler's own option gives the same
    z2 = ddim_sample(merged, tiny_ldm.scheduler, labels, tiny_ldm.latent_shape,
                     tiny_ldm.spec.null_class, steps=5, guidance=2.0, initial_noise=noise,
                     spacing="trailing")
    torch.testing.assert_close(z2, z, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="spacing 'uniform'"):
        ddim_sample(merged, tiny_ldm.scheduler, labels, tiny_ldm.latent_shape,
                    tiny_ldm.spec.null_class, steps=5, spacing="uniform")
    bundle = EdgeBundle.load(path)
    assert bundle.meta["scheduler"]["timestep_spacing"] == "leading"
    got = sample_images(bundle, labels.numpy(), SamplerConfig(steps=5, guidance=2.0,
                                                              spacing="trailing"),
                        initial_noise=noise.numpy())
    assert np.abs(got - tiny_ldm.decode(z).numpy()).max() < IMAGE_ATOL
    own = sample_images(bundle, labels.numpy(), SamplerConfig(steps=5, guidance=2.0),
                        initial_noise=noise.numpy())
    assert np.abs(got - own).max() > 100 * IMAGE_ATOL
    with pytest.raises(ConfigError, match="spacing 'uniform'"):
        SamplerConfig(spacing="uniform")


def test_epsilon_prediction_model_matches_torch(tmp_path):
    ldm = build_ldm("tiny", seed=2)
    ldm.scheduler = DDPMScheduler.from_config(ldm.scheduler.config, prediction_type="epsilon")
    path = export_bundle(ldm, tmp_path / "eps", config=ExportConfig(parity_steps=2))
    bundle = json.loads((path / "bundle.json").read_text())
    assert bundle["scheduler"]["prediction_type"] == "epsilon"
    labels = torch.tensor([1, 2])
    noise = torch.randn(2, *ldm.latent_shape, generator=torch.Generator().manual_seed(1))
    z = ddim_sample(ldm.unet, ldm.scheduler, labels, ldm.latent_shape, ldm.spec.null_class,
                    steps=5, guidance=2.0, initial_noise=noise)
    got = sample_images(EdgeBundle.load(path), labels.numpy(), SamplerConfig(steps=5, guidance=2.0),
                        initial_noise=noise.numpy())
    assert np.abs(got - ldm.decode(z).numpy()).max() < IMAGE_ATOL


def test_dpm_solver_pp_beats_ddim_on_gaussian_data():
    """Data ~ N(0, s^2): the exact denoiser and the exact ODE solution are known in closed
    form (x_0 = x_T * s / sqrt(a_T s^2 + 1 - a_T)); the second-order solver converges
    faster: at 50 steps its error is clearly below DDIM's."""
    sched = dict(DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                               clip_sample=False).config)
    acp = alphas_cumprod(sched)
    s = 0.5

    def predict(x, t):  # epsilon of the exact denoiser
        a = acp[t]
        x0 = math.sqrt(a) * s * s / (a * s * s + 1 - a) * x
        return ((x - math.sqrt(a) * x0) / math.sqrt(1 - a)).astype(np.float32)

    a_t = acp[timesteps(sched, 50)[0]]
    x_t = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float32)
    exact = x_t * s / math.sqrt(a_t * s * s + 1 - a_t)
    err = {k: np.abs(solve(predict, x_t, sched, 50, k) - exact).max() for k in ("ddim", "dpmpp2m")}
    assert err["dpmpp2m"] < 0.75 * err["ddim"] and err["dpmpp2m"] < 0.05, err


@pytest.mark.parametrize("pred, spacing", [("v_prediction", "leading"), ("epsilon", "leading"),
                                           ("v_prediction", "trailing"),
                                           ("v_prediction", "linspace")])
def test_dpm_solver_pp_matches_diffusers_multistep_scheduler(pred, spacing):
    """Same timesteps, same model: our numpy DPM-Solver++(2M) and diffusers'
    DPMSolverMultistepScheduler (second order, first order at the last step to sigma 0)."""
    cfg = dict(DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=pred,
                             clip_sample=False, timestep_spacing=spacing).config)
    steps = 12
    dpm = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++",
                                                  solver_order=2, lower_order_final=True,
                                                  final_sigmas_type="zero")
    dpm.set_timesteps(timesteps=timesteps(cfg, steps).tolist())

    def model(x, t):  # smooth, t-dependent, non-linear: exercises every term of the update
        return (np.tanh(x) * (0.3 + t / 1000) + 0.1 * np.sin(3 * x)).astype(np.float32)

    x_t = np.random.default_rng(4).standard_normal((3, 4, 8, 8)).astype(np.float32)
    x = torch.from_numpy(x_t.copy())
    for t in dpm.timesteps:
        x = dpm.step(torch.from_numpy(model(x.numpy(), int(t))), t, x).prev_sample
    np.testing.assert_allclose(solve(model, x_t, cfg, steps, "dpmpp2m"), x.numpy(), atol=1e-4)


@pytest.mark.parametrize("pred, betas", [("v_prediction", "squaredcos_cap_v2"),
                                         ("epsilon", "linear"), ("sample", "scaled_linear")])
@pytest.mark.parametrize("steps", [1, 2, 3, 10])
def test_unipc_matches_diffusers_unipc_scheduler(pred, betas, steps):
    """Our numpy UniPC (bh2, order 2, predictor + corrector) and diffusers'
    UniPCMultistepScheduler, trailing spacing (where its timesteps equal DDIM's)."""
    cfg = dict(DDIMScheduler(beta_schedule=betas, prediction_type=pred, clip_sample=False,
                             timestep_spacing="trailing").config)
    uni = UniPCMultistepScheduler.from_config(cfg, solver_order=2, final_sigmas_type="zero")
    uni.set_timesteps(steps)
    np.testing.assert_array_equal(uni.timesteps.numpy(), timesteps(cfg, steps))

    def model(x, t):
        return (np.tanh(x) * (0.3 + t / 1000) + 0.1 * np.sin(3 * x)).astype(np.float32)

    x_t = np.random.default_rng(4).standard_normal((3, 4, 8, 8)).astype(np.float32)
    x = torch.from_numpy(x_t.copy())
    for t in uni.timesteps:
        x = uni.step(torch.from_numpy(model(x.numpy(), int(t))), t, x).prev_sample
    ref = x.numpy()
    # diffusers computes in float32; at t = 999 an epsilon model divides by alpha ~ 0.006
    np.testing.assert_allclose(solve(model, x_t, cfg, steps, "unipc"), ref,
                               atol=2e-6 * max(1.0, float(np.abs(ref).max())))
    if steps > 2:  # the corrector changes a sample the model sees again: other numbers
        assert np.abs(solve(model, x_t, cfg, steps, "dpmpp2m") - ref).max() > 1e-3


def test_unipc_converges_on_gaussian_data_faster_than_ddim():
    """The exact-denoiser problem of the DPM-Solver++ test, at 10 trailing steps."""
    sched = dict(DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                               clip_sample=False, timestep_spacing="trailing").config)
    acp = alphas_cumprod(sched)
    s = 0.5

    def predict(x, t):  # v of the exact denoiser
        a = acp[t]
        x0 = math.sqrt(a) * s * s / (a * s * s + 1 - a) * x
        eps = (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
        return (math.sqrt(a) * eps - math.sqrt(1 - a) * x0).astype(np.float32)

    a_t = acp[timesteps(sched, 10)[0]]
    x_t = np.random.default_rng(0).standard_normal((256, 4)).astype(np.float32)
    exact = x_t * s / math.sqrt(a_t * s * s + 1 - a_t)
    err = {k: np.abs(solve(predict, x_t, sched, 10, k) - exact).max()
           for k in ("ddim", "dpmpp2m", "unipc")}
    assert err["unipc"] < 0.5 * err["ddim"] and err["unipc"] < err["dpmpp2m"], err


def test_batch_size_does_not_change_images_and_labels_are_checked(lora_bundle):
    bundle = EdgeBundle.load(lora_bundle[0])
    labels = np.array([0, 1, 2, 3, 4])
    a = sample_images(bundle, labels, SamplerConfig(steps=3, seed=5, batch_size=2))
    b = sample_images(bundle, labels, SamplerConfig(steps=3, seed=5, batch_size=64))
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ConfigError, match=r"\[10\]"):
        sample_images(bundle, np.array([10]), SamplerConfig(steps=2))
    with pytest.raises(ConfigError, match="solver"):
        SamplerConfig(solver="euler")


BLOCKER = textwrap.dedent("""
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] in ('torch', 'diffusers', 'peft', 'opacus', 'flwr'):
                raise ImportError('blocked import of ' + name)
    sys.meta_path.insert(0, Block())
    from dpfl.shared.edge.cli import main
    rc = main(sys.argv[1:])
    assert 'torch' not in sys.modules, 'torch was imported'
    sys.exit(rc)
""")


def test_cli_runs_without_torch_and_writes_labelled_outputs(lora_bundle, tmp_path):
    out = tmp_path / "samples"
    args = [str(lora_bundle[0]), "--out", str(out), "--classes", "0,Bag", "--count", "3",
            "--steps", "4", "--guidance", "2", "--solver", "dpmpp2m", "--spacing", "trailing",
            "--pngs"]
    res = subprocess.run([sys.executable, "-c", BLOCKER, *args], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "(eps=2, delta=1e-05)-DP" in res.stdout
    data = np.load(out / "samples.npz")  # allow_pickle is False by default
    assert data["labels"].tolist() == [0, 0, 0, 8, 8, 8]
    assert data["images"].shape == (6, 28, 28, 1) and data["images"].dtype == np.uint8
    assert json.loads(str(data["provenance"]))["privacy"]["epsilon"] == 2.0
    assert (out / "grid.png").stat().st_size > 0 and len(list((out / "images").glob("*.png"))) == 6
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["adapter_fingerprint"].startswith("sha256:")
    assert prov["sampler"] == {"solver": "dpmpp2m", "steps": 4, "guidance": 2.0, "seed": 0,
                               "spacing": "trailing"}
    bad = subprocess.run([sys.executable, "-c", BLOCKER, str(lora_bundle[0]), "--classes", "Cat"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown class 'Cat'" in bad.stderr
