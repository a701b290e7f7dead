"""ONNX export: adapter merge (LoRA + trained class embedding), parity, refusal, metadata."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from dpfl.shared.errors import ConfigError, IncompatibleAdapter, ModelError
from dpfl.shared.export.onnx_bundle import (
    ExportConfig,
    adapter_fingerprint,
    export_bundle,
    merge_adapter,
)
from dpfl.shared.privacy.guarantee import SCOPE_FEDERATED, PrivacyGuarantee

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_adapter(unet: torch.nn.Module, path: Path, class_embedding: bool = True,
                 seed: int = 1) -> Path:
    """A peft LoRA adapter with non-zero B (so merging matters), optionally with a
    trained class embedding (peft ``modules_to_save``)."""
    import copy

    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS,
                     modules_to_save=["class_embedding"] if class_embedding else None)
    model = get_peft_model(copy.deepcopy(unet), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif "modules_to_save" in name and "class_embedding" in name:
                p.add_(torch.randn(p.shape, generator=gen))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_ldm):
    return make_adapter(tiny_ldm.unet, tmp_path_factory.mktemp("adapter") / "lora")


@pytest.fixture(scope="module")
def privacy_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("acc") / "accountant.json"
    p.write_text(json.dumps({"format": "dpfl-accountant/1", "kind": "rdp", "delta": 1e-5,
                             "budget": 8.0, "history": [[1.1, 0.01, 500]], "epsilon": 3.25,
                             "steps": 500}))
    return p


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_ldm, adapter, privacy_file):
    out = tmp_path_factory.mktemp("bundle") / "b"
    return export_bundle(tiny_ldm, out, adapter_dir=adapter,
                         privacy=PrivacyGuarantee.from_file(privacy_file),
                         config=ExportConfig(fp16=True))


def test_merge_applies_lora_and_trained_class_embedding(tiny_ldm, adapter):
    import copy

    from peft import PeftModel

    merged = merge_adapter(tiny_ldm, adapter)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(tiny_ldm.unet), str(adapter)).eval()
    x = torch.randn(3, *tiny_ldm.latent_shape)
    t = torch.tensor([5, 400, 990])
    y = torch.tensor([0, 7, tiny_ldm.spec.null_class])
    with torch.no_grad():
        base = tiny_ldm.unet(x, t, class_labels=y).sample
        unmerged = peft_model(x, t, class_labels=y).sample
        out = merged(x, t, class_labels=y).sample
    assert torch.allclose(out, unmerged, atol=1e-5)
    assert (out - base).abs().max() > 1e-2  # the adapter changes the model
    emb = merged.class_embedding.weight
    assert not torch.equal(emb, tiny_ldm.unet.class_embedding.weight)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_modules())


def test_bundle_is_self_describing(bundle, tiny_ldm, adapter):
    meta = json.loads((bundle / "bundle.json").read_text())
    assert meta["format"] == "dpfl-onnx-bundle/1"
    assert meta["class_names"] == list(tiny_ldm.spec.class_names)
    assert meta["null_class"] == 10
    assert meta["image"] == {"size": 32, "channels": 1, "source_size": 28, "range": [-1.0, 1.0]}
    assert meta["latent"]["shape"] == [4, 8, 8] and len(meta["latent"]["mean"]) == 4
    assert meta["scheduler"]["prediction_type"] == "v_prediction"
    assert meta["scheduler"]["beta_schedule"] == "squaredcos_cap_v2"
    assert meta["base_fingerprint"] == tiny_ldm.fingerprint()
    assert meta["adapter"]["fingerprint"] == adapter_fingerprint(adapter)
    assert meta["adapter_inputs"] is None  # merged: no adapter can be swapped in
    assert meta["privacy"]["status"] == "stated"
    assert (meta["privacy"]["epsilon"], meta["privacy"]["delta"]) == (3.25, 1e-5)
    assert meta["privacy"]["accountant"] == "rdp" and meta["privacy"]["steps"] == 500
    assert meta["privacy"]["format"] == "dpfl-privacy/1"
    assert meta["created"].startswith("20")
    assert set(meta["variants"]) == {"fp32", "fp16"}
    for v in meta["variants"].values():
        for f in v["files"].values():
            onnx.checker.check_model(str(bundle / f))
        assert v["parity"]["batch_sizes"] == [1, 3]
        assert np.isfinite(v["image_parity"]["max_abs_diff"])
    fp32 = meta["variants"]["fp32"]
    assert fp32["parity"]["unet"]["max_abs_diff"] < 1e-3
    assert fp32["parity"]["decoder"]["max_abs_diff"] < 1e-3
    assert fp32["image_parity"]["max_abs_diff"] < 1e-2


def test_onnx_unet_matches_merged_torch_at_other_batch_sizes(bundle, tiny_ldm, adapter):
    """Independent of the exporter's own check: batch 2 (traced) and 5 (never seen)."""
    merged = merge_adapter(tiny_ldm, adapter)
    sess = ort.InferenceSession(str(bundle / "unet.onnx"), providers=["CPUExecutionProvider"])
    for b in (2, 5):
        x = torch.randn(b, *tiny_ldm.latent_shape)
        t = torch.randint(0, 1000, (b,))
        y = torch.randint(0, 11, (b,))
        with torch.no_grad():
            ref = merged(x, t, class_labels=y).sample.numpy()
        got = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(),
                              "class_labels": y.numpy()})[0]
        assert np.abs(got - ref).max() < 1e-4


