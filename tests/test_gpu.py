"""GPU readiness (issue #15; ``scripts/gpu-check.sh``, ``bench/gpu_check.py``): the CUDA
checks, marked ``gpu`` and skipped where torch sees no GPU, and the check's own code path,
which runs on CPU."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpfl.shared.ldm.lora import PRESETS, LoraSpec

ROOT = Path(__file__).resolve().parent.parent
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason=f"needs a CUDA GPU: torch {torch.__version__} sees none "
           "(run bash scripts/gpu-check.sh on a GPU machine)")


def _gpu_check():
    """bench/gpu_check.py (not a package), imported once."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check",
                                                      ROOT / "bench" / "gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_per_sample_grads_equal_autograd_on_cuda(tiny_ldm, preset, k):
    """Opacus issue #820 (silently corrupted LoRA updates, possibly CUDA-only): Opacus'
    per-example gradients, K draws each, equal per-example autograd on the GPU."""
    check = _gpu_check()
    with check.ieee_fp32():
        tensor, example = check.per_sample_grad_errors(tiny_ldm, preset, k,
                                                       torch.device("cuda"), examples=3)
    assert tensor < check.TENSOR_TOL and example < check.EXAMPLE_TOL, (
        f"{preset} K={k}: relative error {tensor:.2e} (worst parameter), {example:.2e} "
        "(worst example)")


@pytest.mark.gpu
@needs_cuda
def test_one_dp_step_on_cuda(tiny_ldm, tmp_path):
    from dpfl.shared.privacy.accountant import PersistentAccountant
    from dpfl.shared.privacy.dpsgd import DPConfig, train_lora

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(16, 4, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    dp = DPConfig(noise_multiplier=0.5, delta=1e-3, accountant="rdp", batch_size=16,
                  max_physical_batch=8, noise_multiplicity=2, lr=1e-2, device="cuda")
    acc = PersistentAccountant.open(tmp_path / "acc.json", kind=dp.accountant, delta=1e-3,
                                     budget=50)
    res = train_lora(tiny_ldm, z, y, LoraSpec(rank=2), dp, acc, progress=False)
    assert res.steps == 1 and acc.steps == 1 and math.isfinite(res.mean_loss)
    assert all(v.device.type == "cpu" and torch.isfinite(v).all() for v in res.adapter.values())
    # LoRA B starts at zero: the one noisy step moved every B
    assert all(v.abs().sum() > 0 for k, v in res.adapter.items() if "lora_B" in k)


def test_the_comparison_catches_wrong_per_sample_grads(tiny_ldm, monkeypatch):
    """The check is not vacuous: with the K rows of each example left unreduced (the
    audit's test-only broken mechanism), the per-example gradients are far off."""
    import dpfl.shared.privacy.multiplicity as multiplicity

    check = _gpu_check()
    monkeypatch.setattr(multiplicity, "_INJECT_ROWS_CLIPPED_SEPARATELY", True)
    tensor, example = check.per_sample_grad_errors(tiny_ldm, "attention", 4,
                                                   torch.device("cpu"), examples=2)
    assert tensor > 100 * check.TENSOR_TOL and example > 100 * check.EXAMPLE_TOL


def test_quick_check_runs_on_cpu(tmp_path, capsys):
    """The check's whole code path but the round (Ray start-up alone takes minutes on 2
    loaded cores; the round's command line is checked below), tiny model, on CPU."""
    check = _gpu_check()
    code = check.main(["--device", "cpu", "--quick", "--skip-round", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == check.EXIT_OK, out
    path = tmp_path / "gpu-check.json"
    assert f"summary: {path}" in out and "DP steps/s:" in out
    doc = json.loads(path.read_text())
    assert doc["status"] == "passed" and doc["passed"] and doc["device"] == "cpu"
    assert {"torch", "opacus", "peft", "device_name"} <= set(doc)
    assert 0 <= doc["max_per_sample_grad_error"] < 1e-4
    cases = doc["checks"]["per_sample_grads"]["cases"]
    assert {c["preset"] for c in cases} == set(PRESETS) and all(c["k"] > 1 for c in cases)
    assert doc["steps_per_s"] > 0 and doc["wall_s"] > 0
    assert doc["checks"]["federated_round"] == {"passed": None, "skipped": "--skip-round"}


def test_script_runs_the_python_entry():
    proc = subprocess.run(["bash", "scripts/gpu-check.sh", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quick" in proc.stdout and "--device" in proc.stdout


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_without_gpu_it_says_so_and_exits_3(tmp_path, monkeypatch, capsys, device):
    check = _gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check.main(["--device", device, "--out", str(tmp_path)]) == check.EXIT_NO_GPU == 3
    out = capsys.readouterr()
    assert "NO GPU" in out.err and "nothing was checked" in out.err
    doc = json.loads((tmp_path / "gpu-check.json").read_text())
    assert doc["status"] == "no-gpu" and doc["passed"] is False and "checks" not in doc


@pytest.mark.parametrize("quick", [True, False])
def test_round_command_is_a_valid_simulate_call_at_the_full_preset(tmp_path, quick):
    from dpfl.server.cli import main as server_main
    from dpfl.server.experiment import PRESETS as EXPERIMENTS
    from dpfl.shared.federation.config import FedConfig

    check = _gpu_check()
    sizes = check.QUICK if quick else check.gpu_sizes("models/fmnist-base", 9000)
    argv = check.round_command(sizes, "models/fmnist-base", "fmnist:private",
                               tmp_path / "round", 1 / 3)
    command = server_main.get_command(server_main.make_context("dpfl-server", list(argv)),
                                      "simulate")
    params = command.make_context("simulate", argv[1:]).params
    assert params["gpus_per_site"] == pytest.approx(1 / 3)
    assert params["num_sites"] == sizes.round_sites
    cfg = FedConfig.from_run_config(dict(o.split("=", 1) for o in params["overrides"]))
    assert cfg.num_rounds == 1
    if not quick:
        full = EXPERIMENTS["full"]
        assert (cfg.batch_size, cfg.noise_multiplicity, cfg.lora_preset, cfg.lora_rank) == (
            full.batch_size, full.noise_multiplicity, full.lora_preset, full.lora_rank)
