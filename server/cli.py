"""``dpfl-server``: what the coordinator runs (public pretraining, base model tools).

Options take their defaults and choices from the dataclasses and registries that own them;
commands whose settings live in torch modules make their options on first use
(:class:`dpfl.shared.cli.LazyCommand`), so the group and its light commands start fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import click

from dpfl.server.deploycli import PKI_DIR, run_cmd, serve, status, stop
from dpfl.server.experiment import PRESETS as EXPERIMENT_PRESETS
from dpfl.server.experiment import SETTINGS, Experiment
from dpfl.shared.cli import CTX, LazyCommand, fail
from dpfl.shared.defaults import LOG_FORMAT, TIMESTEP_SPACINGS, default_of
from dpfl.shared.errors import DpflError
from dpfl.shared.eval.record import CLASSIFIER_SETS


def _threads() -> click.Option:
    return click.Option(["--threads"], type=click.IntRange(min=0), default=0,
                        help="torch CPU threads (0: torch's default).")


@click.group(context_settings=CTX)
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """dpfl coordinator: hosts the public base model and aggregates DP adapters."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=LOG_FORMAT)


def _pretrain_options() -> list[click.Parameter]:
    from dpfl.shared.data.readers import IMAGE_POLICIES
    from dpfl.shared.ldm.models import PRESETS
    from dpfl.shared.ldm.pretrain import PretrainConfig

    cfg = partial(default_of, PretrainConfig)
    positive = click.FloatRange(min=0, min_open=True)
    fraction = click.FloatRange(0, 1, max_open=True)
    return [
        click.Option(["--data"], default="fmnist:public",
                     help="PUBLIC data only: fmnist:public, an image folder, .npz or IDX file."),
        click.Option(["--preset"], type=click.Choice(list(PRESETS)), default=cfg("preset")),
        click.Option(["--run-dir"], type=click.Path(file_okay=False), default="runs/pretrain"),
        click.Option(["--out"], type=click.Path(file_okay=False), default=None,
                     help="Base model directory to write [default: RUN_DIR/model]."),
        click.Option(["--ae-steps"], type=click.IntRange(min=0), default=cfg("ae_steps")),
        click.Option(["--unet-steps"], type=click.IntRange(min=0), default=cfg("unet_steps")),
        click.Option(["--batch-size"], type=click.IntRange(min=1), default=cfg("batch_size")),
        click.Option(["--ae-lr"], type=positive, default=cfg("ae_lr")),
        click.Option(["--unet-lr"], type=positive, default=cfg("unet_lr")),
        click.Option(["--kl-weight"], type=click.FloatRange(min=0), default=cfg("kl_weight")),
        click.Option(["--edge-weight"], type=click.FloatRange(min=0), default=cfg("edge_weight"),
                     help="Weight of the autoencoder's edge-aware loss term (0: off)."),
        click.Option(["--cond-drop"], type=fraction, default=cfg("cond_drop")),
        click.Option(["--ema-decay"], type=fraction, default=cfg("ema_decay")),
        click.Option(["--seed"], type=int, default=cfg("seed")),
        click.Option(["--checkpoint-every"], type=click.IntRange(min=1),
                     default=cfg("checkpoint_every")),
        click.Option(["--device"], default=cfg("device"), help="auto, cpu or cuda[:N]."),
        click.Option(["--image-policy"], type=click.Choice(IMAGE_POLICIES),
                     default=cfg("image_policy"),
                     help="Images not of the preset's size: refuse them (naming the sizes), "
                          "resize them, or center-crop a square and resize it."),
        _threads(),
    ]


@main.command(cls=LazyCommand, options=_pretrain_options, context_settings=CTX)
def pretrain(data: str, run_dir: str, out: str | None, threads: int, **kw) -> None:
    """Train the base LDM (autoencoder, then UNet) on public data. Resumable."""
    import torch

    from dpfl.shared.data.sources import load_source
    from dpfl.shared.ldm.pretrain import PretrainConfig
    from dpfl.shared.ldm.pretrain import pretrain as run_pretrain

    if threads:
        torch.set_num_threads(threads)
    try:
        cfg = PretrainConfig(**kw)
        if data.startswith("fmnist:") and data.split("@")[0] != "fmnist:public":
            raise DpflError(f"--data {data}: pretraining may only use public data (fmnist:public)")
        ds = load_source(data)
        click.echo(f"pretraining on {len(ds)} images from {ds.source}")
        ldm = run_pretrain(cfg, ds, run_dir, out, data_description=data)
    except DpflError as exc:
        fail(exc)
    click.echo(f"base model: {out or Path(run_dir) / 'model'}  "
               f"fingerprint {ldm.card['fingerprint']}")
    click.echo(f"sample grid: {Path(run_dir) / 'samples.png'}")