def test_excess_difference_refuses_and_writes_nothing(tmp_path, tiny_ldm):
    out = tmp_path / "strict"
    with pytest.raises(ModelError, match=r"max \|diff\| = [0-9.e-]+.*not written"):
        export_bundle(tiny_ldm, out, config=ExportConfig(tolerance=1e-12))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no staging directory left behind


def test_existing_directory_is_not_overwritten(tmp_path, tiny_ldm):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ModelError, match="already exists"):
        export_bundle(tiny_ldm, tmp_path / "taken")


def test_pickled_or_mismatched_adapters_are_refused(tmp_path, tiny_ldm, adapter):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(IncompatibleAdapter, match="safetensors"):
        merge_adapter(tiny_ldm, pickled)
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["no_such_layer"]
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    (other / "adapter_model.safetensors").write_bytes(
        (adapter / "adapter_model.safetensors").read_bytes())
    with pytest.raises(IncompatibleAdapter, match="does not fit"):
        merge_adapter(tiny_ldm, other)


def test_privacy_guarantee_is_read_never_invented(tmp_path):
    assert PrivacyGuarantee().to_json()["status"] == "unknown"
    assert "no differential-privacy guarantee" in PrivacyGuarantee().to_json()["note"]
    stated = PrivacyGuarantee.from_values(1.5, 1e-6)
    assert (stated.status, stated.epsilon, stated.source) == ("stated", 1.5, "command line")
    assert PrivacyGuarantee.from_values(None, None).status == "unknown"
    with pytest.raises(ConfigError, match="both"):
        PrivacyGuarantee.from_values(1.0, None)
    nested = tmp_path / "fed.json"
    nested.write_text(json.dumps({"global": {"epsilon": 4.0, "delta": 1e-5, "accountant": "prv"},
                                  "clients": {"a": {"epsilon": 3.0}, "b": {"epsilon": 4.0}}}))
    g = PrivacyGuarantee.from_file(nested)
    assert (g.epsilon, g.accountant, g.per_client["b"]["epsilon"]) == (4.0, "prv", 4.0)
    history_only = tmp_path / "h.json"
    history_only.write_text(json.dumps({"history": [[1.0, 0.01, 10]]}))
    assert PrivacyGuarantee.from_file(history_only).epsilon is None
    with pytest.raises(ConfigError, match="cannot read privacy file"):
        PrivacyGuarantee.from_file(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="carries no numbers"):
        PrivacyGuarantee(epsilon=1.0, delta=1e-5)  # status "unknown" with numbers
    with pytest.raises(ConfigError, match="epsilon must be a number"):
        PrivacyGuarantee(status="stated", epsilon=float("nan"), delta=1e-5)


class _Ledger:  # what PrivacyLedger offers the guarantee
    path = Path("run/ledger.json")
    sites = {"a": {"epsilon": 3.0, "delta": 1e-5}, "b": {"epsilon": 4.0, "delta": 1e-6}}
    client_level = {"epsilon": 2.0, "delta": 0.1}
    last_round = 3

    def global_guarantee(self):
        return 4.0, 1e-5


