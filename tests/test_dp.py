"""DP-SGD mechanics with real Opacus on the tiny LDM: per-sample gradients, noise
multiplicity sensitivity, noise statistics, equivalence with plain training."""

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

import dpfl.shared.privacy.dpsgd as dpmod
from dpfl.shared.errors import ConfigError
from dpfl.shared.ldm.diffusion import expand_draws, row_losses
from dpfl.shared.ldm.lora import PRESETS, LoraSpec, adapter_state, load_adapter_state, wrap_unet
from dpfl.shared.privacy.accountant import PersistentAccountant
from dpfl.shared.privacy.dpsgd import DPConfig, train_lora
from dpfl.shared.privacy.multiplicity import (
    mark_empty_batch,
    physical_step,
    reduce_noise_multiplicity,
)
from dpfl.shared.privacy.poisson import dp_steps, sample_rate, steps_per_epoch


def _batch(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)


def _trainable(m):
    return [(n, p) for n, p in m.named_parameters() if p.requires_grad]


def _lora_pair(ldm, preset):
    model = wrap_unet(ldm.unet, LoraSpec(preset=preset, rank=2))
    with torch.no_grad():  # non-zero B so that A gets gradients too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ref = copy.deepcopy(model)
    return GradSampleModule(model.train(), loss_reduction="mean"), ref.train()


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_per_example_grads_equal_autograd(tiny_ldm, preset, k):
    gsm, ref = _lora_pair(tiny_ldm, preset)
    z, y = _batch(2)
    physical_step(gsm, tiny_ldm.scheduler, z, y, k, torch.Generator().manual_seed(5), 10, 0.0)
    noisy, t, yy, target = expand_draws(z, y, tiny_ldm.scheduler, k,
                                        generator=torch.Generator().manual_seed(5))
    got = dict(_trainable(gsm._module))
    for i in range(2):
        ref.zero_grad()
        rows = slice(i * k, (i + 1) * k)
        row_losses(ref, noisy[rows], t[rows], yy[rows], target[rows]).mean().backward()
        diff2 = norm2 = 0.0
        for name, p in _trainable(ref):
            g = got[name].grad_sample[i]
            assert g.shape == p.shape
            err = (g - p.grad).norm() / p.grad.norm().clamp_min(1e-12)
            assert err < 1e-4, f"{preset} K={k} example {i} {name}: rel error {err:.2e}"
            diff2 += (g - p.grad).pow(2).sum().item()
            norm2 += p.grad.pow(2).sum().item()
        assert (diff2 / norm2) ** 0.5 < 1e-5, f"{preset} K={k} example {i}"


def test_conv_inputs_are_channels_last_in_unet_and_grads_still_match(tiny_ldm):
    """The trap is live in this UNet (some LoRA conv sees a channels_last input) and the
    contiguous pre-hook makes Opacus right; without it Opacus is wrong."""
    from dpfl.shared.ldm.lora import make_conv_inputs_contiguous
    gsm, _ = _lora_pair(tiny_ldm, "attention+conv")
    seen = []
    for name, m in gsm._module.named_modules():
        if isinstance(m, torch.nn.Conv2d) and name.endswith("lora_A.default"):
            m.register_forward_pre_hook(lambda mod, a, n=name: seen.append(
                (n, a[0].is_contiguous())), prepend=True)
    z, y = _batch(2)
    physical_step(gsm, tiny_ldm.scheduler, z, y, 1, torch.Generator().manual_seed(0), 10, 0.0)
    assert any(not c for _, c in seen), "expected a non-contiguous conv input in the UNet"

    # the bare trap: Opacus on a channels_last input, with and without the fix
    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last)
    results = {}
    ref = torch.nn.Conv2d(6, 3, 1)
    ref(x[:1]).pow(2).sum().backward()
    for fixed in (False, True):
        conv = torch.nn.Sequential(copy.deepcopy(ref))
        if fixed:
            make_conv_inputs_contiguous(conv)
        gm = GradSampleModule(conv, loss_reduction="sum")
        gm(x).pow(2).sum().backward()
        results[fixed] = conv[0].weight.grad_sample[0].clone()
        results[("ref", fixed)] = ref.weight.grad
    assert torch.allclose(results[True], results[("ref", True)], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results[False], results[("ref", False)], rtol=1e-3, atol=1e-4)


def _dp_opt(gsm, clip, sigma, expected_b, lr=1.0, seed=0):
    params = [p for p in gsm.parameters() if p.requires_grad]
    return DPOptimizer(torch.optim.SGD(params, lr=lr), noise_multiplier=sigma,
                       max_grad_norm=clip, expected_batch_size=expected_b,
                       generator=torch.Generator().manual_seed(seed))