def _sample_options() -> list[click.Parameter]:
    from dpfl.shared.ldm.sampling import class_grid

    grid = partial(default_of, class_grid)
    return [
        click.Option(["--out"], type=click.Path(dir_okay=False), default="samples.png"),
        click.Option(["--per-class"], type=click.IntRange(1, 64), default=grid("per_class")),
        click.Option(["--steps"], type=click.IntRange(1, 1000), default=grid("steps")),
        click.Option(["--guidance"], type=click.FloatRange(min=0), default=grid("guidance")),
        click.Option(["--seed"], type=int, default=grid("seed")),
    ]


@main.command(cls=LazyCommand, options=_sample_options, context_settings=CTX)
@click.argument("model_dir", type=click.Path())
def sample(model_dir: str, out: str, per_class: int, steps: int, guidance: float,
           seed: int) -> None:
    """Sample a class grid PNG from a base model directory."""
    from dpfl.shared.ldm.models import load_ldm
    from dpfl.shared.ldm.sampling import class_grid

    try:
        ldm = load_ldm(model_dir)
    except DpflError as exc:
        fail(exc)
    class_grid(ldm, out, per_class=per_class, steps=steps, guidance=guidance, seed=seed,
               title=f"{Path(model_dir).name} ({steps} DDIM steps, guidance {guidance})")
    click.echo(f"wrote {out}")


@main.command(context_settings=CTX)
@click.argument("model_dir", type=click.Path())
def info(model_dir: str) -> None:
    """Print a model directory's card and fingerprint (recomputed from the weights)."""
    from dpfl.shared.ldm.models import load_ldm

    try:
        ldm = load_ldm(model_dir)
    except DpflError as exc:
        fail(exc)
    click.echo(json.dumps({"spec": dataclasses.asdict(ldm.spec), "card": ldm.card,
                           "fingerprint": ldm.fingerprint()}, indent=2, default=str))


def _evaluate_options() -> list[click.Parameter]:
    from dpfl.shared.eval.evaluate import EvalConfig

    cfg = partial(default_of, EvalConfig)
    return [
        click.Option(["--model"], type=click.Path(file_okay=False), default=cfg("model"),
                     help="Base model whose samples are evaluated (or give --train-real)."),
        click.Option(["--adapter"], type=click.Path(file_okay=False), default=cfg("adapter"),
                     help="peft adapter directory merged into --model (e.g. RUN_DIR/adapter)."),
        click.Option(["--train-real"], default=cfg("train_real"), metavar="SOURCE",
                     help="Evaluate this real set instead of samples (the non-private ceiling)."),
        click.Option(["--train-per-class"], type=click.IntRange(min=0),
                     default=cfg("train_per_class"),
                     help="With --train-real: at most this many images of each class, seeded "
                          "(0: all)."),
        click.Option(["--per-class"], type=click.IntRange(min=1), default=cfg("per_class"),
                     help="Samples per class."),
        click.Option(["--steps"], type=click.IntRange(1, 1000), default=cfg("steps"),
                     help="DDIM steps."),
        click.Option(["--guidance"], type=click.FloatRange(min=0), default=cfg("guidance")),
        click.Option(["--spacing"], type=click.Choice(list(TIMESTEP_SPACINGS)),
                     default=cfg("spacing"),
                     help="DDIM timestep spacing [the model scheduler's]; trailing starts at "
                          "the last training timestep."),
        click.Option(["--seed"], type=int, default=cfg("seed")),
        click.Option(["--batch-size"], type=click.IntRange(min=1), default=cfg("batch_size"),
                     help="Sampling batch."),
        click.Option(["--test"], default=cfg("test"),
                     help="Real test set (also the FD reference)."),
        click.Option(["--out"], type=click.Path(file_okay=False), required=True,
                     help="Folder for evaluation.json, samples.png and samples.npz."),
        *_downstream_options(cfg),
        _threads(),
        click.Option(["--progress/--no-progress"], default=True),
    ]


