"""Full-UNet DP-SGD (the DPDM from-scratch baseline) with real Opacus on the tiny LDM:
per-sample gradients of every layer, the input model untouched, the ledger committed before
the first step and equal to Opacus' accounting, budget refusal, plain-training equivalence."""

import copy
import dataclasses

import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import PRVAccountant
from opacus.optimizers import DPOptimizer

import dpfl.shared.privacy.dpsgd as dpmod
from dpfl.shared.errors import BudgetExhausted, ConfigError, StateError
from dpfl.shared.ldm.diffusion import expand_draws, row_losses
from dpfl.shared.ldm.models import fresh_unet
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.dpsgd import DPConfig
from dpfl.shared.privacy.full import full_unet, train_full
from dpfl.shared.privacy.multiplicity import physical_step


def _batch(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)


@pytest.fixture(scope="module")
def scratch(tiny_ldm):
    return dataclasses.replace(tiny_ldm, unet=fresh_unet(tiny_ldm.unet, seed=7))


def _dp(**kw):
    base = dict(noise_multiplier=0.5, delta=1e-3, batch_size=8, max_physical_batch=4,
                noise_multiplicity=2, lr=1e-2, device="cpu")
    return DPConfig(**{**base, **kw})


def test_fresh_unet_same_architecture_new_weights_seeded(tiny_ldm):
    state = torch.get_rng_state()
    a, b = fresh_unet(tiny_ldm.unet, 1), fresh_unet(tiny_ldm.unet, 1)
    assert torch.equal(torch.get_rng_state(), state)
    assert dict(a.config) == dict(tiny_ldm.unet.config)
    ref = tiny_ldm.unet.state_dict()
    assert a.state_dict().keys() == ref.keys()
    for k, v in a.state_dict().items():
        assert v.shape == ref[k].shape and torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(fresh_unet(tiny_ldm.unet, 2).conv_in.weight, a.conv_in.weight)


def _per_example_errors(ldm, model, k, seed=5):
    """(per-parameter errors, relative total error) of Opacus' per-example gradients of
    ``model`` against an explicit per-example autograd loop, for 2 examples."""
    ref = copy.deepcopy(model).train()
    gsm = GradSampleModule(model.train(), loss_reduction="mean")
    z, y = _batch(2)
    physical_step(gsm, ldm.scheduler, z, y, k, torch.Generator().manual_seed(seed), 10, 0.0)
    noisy, t, yy, target = expand_draws(z, y, ldm.scheduler, k,
                                        generator=torch.Generator().manual_seed(seed))
    got = dict(gsm._module.named_parameters())
    bad, totals = [], []
    for i in range(2):
        ref.zero_grad()
        rows = slice(i * k, (i + 1) * k)
        row_losses(ref, noisy[rows], t[rows], yy[rows], target[rows]).mean().backward()
        grads = dict(ref.named_parameters())
        total = torch.sqrt(sum(p.grad.pow(2).sum() for p in grads.values())).item()
        diff2 = 0.0
        for name, p in grads.items():
            g = got[name].grad_sample[i]
            assert g.shape == p.shape, name
            err = (g - p.grad).norm().item()
            diff2 += err ** 2
            # absolute floor: some gradients are exactly 0 in theory (a key bias cannot
            # change a softmax), so their relative error is rounding noise
            if err > 1e-4 * p.grad.norm().item() + 1e-6 * total:
                bad.append((i, name, err, p.grad.norm().item()))
        totals.append(diff2 ** 0.5 / total)
    return bad, max(totals)


@pytest.mark.parametrize("k", [1, 3])
def test_per_example_grads_of_every_unet_layer_equal_autograd(scratch, k):
    model = full_unet(scratch.unet)
    kinds = {type(m).__name__ for m in model.modules() if list(m.parameters(recurse=False))}
    assert kinds == {"Conv2d", "Linear", "GroupNorm", "Embedding"}
    bad, rel = _per_example_errors(scratch, model, k)
    assert not bad, bad[:5]
    assert rel < 1e-5


def test_without_contiguous_inputs_opacus_is_wrong_on_the_full_unet(scratch):
    """The channels_last trap reaches full training (convs after attention blocks):
    without full_unet's contiguous pre-hooks the per-example gradients are wrong."""
    bad, rel = _per_example_errors(scratch, copy.deepcopy(scratch.unet).requires_grad_(True), 1)
    assert any(name.endswith("conv1.weight") for _, name, _, _ in bad) and rel > 1e-2