def _summed_norm(opt):
    return torch.sqrt(sum(p.summed_grad.pow(2).sum() for p in opt.params)).item()


def test_noise_multiplicity_clips_each_example_once(tiny_ldm):
    clip, k = 1e-3, 4  # every row gradient is far above C
    gsm, _ = _lora_pair(tiny_ldm, "attention")
    z, y = _batch(1)
    opt = _dp_opt(gsm, clip, 0.0, 1)
    physical_step(gsm, tiny_ldm.scheduler, z, y, k, torch.Generator().manual_seed(3), 10, 0.0)
    opt.clip_and_accumulate()
    assert _summed_norm(opt) <= clip * (1 + 1e-4)
    # the unreduced (wrong) implementation: one example moves the sum by far more than C
    opt.zero_grad()
    noisy, t, yy, target = expand_draws(z, y, tiny_ldm.scheduler, k,
                                        generator=torch.Generator().manual_seed(3))
    row_losses(gsm, noisy, t, yy, target).mean().backward()
    opt.clip_and_accumulate()
    assert _summed_norm(opt) > 1.5 * clip


def test_sigma0_no_clipping_equals_plain_training(tiny_ldm):
    gsm, ref = _lora_pair(tiny_ldm, "attention+proj")
    z, y = _batch(4)
    k = 2
    opt = _dp_opt(gsm, 1e8, 0.0, 4, lr=0.1)
    physical_step(gsm, tiny_ldm.scheduler, z, y, k, torch.Generator().manual_seed(9), 10, 0.0)
    opt.step()
    plain = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.1)
    noisy, t, yy, target = expand_draws(z, y, tiny_ldm.scheduler, k,
                                        generator=torch.Generator().manual_seed(9))
    row_losses(ref, noisy, t, yy, target).view(4, k).mean(1).mean().backward()
    plain.step()
    got = dict(_trainable(gsm._module))
    for name, p in _trainable(ref):
        assert torch.allclose(got[name], p, rtol=1e-5, atol=1e-7), name


def test_noise_std_matches_sigma_c_over_expected_batch(tiny_ldm):
    gsm, _ = _lora_pair(tiny_ldm, "attention")
    sigma, clip, eb = 1.7, 0.5, 8
    opt = _dp_opt(gsm, clip, sigma, eb, lr=1.0)
    before = {n: p.detach().clone() for n, p in _trainable(gsm._module)}
    mark_empty_batch(list(gsm.parameters()))  # empty Poisson batch: the step is pure noise
    opt.step()
    delta = torch.cat([(before[n] - p.detach()).flatten() for n, p in _trainable(gsm._module)])
    n = delta.numel()
    assert n > 2000
    expected = sigma * clip / eb
    assert abs(delta.mean().item()) < 4 * expected / n ** 0.5
    assert abs(delta.std().item() / expected - 1) < 4 * (1 / (2 * n)) ** 0.5 + 1e-3


def test_reduce_rejects_rows_not_multiple_of_k():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad_sample = torch.zeros(5, 3)
    with pytest.raises(ConfigError, match="multiple"):
        reduce_noise_multiplicity([p], 2)


def test_train_lora_changes_only_adapters_and_base_is_bit_identical(tiny_ldm, tmp_path):
    base = {k: v.clone() for k, v in tiny_ldm.unet.state_dict().items()}
    z, y = _batch(24)
    acc = PersistentAccountant.open(tmp_path / "acc.json", delta=1e-3, budget=50)
    dp = DPConfig(noise_multiplier=0.5, delta=1e-3, batch_size=8, max_physical_batch=4,
                  noise_multiplicity=2, lr=1e-2, device="cpu")
    res = train_lora(tiny_ldm, z, y, LoraSpec(rank=2), dp, acc, progress=False)
    assert res.steps == 3 and abs(res.sample_rate - 1 / 3) < 1e-12
    assert res.epsilon == pytest.approx(acc.epsilon()) and acc.steps == 3
    for k, v in tiny_ldm.unet.state_dict().items():
        assert torch.equal(v, base[k]), k
    model = wrap_unet(tiny_ldm.unet, LoraSpec(rank=2))
    init = adapter_state(model)
    load_adapter_state(model, res.adapter)
    assert set(res.adapter) == set(init)
    assert all(not torch.equal(res.adapter[k], init[k]) for k in init if "lora_B" in k)
    assert not torch.equal(res.adapter["base_model.model.class_embedding.weight"],
                           init["base_model.model.class_embedding.weight"])
    # the trained peft model itself comes back too: on CPU, Opacus' hooks and grads gone
    returned = adapter_state(res.model)
    assert set(returned) == set(res.adapter)
    assert all(torch.equal(returned[k], v) for k, v in res.adapter.items())
    assert all(p.device.type == "cpu" and getattr(p, "grad_sample", None) is None
               for p in res.model.parameters())
    assert not any(m._forward_hooks for m in res.model.modules())
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in model.named_parameters() if not p.requires_grad and
              "original_module" not in n}
    assert len(frozen) == len([k for k in base if "class_embedding" not in k])
    for name, p in frozen.items():
        assert torch.equal(p, base[name]), name
    assert all(torch.isfinite(v).all() for v in res.adapter.values())