def _downstream_options(cfg: Callable[[str], Any]) -> list[click.Parameter]:
    """``evaluate``'s options for the downstream CNN, the domain classifier and FID."""
    return [
        click.Option(["--epochs"], type=click.IntRange(min=1), default=cfg("epochs"),
                     help="Downstream CNN epochs."),
        click.Option(["--val-fraction"], type=click.FloatRange(0, 1, max_open=True),
                     default=cfg("val_fraction"),
                     help="Share of the training set held out to pick the epoch (0: last "
                          "epoch)."),
        click.Option(["--classifiers"], type=click.Choice(list(CLASSIFIER_SETS)),
                     default=cfg("classifiers"),
                     help="cnn: the downstream CNN only; all: also DPImageBench's ResNet, "
                          "WideResNet and ResNeXt and their mean."),
        click.Option(["--classifier-dir"], type=click.Path(file_okay=False),
                     default=cfg("classifier_dir"),
                     help="Domain classifier folder, trained there on --classifier-data if "
                          "absent [default: MODEL/eval-classifier, or "
                          "models/fmnist-base/eval-classifier]."),
        click.Option(["--classifier-data"], default=cfg("classifier_data"),
                     help="PUBLIC data for the domain classifier."),
        click.Option(["--inception"], type=click.Path(dir_okay=False), default=cfg("inception"),
                     help="Local inception-2015-12-05.pt for FID [default: $DPFL_INCEPTION; "
                          "unset: no FID]."),
        click.Option(["--device"], default=cfg("device"), help="auto, cpu or cuda[:N]."),
    ]


@main.command(cls=LazyCommand, options=_evaluate_options, context_settings=CTX)
def evaluate(out: str, threads: int, progress: bool, **kw) -> None:
    """Utility of samples (or of a real set): downstream CNN accuracy on the real test set,
    domain Fréchet distance, precision/recall, and FID with a local Inception file."""
    import torch

    from dpfl.shared.eval.evaluate import EvalConfig, summary_table
    from dpfl.shared.eval.evaluate import evaluate as run_evaluate

    if threads:
        torch.set_num_threads(threads)
    try:
        record = run_evaluate(EvalConfig(**kw), out, progress=progress)
    except DpflError as exc:
        fail(exc)
    click.echo(summary_table(record))
    click.echo(f"wrote {Path(out) / 'evaluation.json'}"
               + (f" and {record['grid']}" if record["grid"] else ""))


def _privacy_options() -> list[click.Parameter]:
    return [
        click.Option(["--privacy"], type=click.Path(dir_okay=False), default=None,
                     help="JSON with the adapter's epsilon/delta/accountant (e.g. the accountant "
                          "state)."),
        click.Option(["--epsilon"], type=click.FloatRange(min=0), default=None,
                     help="Stated epsilon, when there is no --privacy file."),
        click.Option(["--delta"], type=click.FloatRange(0, 1, max_open=True), default=None,
                     help="Stated delta, with --epsilon."),
    ]


def _guarantee(privacy: str | None, epsilon: float | None, delta: float | None) -> Any:
    from dpfl.shared.privacy.guarantee import PrivacyGuarantee

    if privacy and (epsilon is not None or delta is not None):
        raise DpflError("give either --privacy FILE or --epsilon/--delta, not both")
    return (PrivacyGuarantee.from_file(privacy) if privacy
            else PrivacyGuarantee.from_values(epsilon, delta))


