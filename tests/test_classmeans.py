"""DP class means (DP-FETA's central images): sensitivity, noise, accounting, warm-up."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dpfl.shared.errors import BudgetExhausted, ConfigError, DataError
from dpfl.shared.ldm.diffusion import example_losses
from dpfl.shared.ldm.lora import LoraSpec, wrap_unet
from dpfl.shared.ldm.warmup import WarmupConfig, warm_up
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.classmeans import (
    SENSITIVITY,
    ClassMeans,
    clip_rows,
    exact_sums,
    release_class_means,
)


def _data(n=300, classes=4, shape=(2, 3, 3), seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn((n, *shape), generator=gen) * 2
    z[::7] *= 50  # outliers far beyond the clip norm
    y = torch.randint(0, classes, (n,), generator=gen)
    return z, y


def test_one_example_moves_the_released_vector_by_at_most_sqrt2():
    z, y = _data()
    whole = torch.cat([t.flatten() for t in exact_sums(z, y, 4, clip=3.0)])
    worst = 0.0
    for i in range(0, 300, 13):  # remove example i (add/remove adjacency)
        keep = torch.arange(300) != i
        part = torch.cat([t.flatten() for t in exact_sums(z[keep], y[keep], 4, clip=3.0)])
        worst = max(worst, float((whole - part).norm()))
    assert worst <= SENSITIVITY + 1e-9
    assert worst > 1.3  # the outliers reach the bound: the test could see a wrong sensitivity
    assert float(clip_rows(z, 3.0).flatten(1).norm(dim=1).max()) <= 1 + 1e-9


def test_commits_one_gaussian_mechanism_before_releasing(tmp_path):
    z, y = _data()
    acc = PersistentAccountant.open(tmp_path / "acc.json", kind="rdp", delta=1e-5, budget=5.0)
    rel = release_class_means(z, y, 4, clip=3.0, sigma=4.0, accountant=acc)
    saved = json.loads((tmp_path / "acc.json").read_text())
    assert saved["history"] == [[4.0, 1.0, 1]]  # one step at q = 1: the Gaussian mechanism
    fresh = PersistentAccountant(tmp_path / "x.json", kind="rdp", delta=1e-5, budget=5.0)
    assert saved["epsilon"] == pytest.approx(fresh.predict_epsilon(4.0, 1.0, 1))
    assert rel.sums.shape == (4, 2, 3, 3) and rel.counts.shape == (4,)


def test_a_release_over_budget_is_refused_and_nothing_recorded(tmp_path):
    z, y = _data()
    acc = PersistentAccountant.open(tmp_path / "acc.json", kind="rdp", delta=1e-5, budget=0.5)
    with pytest.raises(BudgetExhausted):
        release_class_means(z, y, 4, clip=3.0, sigma=0.5, accountant=acc)
    assert PersistentAccountant.load(tmp_path / "acc.json").history == []
    for bad in (dict(clip=0.0, sigma=1.0), dict(clip=1.0, sigma=0.0),
                dict(clip=1.0, sigma=float("nan"))):
        with pytest.raises(ConfigError):
            release_class_means(z, y, 4, accountant=acc, **bad)
    with pytest.raises(DataError, match="labels outside"):
        release_class_means(z, y, 3, clip=1.0, sigma=1.0, accountant=acc)
    assert PersistentAccountant.load(tmp_path / "acc.json").history == []


def test_noise_has_the_stated_scale_and_means_come_back(tmp_path):
    z, y = _data(n=4000, classes=2, shape=(8, 8, 8), seed=1)
    acc = PersistentAccountant.open(tmp_path / "acc.json", kind="rdp", delta=1e-5,
                                    budget=1e6)
    sigma = 3.0
    rel = release_class_means(z, y, 2, clip=40.0, sigma=sigma, accountant=acc)
    sums, counts = exact_sums(z, y, 2, clip=40.0)
    noise = rel.sums - sums.numpy()
    assert noise.std() == pytest.approx(sigma * math.sqrt(2), rel=0.05)  # 1,024 draws
    assert abs(noise.mean()) < 0.3
    means, classes = rel.means(min_count=10)
    assert classes.tolist() == [0, 1]
    clipped = clip_rows(z, 40.0).numpy() * 40.0
    for c in (0, 1):
        true = clipped[y.numpy() == c].mean(0)
        # sum noise 4.2 * 40 / ~2000 examples per coordinate: about 0.085
        assert np.abs(means[c] - true).mean() < 0.15


def test_sites_add_up_and_rare_classes_are_left_out():
    a = ClassMeans(np.ones((3, 2)), np.array([100.0, 5.0, 50.0]), clip=2.0, count_std=3.0)
    b = ClassMeans(np.ones((3, 2)), np.array([100.0, 2.0, 50.0]), clip=2.0, count_std=4.0)
    both = a + b
    assert both.count_std == 5.0  # independent noises add in variance
    means, classes = both.means()  # threshold 3 * 5: the count of 7 is left out
    assert classes.tolist() == [0, 2]
    assert both.means(min_count=5)[1].tolist() == [0, 1, 2]
    np.testing.assert_allclose(means, [[0.02, 0.02], [0.04, 0.04]])
    with pytest.raises(DataError):
        a + ClassMeans(np.ones((3, 2)), np.ones(3), clip=1.0)
    with pytest.raises(DataError, match="non-finite"):
        ClassMeans(np.full((3, 2), np.nan), np.ones(3), clip=1.0)


def test_warm_up_trains_only_the_adapters_and_lowers_the_loss(tiny_ldm):
    model = wrap_unet(tiny_ldm.unet, LoraSpec(rank=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(0)
    means = torch.randn((3, *tiny_ldm.latent_shape), generator=gen)
    classes = torch.tensor([1, 5, 8])

    def held_out_loss():  # the same (timestep, noise) draws before and after
        with torch.no_grad():
            return float(example_losses(model, tiny_ldm.scheduler, means, classes, k=32,
                                        generator=torch.Generator().manual_seed(9)).mean())

    before = held_out_loss()
    losses = warm_up(model, tiny_ldm.scheduler, means, classes, tiny_ldm.spec.null_class,
                     WarmupConfig(steps=150, batch_size=32, lr=1e-2))
    assert len(losses) == 150
    after = held_out_loss()
    assert after < 0.92 * before, (before, after)  # 1.14 -> 0.99 when written
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trained[n]) for n, p in model.named_parameters()
               if n in trained)
    with pytest.raises(ConfigError):
        warm_up(model, tiny_ldm.scheduler, means, torch.tensor([1]), tiny_ldm.spec.null_class,
                WarmupConfig(steps=1))


@pytest.mark.parametrize("kind", ["prv", "rdp"])
@pytest.mark.parametrize("sigma, delta", [(2.0, 1e-3), (4.0, 1e-5), (20.0, 2e-6)])
def test_the_ledger_never_reports_less_than_the_exact_gaussian_mechanism(kind, sigma, delta):
    """The release is recorded as one step at q = 1; Opacus' accountants must then state at
    least the exact epsilon of the Gaussian mechanism (Balle & Wang 2018, analytic form)."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    from dpfl.shared.privacy.accountant import epsilon_of

    def delta_at(eps):  # tight delta(eps) of N(0, sigma^2) with sensitivity 1
        return (norm.cdf(-eps * sigma + 1 / (2 * sigma))
                - math.exp(eps) * norm.cdf(-eps * sigma - 1 / (2 * sigma)))

    exact = brentq(lambda e: delta_at(e) - delta, 1e-9, 50)
    stated = epsilon_of([(sigma, 1.0, 1)], delta, kind)
    assert exact <= stated <= exact * 1.2 + 0.02, (exact, stated)
