"""Secure-mode DP noise from the OS CSPRNG: the right distribution and scale inside a real
Opacus step, nothing reproducible from any torch/numpy seed, no torch RNG state used."""

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from scipy import stats

from dpfl.shared.errors import ConfigError
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
