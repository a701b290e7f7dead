"""LoRA presets, adapter state dicts and peft adapter directories."""

import pytest
import torch
from peft import PeftModel

from dpfl.shared.errors import ConfigError, IncompatibleAdapter
from dpfl.shared.ldm.lora import (
    PRESETS,
    LoraSpec,
    adapter_state,
    load_adapter,
    load_adapter_state,
    merged_unet,
    save_adapter,
    target_modules,
    wrap_unet,
)

CE = "base_model.model.class_embedding.weight"


def test_presets_target_expected_layers(tiny_ldm):
    att = target_modules(tiny_ldm.unet, LoraSpec("attention"))
    assert att and all(n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0")
                       for n in att)
    assert len(att) == 4 * 4  # 4 attention blocks in the tiny UNet (down, mid, 2 up)
    proj = target_modules(tiny_ldm.unet, LoraSpec("attention+proj"))
    assert set(att) < set(proj) and any(n.endswith("time_emb_proj") for n in proj)
    conv = target_modules(tiny_ldm.unet, LoraSpec("attention+conv"))
    assert set(att) < set(conv) and any(n.endswith("conv1") for n in conv)
    up = target_modules(tiny_ldm.unet, LoraSpec("attention", blocks=("up_blocks",)))
    assert up and all(n.startswith("up_blocks.") for n in up) and len(up) < len(att)
    with pytest.raises(ConfigError, match="matches no"):
        target_modules(tiny_ldm.unet, LoraSpec("attention", blocks=("nowhere",)))


def test_spec_validation():
    with pytest.raises(ConfigError):
        LoraSpec(rank=0)
    with pytest.raises(ConfigError):
        LoraSpec(preset="everything")
    with pytest.raises(ConfigError):
        LoraSpec(dropout=1.0)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_adapter_state_is_exactly_the_trainable_tensors(tiny_ldm, preset):
    model = wrap_unet(tiny_ldm.unet, LoraSpec(preset, rank=2))
    sd = adapter_state(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(sd) == len(trainable)
    assert sum(v.numel() for v in sd.values()) == sum(p.numel() for p in trainable)
    assert all("lora_A" in k or "lora_B" in k for k in sd if k != CE) and CE in sd
    no_ce = adapter_state(wrap_unet(tiny_ldm.unet, LoraSpec(preset, train_class_embedding=False)))
    assert CE not in no_ce
    # a fresh adapter is the identity: the wrapped UNet equals the base
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.allclose(model(x, t, class_labels=y).sample,
                              tiny_ldm.unet(x, t, class_labels=y).sample, atol=1e-6)


def _perturbed(tiny_ldm, spec):
    model = wrap_unet(tiny_ldm.unet, spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def test_save_load_directory_round_trip(tiny_ldm, tmp_path):
    spec = LoraSpec("attention+conv", rank=2)
    model = _perturbed(tiny_ldm, spec)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    loaded = load_adapter(tiny_ldm.unet, tmp_path / "adapter")
    plain = PeftModel.from_pretrained(wrap_unet(tiny_ldm.unet, spec).get_base_model(),
                                      str(tmp_path / "adapter"))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        want = model(x, t, class_labels=y).sample
        assert not torch.allclose(want, tiny_ldm.unet(x, t, class_labels=y).sample, atol=1e-4)
        for other in (loaded, plain, merged_unet(loaded)):
            assert torch.allclose(other(x, t, class_labels=y).sample, want, atol=1e-5)
    for k, v in adapter_state(model).items():
        assert torch.equal(adapter_state(loaded)[k], v)


def test_load_state_validates(tiny_ldm):
    spec = LoraSpec("attention", rank=2)
    good = adapter_state(_perturbed(tiny_ldm, spec))
    target = wrap_unet(tiny_ldm.unet, spec)
    load_adapter_state(target, good)
    assert all(torch.equal(adapter_state(target)[k], v) for k, v in good.items())
    key = next(k for k in good if "lora_A" in k)
    cases = {
        "unexpected": {**good, "base_model.model.extra.lora_A.weight": torch.zeros(1)},
        "missing": {k: v for k, v in good.items() if k != key},
        "shape": {**good, key: torch.zeros(3, 3)},
        "non-finite": {**good, key: torch.full_like(good[key], float("nan"))},
    }
    for what, state in cases.items():
        before = adapter_state(target)
        match = what.split("-")[0] if what != "shape" else "shape"
        with pytest.raises(IncompatibleAdapter, match=match):
            load_adapter_state(target, state)
        after = adapter_state(target)
        assert all(torch.equal(before[k], after[k]) for k in before), what
    with pytest.raises(IncompatibleAdapter):
        load_adapter_state(wrap_unet(tiny_ldm.unet, LoraSpec("attention", rank=3)), good)


def test_ffa_lora_freezes_a_and_keeps_it_in_the_adapter():
    """FFA-LoRA: only B (and the class embedding) train; A stays at the seeded init."""
    import torch

    from dpfl.shared.ldm.lora import LoraSpec, adapter_state, wrap_unet
    from dpfl.shared.ldm.models import build_ldm

    unet = build_ldm("tiny", seed=0).unet
    torch.manual_seed(5)
    a = wrap_unet(unet, LoraSpec(freeze_a=True))
    torch.manual_seed(5)
    b = wrap_unet(unet, LoraSpec(freeze_a=True))
    trainable = [n for n, p in a.named_parameters() if p.requires_grad]
    assert trainable and not any(".lora_A." in n for n in trainable)
    assert any(".lora_B." in n for n in trainable)
    sa, sb = adapter_state(a), adapter_state(b)
    assert any("lora_A" in k for k in sa)  # A still travels server -> site
    for k in sa:  # same seed, same shared initialisation at every site
        assert torch.equal(sa[k], sb[k])
