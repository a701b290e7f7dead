"""The standard privacy-utility experiment, end to end: train, evaluate, report, tabulate.

Fashion-MNIST with dpfl's standard split (public = half of classes 0-4, which trained the
shipped base model; private = the other 45,000 training images; test = the 10,000 test
images). One *setting* per call:

``federated``  3 simulated hospitals, non-IID (Dirichlet 0.5) silos of the private data, DP-LoRA
               with every site at the given ε (global record-level ε = max over sites)
``central``    one silo holding the same private images, DP-LoRA at the given ε
``scratch``    the whole UNet trained from random initialisation under DP-SGD on the same
               images (DPDM-style, no public pretraining of the denoiser)
``floor``      the public base model's samples, no fine-tuning (ε = 0: private data untouched)
``ceiling``    the same CNN trained on real private images (no privacy: ε = ∞)
``ae-ceiling`` the same CNN trained on the base model's *autoencoder reconstructions* of the
               real private images (no privacy: ε = ∞): what any DP recipe that fine-tunes only
               the UNet can reach with this autoencoder (:mod:`dpfl.shared.eval.autoencoder`)

Every row scores the synthetic (or real, or reconstructed) set with our downstream CNN;
``--classifiers all`` also trains DPImageBench's three (a small ResNet, WideResNet and ResNeXt,
:mod:`dpfl.shared.eval.classifiers`) and records their mean as ``accuracy_mean3``, at about
5-6 times the CNN's training time, so it is off by default; such a row's name ends in ``-all``.

Each run directory gets ``evaluation/evaluation.json`` (:mod:`dpfl.shared.eval.evaluate`), the run
report (``report/report.html``), ``row.json`` and ``record.json`` (the one schema of a committed
row, :class:`dpfl.shared.eval.record.ResultRecord`); the parent folder collects every row in
``results.jsonl`` and renders ``results.md``, the table ``docs/results.md`` quotes.

The private data is always the private part of the base model's own split (its model card
records the public part it was pretrained on, ``fmnist:public`` = seed 0): ``--seed`` seeds
training, partitioning and evaluation, never the split (:func:`private_data`).

Presets set the size: ``tiny`` (seconds of DP training, for tests), ``cpu`` (minutes on 2 CPU
cores), ``fulldata`` (all 45,000 private images and 60,000 synthetic ones, DP training cut
to about an hour of 2 CPU cores per row), ``full`` (the paper-size protocol: 60,000
synthetic images, 30 passes at K = 8; meant for a GPU).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpfl.shared.errors import ConfigError
from dpfl.shared.eval.record import CLASSIFIER_SETS
from dpfl.shared.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from dpfl.shared.rundir import RunDir

if TYPE_CHECKING:
    from dpfl.shared.eval.record import ResultRecord

log = logging.getLogger(__name__)

RECORD_FILE = "record.json"  # the row in the committed schema, in every run directory
CLASSIFIER = "eval-classifier"  # one public-data classifier per base model: comparable FDs
PRIVATE_SETTINGS = ("federated", "central", "scratch")  # these train on the private data
SETTINGS = (*PRIVATE_SETTINGS, "floor", "ceiling", "ae-ceiling")
REAL_SETTINGS = ("ceiling", "ae-ceiling")  # the CNN trains on (reconstructed) real images


@dataclass(frozen=True)
class ExperimentPreset:
    """Sizes of one experiment (every setting of a preset uses the same data and evaluation).

    Attributes:
        max_examples: private images used in total (0: all 45,000).
        num_sites: hospitals of the federated setting.
        rounds, local_epochs: federated rounds and local epochs per round; the central and
            scratch settings train ``rounds * local_epochs`` epochs, the same passes over data.
        batch_size, noise_multiplicity, clip, lr, lora_preset, lora_rank: DP-LoRA settings.
        scratch_lr: learning rate of the from-scratch baseline.
        per_class, sample_steps, guidance: synthetic evaluation set (class-balanced).
        eval_epochs: downstream CNN epochs; classifier_epochs: the public domain classifier's.
        test_limit: evaluate on the first N test images (0: all 10,000).
    """

    max_examples: int
    num_sites: int = 3
    rounds: int = 3
    local_epochs: int = 1
    batch_size: int = 128
    noise_multiplicity: int = 2
    clip: float = 1.0
    lr: float = 5e-3
    lora_preset: str = "attention+proj"
    lora_rank: int = 8
    scratch_lr: float = 3e-4
    per_class: int = 200
    sample_steps: int = 20
    guidance: float = 1.0
    eval_epochs: int = 10
    classifier_epochs: int = 10


PRESETS: dict[str, ExperimentPreset] = {
    "tiny": ExperimentPreset(max_examples=600, rounds=1, batch_size=64, noise_multiplicity=1,
                             lora_rank=4, per_class=10, sample_steps=4, eval_epochs=2,
                             classifier_epochs=1),
    "cpu": ExperimentPreset(max_examples=4500, rounds=3, local_epochs=2),
    # all private images and the published evaluation size (60,000 synthetic images), with the
    # DP training cut to what two CPU cores do in about an hour per row (8 passes, K = 2)
    "fulldata": ExperimentPreset(max_examples=0, rounds=4, local_epochs=2, batch_size=256,
                                 per_class=6000),
    "full": ExperimentPreset(max_examples=0, rounds=10, local_epochs=3, batch_size=512,
                             noise_multiplicity=8, per_class=6000, sample_steps=50,
                             eval_epochs=20),
}


@dataclass(frozen=True)
class Experiment:
    """One row of the results table."""

    setting: str
    epsilon: float = 10.0
    delta: float = 1e-5
    preset: str = "cpu"
    base_model: str = "models/fmnist-base"
    out: str = "runs/experiments"
    seed: int = 0
    device: str = "auto"
    classifier_dir: str | None = None
    classifiers: str = "cnn"  # "all": also the DPImageBench 3-classifier mean (record.py)

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ConfigError(f"setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.preset not in PRESETS:
            raise ConfigError(f"preset must be one of {sorted(PRESETS)}, got {self.preset!r}")
        if self.private and not self.epsilon > 0:
            raise ConfigError(f"epsilon must be > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}")
        if self.classifiers not in CLASSIFIER_SETS:
            raise ConfigError(f"classifiers must be one of {list(CLASSIFIER_SETS)}, got "
                              f"{self.classifiers!r}")

    @property
    def sizes(self) -> ExperimentPreset:
        return PRESETS[self.preset]

    @property
    def private(self) -> bool:
        return self.setting in PRIVATE_SETTINGS

    @property
    def name(self) -> str:
        eps = f"-eps{self.epsilon:g}" if self.private else ""
        scored = "" if self.classifiers == "cnn" else f"-{self.classifiers}"
        return f"{self.setting}{eps}-{self.preset}-s{self.seed}{scored}"

    @property
    def run_dir(self) -> Path:
        return Path(self.out) / self.name


def machine() -> str:
    """What the numbers were measured on, in words."""
    import torch

    cpu = platform.processor() or platform.machine()
    words = f"{os.cpu_count()} CPU cores ({cpu}), torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        words += f", GPU {torch.cuda.get_device_name(0)}"
    return words


def private_data(exp: Experiment) -> str:
    """The experiment's private data: the private part of the split whose public part
    trained the base model (its model card's ``data``), whatever ``exp.seed`` is. ``--seed``
    seeds training, partitioning and evaluation; another split's private part would hold
    images the base model saw."""
    from dpfl.shared.data.sources import model_card, pretrain_split_seed

    card = model_card(exp.base_model)
    seed = pretrain_split_seed(card)
    if seed is None:
        raise ConfigError(f"base model {exp.base_model}: its model card names its pretraining "
                          f"data {card.get('data')!r}, not the standard split's public part "
                          "(fmnist:public[@SEED]), so no private split is known to be disjoint "
                          "from it; pretrain it with 'dpfl-server pretrain --data "
                          "fmnist:public' or pass such a base model")
    return f"fmnist:private@{seed}"


def _eval_config(exp: Experiment, **kw: Any):
    from dpfl.shared.eval.evaluate import EvalConfig

    s = exp.sizes
    return EvalConfig(per_class=s.per_class, steps=s.sample_steps, guidance=s.guidance,
                      seed=exp.seed, epochs=s.eval_epochs, classifier_epochs=s.classifier_epochs,
                      classifier_dir=exp.classifier_dir or str(Path(exp.base_model) / CLASSIFIER),
                      classifiers=exp.classifiers, device=exp.device, **kw)


def _federated(exp: Experiment, run: Path, data: str
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    from dpfl.server.simulate import SimulationSetup, simulate
    from dpfl.shared.federation.config import FedConfig
    from dpfl.shared.federation.ledger import PrivacyLedger

    s = exp.sizes
    cfg = FedConfig(base_model=exp.base_model, run_dir=str(run), num_rounds=s.rounds,
                    local_epochs=s.local_epochs, batch_size=s.batch_size,
                    noise_multiplicity=s.noise_multiplicity, clip=s.clip, lr=s.lr,
                    target_epsilon=exp.epsilon, lora_preset=s.lora_preset, lora_rank=s.lora_rank,
                    lora_alpha=2.0 * s.lora_rank, seed=exp.seed,
                    min_available_nodes=s.num_sites, sample_every=s.rounds,
                    sample_steps=s.sample_steps)
    setup = SimulationSetup(data=data, num_sites=s.num_sites,
                            scheme="dirichlet", alpha=0.5, max_examples=s.max_examples,
                            epsilon_budget=exp.epsilon, delta=exp.delta, seed=exp.seed)
    simulate(cfg, setup)
    eps, delta = PrivacyLedger.load_or_create(run / "ledger.json").global_guarantee()
    return ({"epsilon": eps, "delta": delta},
            {"model": exp.base_model, "adapter": str(run / "adapter")})


def _central(exp: Experiment, run: Path, data: str
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    from dpfl.client.train import TrainJob, run_train
    from dpfl.shared.ldm.lora import LoraSpec
    from dpfl.shared.privacy.dpsgd import DPConfig

    s = exp.sizes
    job = TrainJob(data=data, model=exp.base_model, run_dir=str(run),
                   limit=s.max_examples, sample_steps=s.sample_steps)
    lora = LoraSpec(preset=s.lora_preset, rank=s.lora_rank, alpha=2.0 * s.lora_rank)
    dp = DPConfig(target_epsilon=exp.epsilon, delta=exp.delta, batch_size=s.batch_size,
                  max_physical_batch=min(256, s.batch_size),
                  noise_multiplicity=s.noise_multiplicity, clip=s.clip, lr=s.lr,
                  epochs=s.rounds * s.local_epochs, seed=exp.seed, device=exp.device)
    out = run_train(job, lora, dp)
    return ({"epsilon": out["epsilon"], "delta": out["delta"]},
            {"model": exp.base_model, "adapter": out["adapter"]})


def _scratch(exp: Experiment, run: Path, data: str
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    from dpfl.client.train import TrainJob
    from dpfl.client.train_full import run_train_full
    from dpfl.shared.privacy.dpsgd import DPConfig

    s = exp.sizes
    job = TrainJob(data=data, model=exp.base_model, run_dir=str(run),
                   limit=s.max_examples, sample_steps=s.sample_steps)
    dp = DPConfig(target_epsilon=exp.epsilon, delta=exp.delta, batch_size=s.batch_size,
                  max_physical_batch=min(16, s.batch_size),
                  noise_multiplicity=s.noise_multiplicity, clip=s.clip, lr=s.scratch_lr,
                  epochs=s.rounds * s.local_epochs, seed=exp.seed, device=exp.device)
    out = run_train_full(job, dp, init="scratch")
    return ({"epsilon": out["epsilon"], "delta": out["delta"]}, {"model": out["model"]})


def _untrained(exp: Experiment, run: Path, data: str
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Settings where nothing trains: the configuration is the whole run."""
    RunDir(run).write_config(exp, sizes=dataclasses.asdict(exp.sizes))
    if exp.setting == "floor":
        return {"epsilon": 0.0, "delta": 0.0}, {"model": exp.base_model}
    gen: dict[str, Any] = {"train_real": data, "train_per_class": exp.sizes.per_class}
    if exp.setting == "ae-ceiling":
        gen["autoencoder"] = exp.base_model
    return {"epsilon": float("inf"), "delta": 0.0}, gen


def run_experiment(exp: Experiment, command: str | None = None) -> dict[str, Any]:
    """Train (per setting), evaluate, write the report and the row; returns the row."""
    from dpfl.shared.eval.evaluate import evaluate
    from dpfl.shared.report.build import try_write_report

    run = exp.run_dir
    run.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    s = exp.sizes
    trainers = {"federated": _federated, "central": _central, "scratch": _scratch}
    data = private_data(exp) if exp.setting != "floor" else ""  # refused before training
    privacy, gen = (trainers[exp.setting] if exp.private else _untrained)(exp, run, data)
    trained = time.perf_counter() - start
    record = evaluate(_eval_config(exp, **gen), run / "evaluation")
    try_write_report(run)
    row = {"name": exp.name, "setting": exp.setting, "preset": exp.preset,
           "epsilon": privacy["epsilon"], "delta": privacy["delta"],
           "target_epsilon": exp.epsilon if exp.private else None,
           "accuracy": record["downstream"]["accuracy"],
           "accuracy_mean3": record["mean3"]["accuracy"] if record.get("mean3") else None,
           "domain_fd": record["domain"]["fd"],
           "precision": record["domain"]["precision"], "recall": record["domain"]["recall"],
           "fid": record["fid"]["value"] if record.get("fid") else None,
           "synthetic_per_class": s.per_class if exp.setting not in REAL_SETTINGS else None,
           "train_seconds": round(trained, 1),
           "total_seconds": round(time.perf_counter() - start, 1),
           "machine": machine(),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": command or "", "sizes": dataclasses.asdict(s), "run_dir": str(run)}
    atomic_write_json(run / "row.json", row)
    result_record(exp, row, record).write(run / RECORD_FILE)
    append_jsonl(Path(exp.out) / "results.jsonl", row)
    atomic_write_text(Path(exp.out) / "results.md", results_table(read_jsonl(
        Path(exp.out) / "results.jsonl")))
    return row


def result_record(exp: Experiment, row: dict[str, Any],
                  evaluation: dict[str, Any]) -> ResultRecord:
    """The row in the committed schema (:class:`~dpfl.shared.eval.record.ResultRecord`)."""
    from dpfl.shared.data.sources import model_card
    from dpfl.shared.eval.record import ResultRecord

    sites = {"federated": exp.sizes.num_sites, "floor": 0}.get(exp.setting, 1)
    guaranteed = exp.setting not in REAL_SETTINGS
    extra: dict[str, Any] = {"domain_fd": row["domain_fd"], "precision": row["precision"],
                             "recall": row["recall"], "fid": row["fid"],
                             "target_epsilon": row["target_epsilon"], "run_dir": row["run_dir"],
                             "train_size": evaluation["train_set"]["size"]}
    if "autoencoder" in evaluation:
        ae = evaluation["autoencoder"]
        extra.update(reconstruction_mse=ae["train"]["mse"],
                     reconstruction_mse_per_class=ae["train"]["mse_per_class"],
                     reconstruction_mse_test=ae["test"]["mse"],
                     latent_shape=ae["latent_shape"], grid=evaluation["grid"])
    if evaluation.get("mean3"):
        extra["classifiers"] = {name: _classifier_summary(r) for name, r in
                                evaluation["mean3"]["classifiers"].items()}
        extra["classifiers"]["cnn"] = _classifier_summary(evaluation["downstream"])
    return ResultRecord(
        setting=exp.setting, sites=sites,
        epsilon=row["epsilon"] if guaranteed else None,
        delta=row["delta"] if guaranteed else None, seed=exp.seed,
        accuracy_cnn=row["accuracy"], accuracy_mean3=row.get("accuracy_mean3"),
        per_class=evaluation["downstream"]["per_class"], wall_s=row["total_seconds"],
        command=row["command"],
        base_model_fingerprint=str(model_card(exp.base_model).get("fingerprint")),
        preset=exp.preset, date=row["date"], machine=row["machine"], extra=extra)


def _classifier_summary(result: dict[str, Any]) -> dict[str, Any]:
    """One downstream classifier's result (evaluate's ``AccuracyResult``) in a record."""
    keys = ("accuracy", "per_class", "parameters", "epochs", "selected_epoch", "seconds")
    return {k: result.get(k) for k in keys}


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v == float("inf"):
        return "∞"
    return format(v, spec) if isinstance(v, (int, float)) else str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def results_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of result rows (latest row per name)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in rows:
        latest[r["name"]] = r
    lines = ["| setting | preset | ε | δ | accuracy | 3-classifier mean | domain FD | precision | "
             "recall | FID | samples/class | wall time | machine | date | command |",
             "|" + "---|" * 15]
    for r in latest.values():
        lines.append("| " + " | ".join([
            r["setting"], r["preset"], _fmt(r["epsilon"], ".2f"), _fmt(r["delta"], ".0e"),
            _fmt(100 * r["accuracy"], ".1f") + " %", _pct(r.get("accuracy_mean3")),
            _fmt(r["domain_fd"], ".2f"),
            _fmt(r["precision"], ".2f"), _fmt(r["recall"], ".2f"), _fmt(r["fid"], ".1f"),
            _fmt(r["synthetic_per_class"], "d"), f"{r['total_seconds'] / 60:.1f} min",
            r["machine"], r["date"][:10], f"`{r['command']}`"]) + " |")
    return "\n".join(lines) + "\n"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["dpfl-server", *sys.argv[1:]])