def test_ema_of_the_dp_iterates_is_what_train_lora_returns(tiny_ldm, tmp_path, monkeypatch):
    """ema_decay > 0: the adapter returned is diffusers' EMA of the DP iterates (fed here,
    independently, with the iterates recorded after every step), not the last iterate."""
    from diffusers.training_utils import EMAModel

    seen: list[list[torch.Tensor]] = []

    class Recording(EMAModel):
        def __init__(self, parameters, **kw):
            parameters = list(parameters)
            seen.append([p.detach().clone() for p in parameters])  # the start
            super().__init__(parameters, **kw)

        def step(self, parameters):
            parameters = list(parameters)
            seen.append([p.detach().clone() for p in parameters])
            super().step(parameters)

    monkeypatch.setattr(dpmod, "EMAModel", Recording)
    z, y = _batch(24)
    acc = PersistentAccountant.open(tmp_path / "acc.json", delta=1e-3, budget=50)
    dp = DPConfig(noise_multiplier=0.5, delta=1e-3, batch_size=8, max_physical_batch=4,
                  noise_multiplicity=2, lr=1e-2, epochs=2, device="cpu")
    res = train_lora(tiny_ldm, z, y, LoraSpec(rank=2), dp, acc, progress=False, ema_decay=0.8)
    assert len(seen) == 1 + res.steps == 7
    params = [torch.nn.Parameter(t.clone()) for t in seen[0]]
    reference = EMAModel(params, decay=0.8, use_ema_warmup=True)
    for iterate in seen[1:]:
        reference.step([torch.nn.Parameter(t) for t in iterate])
    returned = [p for p in res.model.parameters() if p.requires_grad]
    for got, want in zip(returned, reference.shadow_params):
        torch.testing.assert_close(got.detach(), want, rtol=0, atol=1e-6)
    assert any(not torch.allclose(p.detach(), last) for p, last in zip(returned, seen[-1]))
    with pytest.raises(ConfigError, match="ema_decay"):
        train_lora(tiny_ldm, z, y, LoraSpec(rank=2), dp, acc, progress=False, ema_decay=1.0)


def test_config_validation():
    with pytest.raises(ConfigError):
        DPConfig(target_epsilon=-1)
    with pytest.raises(ConfigError):
        DPConfig(noise_multiplicity=0)
    with pytest.raises(ConfigError):
        DPConfig(noise_multiplier=None, target_epsilon=None)
    with pytest.raises(ConfigError, match="1/n"):
        DPConfig(delta=1e-2).check_dataset(200)
    with pytest.raises(ConfigError, match="planned_steps"):
        DPConfig(planned_steps=0)


@pytest.mark.parametrize("n, batch, epochs", [(93, 1, 1), (24, 8, 2), (40, 10, 1), (49, 1, 1),
                                              (100, 7, 1)])
def test_committed_steps_are_the_steps_taken_and_calibrated_for(tiny_ldm, tmp_path,
                                                                monkeypatch, n, batch, epochs):
    """One rule for steps: σ is calibrated for, and the ledger records, exactly the steps
    Opacus' Poisson loader takes (int(1/q) per epoch: 92, not 93, for n=93, B=1)."""
    calibrated = []
    real = dpmod.calibrate_sigma

    def spy(eps, delta, q, steps, kind="rdp"):
        calibrated.append((q, steps))
        return real(eps, delta, q, steps, kind)

    monkeypatch.setattr(dpmod, "calibrate_sigma", spy)
    acc = PersistentAccountant.open(tmp_path / "acc.json", delta=1e-3, budget=50)
    dp = DPConfig(target_epsilon=8.0, delta=1e-3, batch_size=batch, max_physical_batch=16,
                  noise_multiplicity=1, epochs=epochs, device="cpu")
    z, y = torch.randn(n, 4, 8, 8), torch.randint(0, 10, (n,))
    res = train_lora(tiny_ldm, z, y, LoraSpec(rank=1, train_class_embedding=False), dp, acc,
                     progress=False)
    taken = [h for h in res.history if "loss" in h]
    assert len(taken) == res.steps == acc.steps == dp_steps(n, batch, epochs)
    assert acc.history == [(res.sigma, sample_rate(n, batch), res.steps)]
    assert calibrated == [(sample_rate(n, batch), res.steps)]
    assert dp_steps(n, batch, epochs) == epochs * steps_per_epoch(n, batch)
    if (n, batch) == (93, 1):
        assert steps_per_epoch(n, batch) == 92 and sample_rate(n, batch) == 1 / 93