def _export_options() -> list[click.Parameter]:
    from dpfl.shared.export.onnx_bundle import ExportConfig
    from dpfl.shared.ldm.lora import PRESETS as LORA_PRESETS

    cfg = partial(default_of, ExportConfig)
    return [
        click.Option(["--adapter"], type=click.Path(file_okay=False), default=None,
                     help="peft adapter directory to merge (from 'dpfl-client train'); none: "
                          "base only."),
        click.Option(["--lora-preset"], type=click.Choice(list(LORA_PRESETS)), default=None,
                     help="Write an adapter-swappable base (no --adapter): the UNet takes the "
                          "LoRA factors of every layer this preset adapts as inputs, so "
                          "adapters ship alone ('export-adapter')."),
        click.Option(["--out"], type=click.Path(file_okay=False), required=True,
                     help="Bundle directory to write (must not exist unless --overwrite)."),
        *_privacy_options(),
        click.Option(["--fp16"], is_flag=True, help="Also write a float16 variant."),
        click.Option(["--tolerance"], type=click.FloatRange(min=0, min_open=True),
                     default=cfg("tolerance"),
                     help="Max |ONNX - torch| allowed for the fp32 UNet and decoder outputs."),
        click.Option(["--image-tolerance"], type=click.FloatRange(min=0, min_open=True),
                     default=cfg("image_tolerance"),
                     help="Max |ONNX - torch| allowed for images sampled end to end (fp32)."),
        click.Option(["--overwrite"], is_flag=True, help="Replace an existing bundle at --out."),
    ]


@main.command(cls=LazyCommand, options=_export_options, context_settings=CTX)
@click.argument("model_dir", type=click.Path())
def export(model_dir: str, adapter: str | None, lora_preset: str | None, out: str,
           privacy: str | None, epsilon: float | None, delta: float | None, fp16: bool,
           tolerance: float, image_tolerance: float, overwrite: bool) -> None:
    """Write an ONNX bundle for dpfl-sample: an adapter merged into the base model, or
    (--lora-preset) a base that takes adapters from 'export-adapter' files."""
    from dpfl.shared.export.onnx_bundle import ExportConfig, export_bundle
    from dpfl.shared.ldm.models import load_ldm

    try:
        guarantee = _guarantee(privacy, epsilon, delta)
        cfg = ExportConfig(tolerance=tolerance, image_tolerance=image_tolerance, fp16=fp16,
                           lora_preset=lora_preset)
        path = export_bundle(load_ldm(model_dir), out, adapter_dir=adapter, privacy=guarantee,
                             config=cfg, overwrite=overwrite)
    except DpflError as exc:
        fail(exc)
    meta = json.loads((Path(path) / "bundle.json").read_text())
    for name, v in meta["variants"].items():
        click.echo(f"{name}: unet max|diff| {v['parity']['unet']['max_abs_diff']:.2e}, decoder "
                   f"{v['parity']['decoder']['max_abs_diff']:.2e}, images "
                   f"{v['image_parity']['max_abs_diff']:.2e}")
    click.echo(f"privacy: {meta['privacy']['status']} (eps={meta['privacy']['epsilon']}, "
               f"delta={meta['privacy']['delta']})")
    click.echo(f"wrote bundle {path}; sample it with: dpfl-sample {path} --out samples")


def _export_adapter_options() -> list[click.Parameter]:
    from dpfl.shared.export.lora_graph import export_adapter
    from dpfl.shared.ldm.lora import PRESETS as LORA_PRESETS

    arg = partial(default_of, export_adapter)
    return [
        click.Option(["--out"], type=click.Path(dir_okay=False), required=True,
                     help="Edge adapter file to write (.safetensors)."),
        *_privacy_options(),
        click.Option(["--lora-preset"], type=click.Choice(list(LORA_PRESETS)),
                     default=arg("preset"), help="The base bundle's --lora-preset."),
        click.Option(["--tolerance"], type=click.FloatRange(min=0, min_open=True),
                     default=arg("tolerance"),
                     help="Max |base graph + adapter - merged UNet| allowed."),
    ]


@main.command("export-adapter", cls=LazyCommand, options=_export_adapter_options,
              context_settings=CTX)
@click.argument("model_dir", type=click.Path())
@click.argument("adapter", type=click.Path(file_okay=False))
def export_adapter_cmd(model_dir: str, adapter: str, out: str, privacy: str | None,
                       epsilon: float | None, delta: float | None, lora_preset: str,
                       tolerance: float) -> None:
    """Write a peft adapter as one small edge adapter file (its privacy guarantee and the
    base fingerprint inside) for 'dpfl-sample BASE_BUNDLE --adapter FILE'."""
    from dpfl.shared.export.lora_graph import export_adapter
    from dpfl.shared.ldm.models import load_ldm

    try:
        path = export_adapter(load_ldm(model_dir), adapter, out,
                              privacy=_guarantee(privacy, epsilon, delta), preset=lora_preset,
                              tolerance=tolerance)
    except DpflError as exc:
        fail(exc)
    click.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB); sample with: dpfl-sample "
               f"BASE_BUNDLE --adapter {path}")


