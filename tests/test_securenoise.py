"""Secure mode from the OS CSPRNG: DP noise of the right distribution and scale inside a real
Opacus step, nothing reproducible from any torch/numpy seed, no torch RNG state used; Poisson
sampling at rate q from no torch generator; a site's node config is secure by default."""

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from scipy import stats

from dpfl.shared.errors import ConfigError
from dpfl.shared.ldm.lora import LoraSpec
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.dpsgd import DPConfig, make_private, train_lora
from dpfl.shared.privacy.poisson import (
    OSEntropyPoissonSampler,
    sample_rate,
    steps_per_epoch,
    urandom_uniform,
)
from dpfl.shared.privacy.securenoise import (
    OSEntropyDPOptimizer,
    make_secure,
    secure_noise,
    urandom_standard_normal,
)


def test_standard_normal_samples_pass_distribution_checks():
    z = urandom_standard_normal(200_001)
    assert z.shape == (200_001,) and np.isfinite(z).all()
    assert abs(z.mean()) < 0.01 and z.std() == pytest.approx(1.0, abs=0.01)
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert stats.kurtosis(z) == pytest.approx(0.0, abs=0.05)  # Gaussian tails, not uniform


def test_noise_is_scaled_shaped_and_not_reproducible_from_seeds():
    ref = torch.zeros(300, 400, dtype=torch.float32)
    torch.manual_seed(0)
    np.random.seed(0)
    a = secure_noise(0.7, ref)
    torch.manual_seed(0)
    np.random.seed(0)
    b = secure_noise(0.7, ref)
    assert a.shape == ref.shape and a.dtype == torch.float32
    assert a.std().item() == pytest.approx(0.7, rel=0.01)
    assert not torch.equal(a, b)
    assert torch.count_nonzero(secure_noise(0.0, ref)) == 0


def _private_step(secure: bool, sigma=2.0, clip=0.5, batch=8):
    model = torch.nn.Linear(50, 40, bias=False)
    torch.nn.init.zeros_(model.weight)
    data = torch.utils.data.TensorDataset(torch.zeros(64, 50), torch.zeros(64, 40))
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader, noise_multiplier=sigma, max_grad_norm=clip,
        poisson_sampling=False, loss_reduction="sum")
    if secure:
        opt = make_secure(opt)
    x, y = next(iter(loader))
    torch.nn.functional.mse_loss(model(x), y, reduction="sum").backward()  # zero gradients
    state = torch.get_rng_state()
    opt.step()
    return model, opt, torch.equal(state, torch.get_rng_state())


def test_secure_step_adds_noise_of_sigma_c_and_leaves_torch_rng_alone():
    model, opt, rng_untouched = _private_step(secure=True)
    assert isinstance(opt, OSEntropyDPOptimizer) and opt.secure_mode
    update = -model._module.weight.detach()  # lr 1, zero gradient: the update is the noise
    assert update.std().item() == pytest.approx(2.0 * 0.5, rel=0.06)
    assert rng_untouched  # the noise did not come from torch's generator
    _, _, plain_untouched = _private_step(secure=False)
    assert not plain_untouched  # the check can tell: Opacus' default noise does use it


def test_only_plain_dp_optimizers_are_switched():
    class Other(DPOptimizer):
        pass

    opt = Other.__new__(Other)
    with pytest.raises(ConfigError, match="DPOptimizer"):
        make_secure(opt)


