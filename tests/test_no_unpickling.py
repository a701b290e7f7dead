"""Nothing dpfl receives from another party is unpickled: the product code never calls a
pickle-based loader, except where it is fenced (weights_only / allow_pickle=False) or reads a
file the operator put on their own disk (the Inception network for FID)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "client", "server")
LOADERS = re.compile(r"\b(pickle|cPickle|dill|joblib|cloudpickle)\b|torch\.load\(|np\.load\(|"
                     r"numpy\.load\(|jit\.load\(|\.from_pretrained\(")
FENCED = {"torch.load(": "weights_only=True", "np.load(": "allow_pickle=False"}
OPERATOR_FILES = {("shared/eval/fid.py", "jit.load(")}  # the user's own Inception file
# from_pretrained calls fenced before the call (a safetensors file required, or
# use_safetensors=True); the behaviour is tested below
SAFETENSORS_ONLY = {("shared/export/onnx_bundle.py", ".from_pretrained("),
                    ("shared/ldm/lora.py", ".from_pretrained("),
                    ("shared/ldm/models.py", ".from_pretrained(")}


def _calls():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            for no, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if code.strip().startswith(('"', "'")):
                    continue
                for m in LOADERS.finditer(code):
                    yield rel, no, m.group(0), code


def test_every_loader_call_is_fenced_or_reads_an_operator_file():
    offending = []
    for rel, no, call, code in _calls():
        if call in FENCED and FENCED[call] in code:
            continue
        if (rel, call) in OPERATOR_FILES | SAFETENSORS_ONLY:
            continue
        offending.append(f"{rel}:{no}: {code.strip()}")
    assert offending == [], "\n".join(offending)


def test_the_scan_finds_loader_calls_at_all():
    assert any(call == "np.load(" for _, _, call, _ in _calls())  # the .npz reader


def test_pickled_adapter_and_model_weights_are_refused(tmp_path, tiny_ldm):
    import pytest
    import torch
    from safetensors.torch import load_file

    from dpfl.shared.errors import IncompatibleAdapter, ModelError
    from dpfl.shared.ldm.lora import LoraSpec, load_adapter, save_adapter, wrap_unet
    from dpfl.shared.ldm.models import load_ldm, save_ldm

    adapter = save_adapter(wrap_unet(tiny_ldm.unet, LoraSpec()), tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    torch.save(load_file(weights), adapter / "adapter_model.bin")  # the same weights, pickled
    weights.unlink()
    with pytest.raises(IncompatibleAdapter, match="never pickled"):
        load_adapter(tiny_ldm.unet, adapter)
    model = save_ldm(tiny_ldm, tmp_path / "model")
    for f in (model / "unet").glob("*.safetensors"):  # the same weights, pickled
        torch.save(load_file(f), f.with_suffix(".bin"))
        f.unlink()
    with pytest.raises(ModelError, match="safetensors"):
        load_ldm(model)
