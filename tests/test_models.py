import json

import pytest
import torch

from dpfl.shared.errors import ModelError
from dpfl.shared.ldm.models import PRESETS, build_ldm, load_ldm, save_ldm


def test_save_load_round_trip_keeps_fingerprint_and_outputs(tmp_path, tiny_ldm):
    path = save_ldm(tiny_ldm, tmp_path / "base", card={"data": "none"})
    loaded = load_ldm(path, verify_fingerprint=tiny_ldm.fingerprint())
    assert loaded.fingerprint() == tiny_ldm.fingerprint()
    assert loaded.spec == tiny_ldm.spec
    card = json.loads((path / "model_card.json").read_text())
    assert card["fingerprint"] == tiny_ldm.fingerprint() and card["data"] == "none"
    tiny_ldm.unet.eval()
    z = torch.randn(3, *tiny_ldm.latent_shape)
    t = torch.tensor([0, 500, 999])
    y = torch.tensor([0, 1, tiny_ldm.spec.null_class])
    with torch.no_grad():
        a = tiny_ldm.unet(z, t, class_labels=y).sample
        b = loaded.unet(z, t, class_labels=y).sample
    assert torch.equal(a, b)
    # weights are safetensors, not pickles
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_fingerprint_changes_with_any_weight(tiny_ldm):
    other = build_ldm("tiny", seed=0)
    assert other.fingerprint() == tiny_ldm.fingerprint()
    with torch.no_grad():
        next(other.unet.parameters()).view(-1)[0] += 1e-3
    assert other.fingerprint() != tiny_ldm.fingerprint()


def test_mismatching_fingerprint_is_refused(tmp_path, tiny_ldm):
    path = save_ldm(tiny_ldm, tmp_path / "base")
    with pytest.raises(ModelError, match="fingerprint"):
        load_ldm(path, verify_fingerprint="sha256:" + "0" * 64)


def test_missing_model_directory_names_it(tmp_path):
    with pytest.raises(ModelError, match="nowhere"):
        load_ldm(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vae").mkdir()
    with pytest.raises(ModelError, match="vae"):
        load_ldm(tmp_path / "half")


def test_plain_diffusers_directory_loads_without_dpfl_metadata(tmp_path, tiny_ldm):
    """A user's own diffusers LDM folder (no dpfl_ldm.json, no model card) loads too."""
    path = tmp_path / "theirs"
    tiny_ldm.vae.save_pretrained(path / "vae")
    tiny_ldm.unet.save_pretrained(path / "unet")
    tiny_ldm.scheduler.save_pretrained(path / "scheduler")
    ldm = load_ldm(path)
    assert ldm.spec.num_classes == tiny_ldm.spec.num_classes
    assert ldm.spec.image_size == 32 and ldm.spec.channels == 1
    assert ldm.fingerprint() == tiny_ldm.fingerprint()


def test_encode_decode_shapes_and_latent_normalisation(tiny_ldm):
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    z = tiny_ldm.encode(x)
    assert z.shape == (5, *tiny_ldm.latent_shape) == (5, 4, 8, 8)
    img = tiny_ldm.decode(z)
    assert img.shape == (5, 1, 28, 28)  # cropped back to the source size
    assert img.min() >= -1 and img.max() <= 1


def test_fmnist_preset_geometry():
    p = PRESETS["fmnist"]
    ldm = build_ldm("fmnist")
    n = sum(q.numel() for q in ldm.unet.parameters())
    assert 1_000_000 < n < 10_000_000
    assert ldm.latent_shape == (4, 8, 8)
    assert p.spec.source_size == 28 and p.spec.num_classes == 10
    names = {name for name, _ in ldm.unet.named_modules()}
    assert any(name.endswith("to_q") for name in names)  # attention for LoRA to target


def test_unknown_preset():
    with pytest.raises(ModelError, match="unknown model preset"):
        build_ldm("huge")