def test_sigma0_no_clipping_equals_plain_training(scratch):
    model = full_unet(scratch.unet)
    ref = copy.deepcopy(model).train()
    gsm = GradSampleModule(model.train(), loss_reduction="mean")
    opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.1), noise_multiplier=0.0,
                      max_grad_norm=1e8, expected_batch_size=4)
    z, y = _batch(4)
    physical_step(gsm, scratch.scheduler, z, y, 2, torch.Generator().manual_seed(9), 10, 0.0)
    opt.step()
    plain = torch.optim.SGD(ref.parameters(), lr=0.1)
    noisy, t, yy, target = expand_draws(z, y, scratch.scheduler, 2,
                                        generator=torch.Generator().manual_seed(9))
    row_losses(ref, noisy, t, yy, target).view(4, 2).mean(1).mean().backward()
    plain.step()
    got = dict(gsm._module.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.allclose(got[name], p, rtol=1e-5, atol=1e-7), name


def test_train_full_trains_every_parameter_and_leaves_input_untouched(scratch, tmp_path):
    before = {k: v.clone() for k, v in scratch.unet.state_dict().items()}
    z, y = _batch(24)
    acc = PersistentAccountant.open(tmp_path / "acc.json", delta=1e-3, budget=50)
    res = train_full(scratch, z, y, _dp(), acc, ema_decay=0.0, progress=False)
    assert res.steps == 3 and abs(res.sample_rate - 1 / 3) < 1e-12 and res.examples == 24
    for k, v in scratch.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert res.unet_state.keys() == before.keys()
    params = dict(scratch.unet.named_parameters())
    assert len(params) > 100
    for k, v in res.unet_state.items():
        assert v.device.type == "cpu" and v.is_contiguous() and torch.isfinite(v).all(), k
        if k in params:
            assert not torch.equal(v, before[k]), f"{k} did not change"
    loaded = fresh_unet(scratch.unet)
    loaded.load_state_dict(res.unet_state)  # strict: the state is a whole UNet
    assert [h["epoch"] for h in res.history if "epsilon" in h] == [1]


def test_ledger_committed_before_first_step_and_equals_opacus(scratch, tmp_path, monkeypatch):
    path = tmp_path / "acc.json"
    acc = PersistentAccountant.open(path, delta=1e-3, budget=50)
    on_disk = []
    real = dpmod.physical_step

    def spy(*args, **kw):
        on_disk.append(PersistentAccountant.load(path).history)
        return real(*args, **kw)

    monkeypatch.setattr(dpmod, "physical_step", spy)
    z, y = _batch(24)
    res = train_full(scratch, z, y, _dp(epochs=2), acc, progress=False)
    assert res.steps == 6 and on_disk
    assert all(h == [(0.5, 1 / 3, 6)] for h in on_disk)  # all 6 steps, before the first
    opacus = PRVAccountant()
    opacus.history = [(0.5, 1 / 3, 6)]
    assert res.epsilon == pytest.approx(opacus.get_epsilon(delta=1e-3), rel=1e-12)
    assert res.epsilon == pytest.approx(PersistentAccountant.load(path).epsilon(), rel=1e-12)
    logged = [h["epsilon"] for h in res.history if "epsilon" in h]
    assert logged[-1] == pytest.approx(res.epsilon) and logged[0] < logged[-1]


def test_refuses_when_opacus_steps_differ_from_the_ledger(scratch, tmp_path, monkeypatch):
    real = dpmod._plan
    monkeypatch.setattr(dpmod, "_plan", lambda *a: (lambda q, s, sig: (q, s + 1, sig))(*real(*a)))
    acc = PersistentAccountant.open(tmp_path / "acc.json", delta=1e-3, budget=50)
    z, y = _batch(24)
    # Opacus' loader is checked against the plan before anything is committed...
    with pytest.raises(StateError, match="3 steps per epoch, but q=.* and 4 steps were planned"):
        train_full(scratch, z, y, _dp(), acc, progress=False)
    assert PersistentAccountant.load(tmp_path / "acc.json").steps == 0
    # ... and the steps Opacus took against the ledger after training
    monkeypatch.setattr(dpmod, "_check_loader", lambda *a: None)
    with pytest.raises(StateError, match="Opacus took 3 steps but 4 were committed"):
        train_full(scratch, z, y, _dp(), acc, progress=False)


def test_refuses_over_budget_before_any_step(scratch, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dpmod, "physical_step", lambda *a, **k: calls.append(1))
    acc = PersistentAccountant.open(tmp_path / "acc.json", delta=1e-3, budget=0.5)
    z, y = _batch(16)
    with pytest.raises(BudgetExhausted, match="spent so far"):
        train_full(scratch, z, y, _dp(noise_multiplier=0.3, noise_multiplicity=1), acc,
                   progress=False)
    assert PersistentAccountant.load(tmp_path / "acc.json").steps == 0 and not calls


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.9"])
def test_ema_decay_validation(scratch, tmp_path, bad):
    acc = PersistentAccountant.open(tmp_path / "acc.json", delta=1e-3, budget=50)
    with pytest.raises(ConfigError, match="ema_decay"):
        train_full(scratch, *_batch(24), _dp(), acc, ema_decay=bad, progress=False)
    assert acc.steps == 0
