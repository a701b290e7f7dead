"""Adapter swap on device: a base bundle shipped once, adapters as small files.

Real onnxruntime on the tiny preset: parity of base + edge adapter with the merged export,
refusal of an adapter made for another base, a torch-free CLI run with an adapter, and
classifier-free guidance as one batched call vs two passes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dpfl.shared.edge.adapter import EdgeAdapter
from dpfl.shared.edge.sampler import EdgeBundle, GuidedUNet, SamplerConfig, sample_images
from dpfl.shared.errors import ConfigError, IncompatibleAdapter
from dpfl.shared.export.lora_graph import export_adapter
from dpfl.shared.export.onnx_bundle import ExportConfig, export_bundle, merge_adapter
from dpfl.shared.ldm.diffusion import ddim_sample
from dpfl.shared.ldm.models import build_ldm
from dpfl.shared.privacy.guarantee import PrivacyGuarantee

from .test_edge_sampler import BLOCKER
from .test_export import make_adapter

PARITY = 1e-4  # stated: base + edge adapter vs the merged export, images and UNet outputs


@pytest.fixture(scope="module")
def swap(tmp_path_factory, tiny_ldm):
    """Base bundle (adapter inputs), merged bundle and edge adapter of one peft adapter."""
    root = tmp_path_factory.mktemp("swap")
    lora = make_adapter(tiny_ldm.unet, root / "lora", seed=5)
    cfg = ExportConfig(parity_steps=2)
    base = export_bundle(tiny_ldm, root / "base", config=ExportConfig(parity_steps=2,
                                                                      lora_preset="attention"))
    merged = export_bundle(tiny_ldm, root / "merged", adapter_dir=lora, config=cfg)
    edge = export_adapter(tiny_ldm, lora, root / "site-a.safetensors",
                          privacy=PrivacyGuarantee.from_values(2.0, 1e-5))
    return {"root": root, "lora": lora, "base": base, "merged": merged, "edge": edge}


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_base_plus_adapter_samples_the_merged_images(swap, guidance):
    labels = np.array([0, 3, 9, 5, 1])
    cfg = SamplerConfig(steps=5, guidance=guidance, seed=2)
    swapped = sample_images(EdgeBundle.load(swap["base"], adapter=swap["edge"]), labels, cfg)
    merged = sample_images(EdgeBundle.load(swap["merged"]), labels, cfg)
    assert np.abs(swapped - merged).max() < PARITY
    base_only = sample_images(EdgeBundle.load(swap["base"]), labels, cfg)
    assert np.abs(base_only - merged).max() > 1e-2  # the adapter matters


def test_unet_outputs_match_merged_torch_at_an_unseen_batch_size(swap, tiny_ldm):
    bundle = EdgeBundle.load(swap["base"], adapter=swap["edge"])
    merged = merge_adapter(tiny_ldm, swap["lora"])
    x = torch.randn(5, *tiny_ldm.latent_shape, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([0, 17, 400, 750, 999]), torch.tensor([0, 4, 9, 10, 2])
    with torch.no_grad():
        ref = merged(x, t, class_labels=y).sample.numpy()
    feed = {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": y.numpy()}
    got = bundle.unet.run(None, {**feed, **bundle.adapter.tensors})[0]
    assert np.abs(got - ref).max() < PARITY


def test_base_bundle_without_adapter_is_the_base_model(swap, tiny_ldm):
    labels = torch.tensor([2, 7])
    noise = torch.randn(2, *tiny_ldm.latent_shape, generator=torch.Generator().manual_seed(3))
    z = ddim_sample(tiny_ldm.unet, tiny_ldm.scheduler, labels, tiny_ldm.latent_shape,
                    tiny_ldm.spec.null_class, steps=4, guidance=2.0, initial_noise=noise)
    got = sample_images(EdgeBundle.load(swap["base"]), labels.numpy(),
                        SamplerConfig(steps=4, guidance=2.0), initial_noise=noise.numpy())
    assert np.abs(got - tiny_ldm.decode(z).numpy()).max() < PARITY
    meta = json.loads((swap["base"] / "bundle.json").read_text())
    assert meta["adapter"] is None and meta["adapter_inputs"]["lora_preset"] == "attention"


def test_adapter_file_is_small_safetensors_carrying_privacy_and_base(swap, tiny_ldm):
    from safetensors.numpy import load_file, safe_open

    edge = swap["edge"]
    with safe_open(str(edge), framework="np") as f:  # the reference reader agrees with ours
        meta = f.metadata()
    ours = EdgeAdapter.load(edge)
    ref = load_file(str(edge))
    assert set(ref) == set(ours.tensors)
    assert all(np.array_equal(ref[k], ours.tensors[k]) for k in ref)
    assert "class_embedding" in ours.tensors  # the trained embedding travels
    assert meta["format"] == "dpfl-edge-adapter/1"
    assert ours.base_fingerprint == tiny_ldm.fingerprint() == meta["base_fingerprint"]
    assert ours.meta["privacy"] == PrivacyGuarantee.from_values(2.0, 1e-5).to_json()
    assert ours.meta["parity"]["max_abs_diff"] < PARITY
    assert ours.fingerprint.startswith("sha256:")
    assert edge.stat().st_size < (swap["merged"] / "unet.onnx").stat().st_size / 10


def test_fmnist_adapter_is_under_one_megabyte(tmp_path):
    ldm = build_ldm("fmnist", seed=0)
    lora = make_adapter(ldm.unet, tmp_path / "lora", seed=1)
    edge = export_adapter(ldm, lora, tmp_path / "a.safetensors")
    assert edge.stat().st_size <= 1 << 20
    assert EdgeAdapter.load(edge).meta["privacy"]["status"] == "unknown"  # never invented


def test_adapter_for_another_base_is_refused_naming_both_fingerprints(swap, tmp_path):
    other = build_ldm("tiny", seed=1)
    lora = make_adapter(other.unet, tmp_path / "lora")
    foreign = export_adapter(other, lora, tmp_path / "foreign.safetensors")
    base_fp = json.loads((swap["base"] / "bundle.json").read_text())["base_fingerprint"]
    with pytest.raises(IncompatibleAdapter) as err:
        EdgeBundle.load(swap["base"], adapter=foreign)
    assert other.fingerprint() in str(err.value) and base_fp in str(err.value)
    res = subprocess.run([sys.executable, "-c", BLOCKER, str(swap["base"]), "--adapter",
                          str(foreign), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "was made for base model" in res.stderr
    assert base_fp in res.stderr and not (tmp_path / "x").exists()


def test_merged_bundles_and_foreign_files_are_refused(swap, tmp_path):
    with pytest.raises(IncompatibleAdapter, match="takes no adapter inputs"):
        EdgeBundle.load(swap["merged"], adapter=swap["edge"])
    with pytest.raises(IncompatibleAdapter, match="not a dpfl edge adapter"):
        EdgeBundle.load(swap["base"], adapter=swap["lora"] / "adapter_model.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(swap["edge"].read_bytes()[:-100])
    with pytest.raises(IncompatibleAdapter, match="truncated"):
        EdgeAdapter.load(cut)
    with pytest.raises(ConfigError, match="no merged adapter"):
        export_bundle(build_ldm("tiny"), tmp_path / "b", adapter_dir=swap["lora"],
                      config=ExportConfig(lora_preset="attention"))


def test_cli_applies_adapter_without_torch_and_states_its_privacy(swap, tmp_path):
    out = tmp_path / "samples"
    res = subprocess.run([sys.executable, "-c", BLOCKER, str(swap["base"]), "--adapter",
                          str(swap["edge"]), "--out", str(out), "--classes", "0,Bag",
                          "--count", "2", "--steps", "3", "--guidance", "2"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "(eps=2, delta=1e-05)-DP" in res.stdout
    prov = json.loads((out / "provenance.json").read_text())
    adapter = EdgeAdapter.load(swap["edge"])
    assert prov["adapter_fingerprint"] == adapter.fingerprint
    assert prov["privacy"] == adapter.meta["privacy"]
    assert prov["base_fingerprint"] == adapter.base_fingerprint


def test_guidance_in_one_batched_call_equals_two_passes(swap):
    bundle = EdgeBundle.load(swap["base"], adapter=swap["edge"])
    labels = np.array([1, 4, 8])
    x = np.random.default_rng(0).standard_normal((3, *bundle.latent_shape)).astype(np.float32)
    batched = GuidedUNet(bundle, labels, guidance=2.5)(x, 321)

    def one_pass(y):
        feed = {"sample": x, "timestep": np.full(3, 321, np.int64), "class_labels": y}
        return bundle.unet.run(None, {**feed, **bundle.adapter.tensors})[0]
    cond, uncond = one_pass(labels), one_pass(np.full(3, bundle.null_class))
    np.testing.assert_allclose(batched, uncond + 2.5 * (cond - uncond), atol=1e-5)


def test_server_commands_write_the_base_once_and_adapters_after(swap, tiny_ldm, tmp_path):
    from click.testing import CliRunner

    from dpfl.server.cli import main
    from dpfl.shared.ldm.models import save_ldm

    model = save_ldm(tiny_ldm, tmp_path / "model")
    res = CliRunner().invoke(main, ["export", str(model), "--lora-preset", "attention",
                                    "--out", str(tmp_path / "base")])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["export-adapter", str(model), str(swap["lora"]), "--out",
                                    str(tmp_path / "a.safetensors"), "--epsilon", "3",
                                    "--delta", "1e-6"])
    assert res.exit_code == 0, res.output
    bundle = EdgeBundle.load(tmp_path / "base", adapter=tmp_path / "a.safetensors")
    assert (bundle.privacy["epsilon"], bundle.privacy["delta"]) == (3.0, 1e-6)
    res = CliRunner().invoke(main, ["export", str(model), "--lora-preset", "attention",
                                    "--adapter", str(swap["lora"]), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "no merged adapter" in res.output