# -- Poisson sampling from the OS CSPRNG (issue 13, item 7) -------------------------------
def test_secure_poisson_sampler_includes_each_example_at_rate_q():
    n, q, steps = 400, 0.1, 250
    sampler = OSEntropyPoissonSampler(num_samples=n, sample_rate=q, steps=steps)
    batches = list(sampler)
    assert len(batches) == len(sampler) == steps
    counts = np.zeros(n)
    for b in batches:
        assert b == sorted(set(b)) and all(0 <= i < n for i in b)
        counts[b] += 1
    total = counts.sum()  # Binomial(n * steps, q)
    assert abs(total - n * steps * q) < 5 * (n * steps * q * (1 - q)) ** 0.5
    sizes = np.array([len(b) for b in batches])  # Binomial(n, q) per step
    assert sizes.var() == pytest.approx(n * q * (1 - q), rel=0.35)
    # every example independently at rate q: its count is Binomial(steps, q)
    chi2 = ((counts - steps * q) ** 2 / (steps * q * (1 - q))).sum()
    assert stats.chi2.sf(chi2, n) > 1e-4 and stats.chi2.cdf(chi2, n) > 1e-4


def test_urandom_uniforms_are_uniform_on_the_unit_interval():
    u = urandom_uniform(200_000)
    assert ((0 <= u) & (u < 1)).all()
    assert stats.kstest(u, "uniform").pvalue > 1e-4


def _secure_loader(seed: int):
    """The Poisson loader dpfl's DP-SGD trains on in secure mode (dpsgd.make_private)."""
    model = torch.nn.Linear(3, 1)
    data = torch.utils.data.TensorDataset(torch.arange(60.0).view(20, 3), torch.zeros(20, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4,
                                         generator=torch.Generator().manual_seed(seed))
    dp = DPConfig(noise_multiplier=1.0, batch_size=4, secure_mode=True, device="cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _, _, opt, dl = make_private(model, optimizer, loader, dp, 1.0, torch.device("cpu"))
    return opt, dl


def test_secure_mode_sampling_uses_no_torch_generator(monkeypatch):
    """Secure mode drew the noise from the OS CSPRNG but the Poisson inclusions from a torch
    PRNG: now no torch generator or seed decides which examples a step uses."""
    opt, dl = _secure_loader(0)
    assert isinstance(opt, OSEntropyDPOptimizer)
    assert dl.sample_rate == sample_rate(20, 4) and len(dl) == steps_per_epoch(20, 4)

    def no_torch_rand(*args, **kwargs):
        raise AssertionError("Poisson sampling drew from a torch generator")

    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        _, dl = _secure_loader(0)  # same loader seed, same global seed
        with monkeypatch.context() as m:
            m.setattr(torch, "rand", no_torch_rand)
            draws.append([y.shape[0] for _, y in dl] + [float(x.sum()) for x, _ in dl])
    assert draws[0] != draws[1]


def test_train_lora_in_secure_mode_takes_the_committed_steps(tiny_ldm, tmp_path):
    acc = PersistentAccountant.open(tmp_path / "a.json", delta=1e-3, budget=50)
    dp = DPConfig(noise_multiplier=1.0, delta=1e-3, batch_size=4, max_physical_batch=2,
                  noise_multiplicity=2, secure_mode=True, device="cpu")
    z, y = torch.randn(12, 4, 8, 8), torch.randint(0, 10, (12,))
    res = train_lora(tiny_ldm, z, y, LoraSpec(rank=1), dp, acc, progress=False)
    assert res.steps == acc.steps == steps_per_epoch(12, 4)
    assert all(torch.isfinite(v).all() for v in res.adapter.values())


def test_a_hand_written_node_config_is_secure_by_default(tmp_path):
    """A SuperNode started with a node config that does not name secure-mode trains in
    secure mode; only an explicit false turns it off."""
    from dpfl.client.site import Site
    from dpfl.shared.federation.config import RoundPlan, SiteConfig

    cfg = SiteConfig.from_node_config({"site-id": "h", "data": "silo.npz",
                                       "state-dir": str(tmp_path / "state")})
    assert cfg.secure_mode is True
    assert Site(cfg).dp_config(RoundPlan(num_rounds=1, batch_size=8), 100).secure_mode
    off = SiteConfig.from_node_config({"data": "silo.npz", "secure-mode": "false"})
    assert off.secure_mode is False