def test_privacy_json_one_schema_round_trips(tmp_path):
    from dpfl.shared.privacy.accountant import PersistentAccountant

    acc = PersistentAccountant.open(tmp_path / "accountant.json", delta=1e-5, budget=8.0)
    acc.commit(1.1, 0.01, 500)
    central = PrivacyGuarantee.from_accountant(acc, scope="s", base_fingerprint="sha256:b",
                                               examples=100)
    assert (central.epsilon, central.delta, central.accountant, central.steps) == \
        (acc.epsilon(), 1e-5, acc.kind, 500)  # the ledger's kind (prv by default)
    assert central.detail == {"history": [[1.1, 0.01, 500]], "budget": 8.0, "examples": 100}
    fed = PrivacyGuarantee.from_ledger(_Ledger(), "sha256:b")
    assert (fed.epsilon, fed.delta, fed.rounds, fed.scope) == (4.0, 1e-5, 3, SCOPE_FEDERATED)
    assert fed.per_client == _Ledger.sites and fed.client_level["epsilon"] == 2.0
    for g in (central, fed, PrivacyGuarantee(), PrivacyGuarantee.from_values(1.5, 1e-6)):
        path = g.write(tmp_path / "privacy.json")
        assert json.loads(path.read_text())["format"] == "dpfl-privacy/1"
        assert PrivacyGuarantee.from_file(path) == g
    (tmp_path / "new.json").write_text(json.dumps({"format": "dpfl-privacy/2", "epsilon": 1}))
    with pytest.raises(ConfigError, match="newer dpfl"):
        PrivacyGuarantee.from_file(tmp_path / "new.json")
    (tmp_path / "bad.json").write_text(json.dumps({**fed.to_json(), "delta": 2.0}))
    with pytest.raises(ConfigError, match=f"{re.escape(str(tmp_path / 'bad.json'))}.*delta"):
        PrivacyGuarantee.from_file(tmp_path / "bad.json")


@pytest.mark.parametrize("name, legacy, expected", [
    ("accountant state", {"format": "dpfl-accountant/1", "kind": "prv", "delta": 1e-5,
                          "budget": 8.0, "history": [[1.1, 0.01, 500]], "epsilon": 3.25,
                          "steps": 500}, (3.25, 1e-5, "prv", 500, None)),
    ("federated, before the schema", {"global_epsilon": 4.0, "global_delta": 1e-5,
                                      "sites": {"a": {"epsilon": 4.0}}, "rounds": 3,
                                      "client_level": None, "base_fingerprint": "sha256:b"},
     (4.0, 1e-5, None, None, 3)),
    ("train-full, before the schema", {"epsilon": 2.0, "delta": 1e-3, "accountant": "rdp",
                                       "steps": 8, "sigma": 1.3, "sample_rate": 0.25,
                                       "examples": 40, "scope": "record-level DP of the UNet",
                                       "source": "run/accountant.json"},
     (2.0, 1e-3, "rdp", 8, None)),
])
def test_privacy_files_of_older_dpfl_are_read(tmp_path, name, legacy, expected):
    path = tmp_path / "privacy.json"
    path.write_text(json.dumps(legacy))
    g = PrivacyGuarantee.from_file(path)
    assert g.status == "stated"
    assert (g.epsilon, g.delta, g.accountant, g.steps, g.rounds) == expected
    assert g.source == str(path) and g.detail == legacy  # the file as it was, for audit
    rewritten = PrivacyGuarantee.from_file(g.write(tmp_path / "again.json"))
    assert rewritten == g  # and written again in the one schema


def test_server_export_command(tmp_path, tiny_ldm, adapter):
    from dpfl.server.cli import main
    from dpfl.shared.ldm.models import save_ldm

    base = save_ldm(tiny_ldm, tmp_path / "base")
    out = tmp_path / "bundle"
    res = CliRunner().invoke(main, ["export", str(base), "--adapter", str(adapter), "--out",
                                    str(out), "--epsilon", "2", "--delta", "1e-5"])
    assert res.exit_code == 0, res.output
    assert "fp32: unet max|diff|" in res.output
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["privacy"]["epsilon"] == 2.0 and meta["privacy"]["source"] == "command line"
    res = CliRunner().invoke(main, ["export", str(base), "--out", str(tmp_path / "x"),
                                    "--tolerance", "1e-12"])
    assert res.exit_code != 0 and "not written" in res.output