def _simulate_options() -> list[click.Parameter]:
    from dpfl.server.simulate import SimulationSetup
    from dpfl.shared.data.partition import SCHEMES
    from dpfl.shared.federation.config import FedConfig

    setup = partial(default_of, SimulationSetup)
    positive = click.FloatRange(min=0, min_open=True)
    return [
        click.Option(["--base-model"], type=click.Path(),
                     default=default_of(FedConfig, "base_model")),
        click.Option(["--data"], default=setup("data"),
                     help="PRIVATE data to split among the sites."),
        click.Option(["--sites", "num_sites"], type=click.IntRange(min=1),
                     default=setup("num_sites")),
        click.Option(["--scheme"], type=click.Choice(SCHEMES), default=setup("scheme")),
        click.Option(["--alpha"], type=positive, default=setup("alpha")),
        click.Option(["--max-examples"], type=click.IntRange(min=0), default=setup("max_examples"),
                     help="Use at most this many private images in total (0: all)."),
        click.Option(["--epsilon-budget"], type=positive, default=setup("epsilon_budget"),
                     help="Each site's own epsilon budget."),
        click.Option(["--delta"], type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=setup("delta")),
        click.Option(["--cpus-per-site"], type=positive, default=setup("cpus_per_site")),
        click.Option(["--gpus-per-site"], type=click.FloatRange(min=0),
                     default=setup("gpus_per_site"),
                     help="Fractional GPUs per virtual site (e.g. 0.25: four sites per GPU)."),
        click.Option(["--run-dir"], type=click.Path(file_okay=False),
                     default=default_of(FedConfig, "run_dir")),
        click.Option(["--set", "overrides"], multiple=True, metavar="KEY=VALUE",
                     help="Any run-config key, kebab-case, e.g. --set num-rounds=5 --set "
                          "ffa=true."),
    ]


@main.command(cls=LazyCommand, options=_simulate_options, context_settings=CTX)
def simulate(base_model: str, data: str, num_sites: int, scheme: str, alpha: float,
             max_examples: int, epsilon_budget: float, delta: float, cpus_per_site: float,
             gpus_per_site: float, run_dir: str, overrides: tuple[str, ...]) -> None:
    """Federated DP fine-tuning of N simulated sites (Flower simulation engine)."""
    from dpfl.server.simulate import SimulationSetup
    from dpfl.server.simulate import simulate as run_simulation
    from dpfl.shared.federation.ledger import PrivacyLedger

    try:
        cfg = _fed_config(base_model, run_dir, num_sites, overrides)
        setup = SimulationSetup(data=data, num_sites=num_sites, scheme=scheme, alpha=alpha,
                                max_examples=max_examples, epsilon_budget=epsilon_budget,
                                delta=delta, cpus_per_site=cpus_per_site,
                                gpus_per_site=gpus_per_site)
        run_simulation(cfg, setup)
        ledger = PrivacyLedger.load_or_create(Path(run_dir) / "ledger.json")
    except DpflError as exc:
        fail(exc)
    click.echo(ledger.table())
    click.echo(f"run directory: {run_dir} (ledger.json, metrics.jsonl, samples_round_*.png, "
               "adapter/, report/report.html)")


def _fed_config(base_model: str, run_dir: str, num_sites: int, overrides: tuple[str, ...]):
    """The FedConfig of a simulation: its options plus the ``--set KEY=VALUE`` run config."""
    from dpfl.shared.federation.config import FedConfig

    pairs = dict(o.split("=", 1) for o in overrides if "=" in o)
    if len(pairs) != len(overrides):
        raise DpflError(f"--set takes KEY=VALUE, got {list(overrides)}")
    return FedConfig.from_run_config({"base-model": base_model, "run-dir": run_dir,
                                      "min-available-nodes": num_sites, **pairs})