def test_site_plans_every_round_with_the_same_rule(tmp_path):
    """A federated site calibrates σ for num_rounds rounds of the steps one round commits."""
    from dpfl.client.site import Site
    from dpfl.shared.federation.config import RoundPlan, SiteConfig

    site = Site(SiteConfig(site_id="s", data="unused.npz", state_dir=str(tmp_path / "state"),
                           delta=1e-3))
    for n, batch, epochs in [(93, 1, 1), (93, 64, 2), (40, 10, 3), (24, 64, 1)]:
        plan = RoundPlan(num_rounds=3, local_epochs=epochs, batch_size=batch)
        dp = site.dp_config(plan, n)
        assert dp.batch_size == min(batch, n) and dp.epochs == epochs
        assert dp.planned_steps == 3 * dp_steps(n, dp.batch_size, epochs)
    assert site.dp_config(RoundPlan(num_rounds=2, batch_size=1), 93).planned_steps == 2 * 92


def _reference_clipped_sum(ref, ldm, z, y, k, splits, seed, clip_quantile):
    """Autograd, one example at a time: the sum of per-example gradients of the mean K-draw
    loss, each clipped at C (C = a quantile of their norms, so clipping is active)."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    for lo, hi in splits:  # the physical batches draw (t, noise, dropped labels) in order
        noisy, t, yy, target = expand_draws(z[lo:hi], y[lo:hi], ldm.scheduler, k, 10, 0.3, g)
        for i in range(hi - lo):
            ref.zero_grad()
            rows = slice(i * k, (i + 1) * k)
            row_losses(ref, noisy[rows], t[rows], yy[rows], target[rows]).mean().backward()
            grads.append({n: p.grad.detach().clone() for n, p in _trainable(ref)})
    norms = torch.stack([torch.sqrt(sum(v.pow(2).sum() for v in d.values())) for d in grads])
    clip = float(norms.quantile(clip_quantile))
    factors = (clip / norms).clamp(max=1.0)
    total = {n: sum(f * d[n] for f, d in zip(factors, grads)) for n in grads[0]}
    return clip, total, int((norms > clip).sum())


@pytest.mark.parametrize("preset,k", [("attention", 3), ("attention+conv", 4)])
def test_clipped_sum_over_split_physical_batches_equals_autograd(tiny_ldm, preset, k):
    """B = 5 examples in physical batches of 2, 2 and 1 (as BatchMemoryManager splits a
    logical batch), K > 1 draws each, some null-class rows, C below most per-example norms:
    the clipped-and-summed gradient Opacus builds (σ = 0) equals per-example autograd."""
    gsm, ref = _lora_pair(tiny_ldm, preset)
    z, y = _batch(5, seed=11)
    splits = [(0, 2), (2, 4), (4, 5)]
    clip, expected, clipped = _reference_clipped_sum(ref, tiny_ldm, z, y, k, splits, 21, 0.4)
    assert 2 <= clipped < 5  # clipping active on some examples, not all
    opt = _dp_opt(gsm, clip, 0.0, 5)
    g = torch.Generator().manual_seed(21)
    for j, (lo, hi) in enumerate(splits):
        physical_step(gsm, tiny_ldm.scheduler, z[lo:hi], y[lo:hi], k, g, 10, 0.3)
        opt.signal_skip_step(do_skip=j < len(splits) - 1)
        if j < len(splits) - 1:
            opt.step()  # clips and accumulates only; the logical step is not over
            opt.zero_grad()
    opt.clip_and_accumulate()  # the last physical batch; summed_grad holds all five
    got = dict(_trainable(gsm._module))
    diff2 = norm2 = 0.0
    for name, want in expected.items():
        diff2 += (got[name].summed_grad - want).pow(2).sum().item()
        norm2 += want.pow(2).sum().item()
    assert norm2 > 0 and (diff2 / norm2) ** 0.5 < 1e-5, f"{preset} K={k}"