def _audit_federation_options() -> list[click.Parameter]:
    from dpfl.client.audit import AuditJob
    from dpfl.shared.privacy.audit import AuditConfig

    resources = {"cpus_per_site", "gpus_per_site"}
    return [*[o for o in _simulate_options() if o.name not in resources],
            click.Option(["--canaries"], type=click.IntRange(min=10),
                         default=default_of(AuditConfig, "canaries"),
                         help="Gradient canaries per site."),
            click.Option(["--mia-draws"], type=click.IntRange(min=1),
                         default=default_of(AuditJob, "draws"),
                         help="(t, noise) draws per image for the attack's loss.")]


@main.command("audit-federation", cls=LazyCommand, options=_audit_federation_options,
              context_settings=CTX)
def audit_federation(base_model: str, data: str, num_sites: int, scheme: str, alpha: float,
                     max_examples: int, epsilon_budget: float, delta: float, run_dir: str,
                     overrides: tuple[str, ...], canaries: int, mia_draws: int) -> None:
    """Empirical privacy audit of each simulated site (see `dpfl-client audit`).

    Splits the data as `simulate` does (same options, same --set keys) and audits every
    site's whole planned DP-SGD mechanism, on its own copy of its silo under a temporary
    ledger: no site's budget is spent and no federation runs. Writes RUN_DIR/audit/.
    """
    from dpfl.server.simulate import SimulationSetup, audit_sites
    from dpfl.shared.privacy.audit import AuditConfig

    try:
        cfg = _fed_config(base_model, run_dir, num_sites, overrides)
        setup = SimulationSetup(data=data, num_sites=num_sites, scheme=scheme, alpha=alpha,
                                max_examples=max_examples, epsilon_budget=epsilon_budget,
                                delta=delta)
        rows = audit_sites(cfg, setup, AuditConfig(canaries=canaries), draws=mia_draws)
    except DpflError as exc:
        fail(exc)
    for r in rows:
        click.echo(f"{r['site']}: claimed eps {r['claimed_epsilon']:.3f} (delta {r['delta']:g}), "
                   f"eps-hat {r['epsilon_lower_bound']:.3f}, eps at measured noise "
                   f"{r['epsilon_at_measured_noise']:.3f}, MIA TPR@1%FPR "
                   f"{r['mia_tpr_at_1pct_fpr']:.3f}")
    click.echo(f"{rows[0]['note'] if rows else ''}\nwrote {Path(run_dir) / 'audit'}")


@main.command(context_settings=CTX)
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--site", "sites", multiple=True, metavar="NAME=DIR",
              help="A site's state directory (its rounds.jsonl) to add its local loss curve "
                   "(repeatable) [default for a simulation: RUN_DIR/sites/*/state].")
def report(run_dir: str, sites: tuple[str, ...]) -> None:
    """Render RUN_DIR/report/ (report.html, report.md, plots) from the files of a federated
    or central run; safe to repeat at any time, also for a crashed or resumed run."""
    from dpfl.shared.report.build import write_report

    try:
        if not all("=" in s for s in sites):
            raise DpflError(f"--site takes NAME=DIR, got {list(sites)}")
        site_dirs = {s.split("=", 1)[0]: s.split("=", 1)[1] for s in sites}
        if not site_dirs:  # the simulation keeps every site's state under the run directory
            site_dirs = {p.parent.name: str(p) for p in
                         sorted(Path(run_dir).glob("sites/*/state")) if p.is_dir()}
            if site_dirs:
                click.echo(f"site state found for {', '.join(site_dirs)} (simulation layout)")
        path = write_report(run_dir, site_dirs or None)
    except DpflError as exc:
        fail(exc)
    click.echo(f"wrote {path} (self-contained) and {path.with_name('report.md')}")


@main.command(context_settings=CTX)
@click.option("--out", type=click.Path(file_okay=False), default=PKI_DIR,
              help="Directory for ca.crt/key, server.crt/key and sites/<id>/node.key|pub.")
@click.option("--site", "sites", multiple=True, metavar="SITE_ID",
              help="Create a node-authentication key pair for this site (repeatable).")
@click.option("--host", "hosts", multiple=True, metavar="NAME_OR_IP",
              help="Name/IP the sites dial (repeatable) [default: 127.0.0.1, localhost, ::1, "
                   "this hostname]. Given with an existing CA: re-issue the server certificate.")
@click.option("--overwrite", is_flag=True, help="Replace an existing CA and keys.")
def certs(out: str, sites: tuple[str, ...], hosts: tuple[str, ...], overwrite: bool) -> None:
    """Create the federation's CA, the SuperLink's TLS certificate and site key pairs."""
    from dpfl.server.pki import make_pki

    try:
        layout = make_pki(out, list(sites), list(hosts) or None, overwrite=overwrite)
    except DpflError as exc:
        fail(exc)
    click.echo(f"coordinator keeps: {layout.server_cert}, {layout.server_key}, "
               f"{layout.root / 'sites'}/*/node.pub; move {layout.ca_key} offline")
    for site in sites:
        click.echo(f"give site {site}: {layout.ca_cert} and {layout.node_key(site)}")


@main.command(context_settings=CTX)
@click.option("--setting", type=click.Choice(SETTINGS), required=True,
              help="federated: 3 non-IID hospitals, DP-LoRA; central: one silo, DP-LoRA; "
                   "scratch: whole UNet under DP from random init; floor: the public base model "
                   "unchanged; ceiling: the CNN on real private images (no privacy); "
                   "ae-ceiling: the CNN on the base model's autoencoder reconstructions of "
                   "the private images (what fine-tuning only the UNet can reach at most).")
@click.option("--epsilon", type=click.FloatRange(min=0, min_open=True),
              default=default_of(Experiment, "epsilon"),
              help="Target epsilon of the private settings (each site's, for federated).")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=default_of(Experiment, "delta"))
@click.option("--preset", type=click.Choice(list(EXPERIMENT_PRESETS)),
              default=default_of(Experiment, "preset"),
              help="tiny: a test-sized check; cpu: minutes on 2 cores; fulldata: all private "
                   "data and 60,000 synthetic images, about 1.5 h per federated row on 2 "
                   "cores; full: paper size (GPU).")
@click.option("--base-model", type=click.Path(), default=default_of(Experiment, "base_model"))
@click.option("--out", type=click.Path(file_okay=False), default=default_of(Experiment, "out"),
              help="Parent folder: one run directory per row, results.jsonl and results.md.")
@click.option("--seed", type=int, default=default_of(Experiment, "seed"))
@click.option("--device", default=default_of(Experiment, "device"), help="auto, cpu or cuda[:N].")
@click.option("--classifier-dir", type=click.Path(file_okay=False),
              default=default_of(Experiment, "classifier_dir"),
              help="Domain classifier folder [default: BASE_MODEL/eval-classifier].")
@click.option("--classifiers", type=click.Choice(list(CLASSIFIER_SETS)),
              default=default_of(Experiment, "classifiers"),
              help="cnn: our downstream CNN only; all: also DPImageBench's ResNet, WideResNet "
                   "and ResNeXt and their mean (accuracy_mean3), about 5-6x the CNN's time.")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="torch CPU threads (0: torch's default).")
def experiment(threads: int, **kw) -> None:
    """Run one row of the privacy-utility table end to end on Fashion-MNIST's standard split:
    train (per setting), evaluate (downstream CNN accuracy on the real test set, domain FD,
    precision/recall, FID with a local Inception file), write the run report, add the row
    to OUT/results.jsonl and OUT/results.md."""
    import torch

    from dpfl.server.experiment import command_line, run_experiment

    if threads:
        torch.set_num_threads(threads)
    try:
        exp = Experiment(**kw)
        row = run_experiment(exp, command_line())
    except DpflError as exc:
        fail(exc)
    mean3 = row.get("accuracy_mean3")
    click.echo(f"{row['setting']} ({row['preset']}): epsilon={row['epsilon']:.3f} "
               f"delta={row['delta']:g}  accuracy={row['accuracy']:.4f}  "
               + (f"3-classifier mean={mean3:.4f}  " if mean3 is not None else "") +
               f"domain FD={row['domain_fd']:.3f}  {row['total_seconds'] / 60:.1f} min")
    click.echo(f"run directory: {row['run_dir']} (evaluation/, report/report.html); table: "
               f"{Path(kw['out']) / 'results.md'}")


for _command in (serve, run_cmd, status, stop):  # the deployment: dpfl.server.deploycli
    main.add_command(_command)

if __name__ == "__main__":
    main()
