"""``dpfl-client``: what a hospital runs (its data, local DP training, its site).

Options take their defaults and choices from the dataclasses and registries that own them;
commands whose settings live in torch modules make their options on first use
(:class:`dpfl.shared.cli.LazyCommand`), so the group and ``data`` start fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import numpy as np

from dpfl.shared.cli import CTX, LazyCommand, fail
from dpfl.shared.data.partition import SCHEMES
from dpfl.shared.data.partition import partition as split
from dpfl.shared.defaults import LOG_FORMAT, default_of, defaults_of
from dpfl.shared.errors import ConfigError, DpflError
from dpfl.shared.privacy.choices import parse_delta

if TYPE_CHECKING:  # imported lazily below: the CLI starts fast
    from dpfl.client.train import TrainJob
    from dpfl.shared.privacy.dpsgd import DPConfig


@click.group(context_settings=CTX)
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """dpfl site: trains LoRA adapters on local images under DP; images never leave."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format=LOG_FORMAT)


@main.group()
def data() -> None:
    """Inspect and split local data."""


@data.command(context_settings=CTX)
@click.argument("source")
@click.option("--skip-bad", is_flag=True, help="Leave out unreadable images (they are listed).")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Base model: show the base class each silo class trains as (refused when "
                   "one matches none) and tie fmnist:private to the base model's split.")
@click.option("--label-map", type=click.Path(dir_okay=False), default=None,
              help="JSON {\"silo class\": \"base class\"} (with --model; README 'Data').")
def inspect(source: str, skip_bad: bool, model_dir: str | None, label_map: str | None) -> None:
    """Read SOURCE (image folder, .npz, IDX file or fmnist:private...) and summarise it."""
    from dpfl.shared.data.sources import load_source

    try:
        card = _base_card(model_dir)
        ds = load_source(source, skip_bad=skip_bad, base_card=card)
        matched = _base_classes(model_dir, ds, label_map) if model_dir else None
    except DpflError as exc:
        fail(exc)
    counts = np.bincount(ds.labels, minlength=len(ds.class_names))
    click.echo(json.dumps({
        "source": ds.source, "examples": len(ds), "shape": list(ds.images.shape[1:]),
        "classes": {n: int(c) for n, c in zip(ds.class_names, counts)},
        **({"base_classes": matched} if matched is not None else {}),
        "skipped": [{"file": f, "reason": r} for f, r in ds.skipped]}, indent=2))


def _base_card(model_dir: str | None) -> dict[str, Any] | None:
    from dpfl.shared.data.sources import model_card

    return model_card(model_dir) if model_dir else None


def _base_classes(model_dir: str, ds, label_map: str | None) -> dict[str, str]:
    """Silo class -> the base model class it trains as (classes holding images)."""
    from dpfl.shared.data.labels import class_index, read_label_map
    from dpfl.shared.ldm.models import load_ldm

    names = load_ldm(model_dir).spec.class_names
    index = class_index(ds.class_names, np.unique(ds.labels), names,
                        read_label_map(label_map), ds.source)
    return {n: names[j] for n, j in zip(ds.class_names, index) if j >= 0}


@data.command(context_settings=CTX)
@click.argument("source")
@click.option("--clients", type=click.IntRange(min=1), default=3)
@click.option("--scheme", type=click.Choice(SCHEMES), default="dirichlet")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True),
              default=default_of(split, "alpha"),
              help="Dirichlet concentration (smaller: more skewed).")
@click.option("--seed", type=int, default=default_of(split, "seed"))
@click.option("--out", type=click.Path(file_okay=False), default="silos")
def partition(source: str, clients: int, scheme: str, alpha: float, seed: int, out: str) -> None:
    """Split SOURCE into client silos written as OUT/client-<i>.npz (for simulations)."""
    from dpfl.shared.data.readers import write_npz
    from dpfl.shared.data.sources import load_source

    try:
        ds = load_source(source)
        parts = split(ds.labels, clients, scheme, seed=seed, alpha=alpha)
    except DpflError as exc:
        fail(exc)
    Path(out).mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(parts):
        path = Path(out) / f"client-{i}.npz"
        write_npz(path, ds.subset(idx))
        counts = np.bincount(ds.labels[idx], minlength=len(ds.class_names)).tolist()
        click.echo(f"{path}: {len(idx)} images, per class {counts}")


def _run_options(run_dir: str, model_help: str, **dp_defaults: Any) -> list[click.Parameter]:
    """The options ``train`` and ``train-full`` share: silo, model, DP-SGD, ledger, grids.
    Defaults are TrainJob's and DPConfig's, except the DPConfig fields in ``dp_defaults``."""
    from dpfl.client.train import TrainJob
    from dpfl.shared.data.readers import IMAGE_POLICIES
    from dpfl.shared.privacy.dpsgd import DPConfig

    job, dp = defaults_of(TrainJob), {**defaults_of(DPConfig), **dp_defaults}
    return [
        click.Option(["--data"], required=True,
                     help="Private silo: image folder, .npz, IDX file or fmnist:private."),
        click.Option(["--model", "model_dir"], required=True, type=click.Path(), help=model_help),
        click.Option(["--run-dir"], type=click.Path(file_okay=False), default=run_dir),
        click.Option(["--limit"], type=click.IntRange(min=0), default=job["limit"],
                     help="Use a seeded random subset of this many examples (0: all)."),
        click.Option(["--label-map"], type=click.Path(dir_okay=False), default=job["label_map"],
                     help="JSON {\"silo class\": \"base class\"} for classes not named exactly "
                          "after a base model class (README 'Data')."),
        click.Option(["--image-policy"], type=click.Choice(IMAGE_POLICIES),
                     default=job["image_policy"],
                     help="Images not of the base model's size: refuse them (naming the "
                          "sizes), resize them, or center-crop a square and resize it."),
        *_budget_options(dp, job),
        *_sgd_options(dp),
        click.Option(["--sample-steps"], type=click.IntRange(1, 1000),
                     default=job["sample_steps"]),
        click.Option(["--per-class"], type=click.IntRange(1, 64), default=job["per_class"]),
        click.Option(["--guidance"], type=click.FloatRange(min=0), default=job["guidance"]),
        click.Option(["--progress/--no-progress"], default=True),
    ]


def _budget_options(dp: dict[str, Any], job: dict[str, Any]) -> list[click.Parameter]:
    """Target, noise, accountant and ledger (defaults: ``dp`` DPConfig's, ``job`` TrainJob's)."""
    from dpfl.shared.privacy.accountant import KINDS

    return [
        click.Option(["--epsilon"], type=click.FloatRange(min=0, min_open=True),
                     default=dp["target_epsilon"],
                     help="Target epsilon for sigma calibration (and default budget)."),
        click.Option(["--sigma"], type=click.FloatRange(min=0), default=dp["noise_multiplier"],
                     help="Noise multiplier; overrides calibration from --epsilon."),
        click.Option(["--delta"], type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=dp["delta"]),
        click.Option(["--budget"], type=click.FloatRange(min=0, min_open=True),
                     default=job["budget"],
                     help="Epsilon budget of the ledger [default: --epsilon]."),
        click.Option(["--accountant"], type=click.Choice(list(KINDS)), default=None,
                     help=f"Privacy accountant for calibrating sigma and reporting epsilon "
                          f"[default: the ledger's own; {dp['accountant']} for a new one]."),
        click.Option(["--accountant-file"], type=click.Path(dir_okay=False),
                     default=job["accountant_file"],
                     help="Privacy ledger [default: RUN_DIR/accountant.json]."),
    ]


def _sgd_options(dp: dict[str, Any]) -> list[click.Parameter]:
    """DP-SGD's own settings (``dp``: their defaults)."""
    return [
        click.Option(["--clip"], type=click.FloatRange(min=0, min_open=True), default=dp["clip"],
                     help="Clipping norm C."),
        click.Option(["--batch-size"], type=click.IntRange(min=1), default=dp["batch_size"],
                     help="Expected logical batch."),
        click.Option(["--physical-batch"], type=click.IntRange(min=1),
                     default=dp["max_physical_batch"],
                     help="Examples per forward/backward pass (memory grows with it times K)."),
        click.Option(["-k", "--noise-multiplicity"], type=click.IntRange(min=1),
                     default=dp["noise_multiplicity"]),
        click.Option(["--lr"], type=click.FloatRange(min=0, min_open=True), default=dp["lr"]),
        click.Option(["--epochs"], type=click.IntRange(min=1), default=dp["epochs"]),
        click.Option(["--planned-steps"], type=click.IntRange(min=1), default=dp["planned_steps"],
                     help="Steps of the whole planned run for calibration [default: this "
                          "run's]."),
        click.Option(["--cond-drop"], type=click.FloatRange(0, 1, max_open=True),
                     default=dp["cond_drop"]),
        click.Option(["--secure-mode/--no-secure-mode"], default=dp["secure_mode"],
                     help="DP noise from the OS CSPRNG, hardened against floating-point "
                          "attacks (Opacus' secure-mode construction); use for real data."),
        click.Option(["--seed"], type=int, default=dp["seed"]),
        click.Option(["--device"], default=dp["device"], help="auto, cpu or cuda[:N]."),
    ]


def _job_and_dp(o: dict) -> tuple[TrainJob, DPConfig]:
    """(TrainJob, DPConfig) from the :func:`_run_options` values; raises ConfigError."""
    from dpfl.client.train import TrainJob

    dp = _dp_config(o)
    job = TrainJob(data=o["data"], model=o["model_dir"], run_dir=o["run_dir"], limit=o["limit"],
                   budget=o["budget"], accountant_file=o["accountant_file"],
                   sample_steps=o["sample_steps"], per_class=o["per_class"],
                   guidance=o["guidance"], label_map=o["label_map"],
                   image_policy=o["image_policy"])
    return job, dp


def _train_options() -> list[click.Parameter]:
    from dpfl.client.train import TrainJob
    from dpfl.shared.ldm.lora import PRESETS, LoraSpec

    lora = partial(default_of, LoraSpec)
    return [
        *_run_options("runs/train", model_help="Base model directory."),
        click.Option(["--preset"], type=click.Choice(list(PRESETS)), default=lora("preset"),
                     help="Layers that get LoRA adapters."),
        click.Option(["--rank"], type=click.IntRange(min=1), default=lora("rank")),
        click.Option(["--alpha"], type=click.FloatRange(min=0, min_open=True),
                     default=lora("alpha")),
        click.Option(["--dropout"], type=click.FloatRange(0, 1, max_open=True),
                     default=lora("dropout")),
        click.Option(["--blocks"], default=",".join(lora("blocks") or ()),
                     help="Comma-separated module prefixes, e.g. up_blocks,mid_block (empty: "
                          "all)."),
        click.Option(["--class-embedding/--no-class-embedding"],
                     default=lora("train_class_embedding"), help="Train the class embedding too."),
        click.Option(["--warmup-sigma"], type=click.FloatRange(min=0),
                     default=default_of(TrainJob, "warmup_sigma"),
                     help="DP-FETA warm-up: release the silo's class means with this noise "
                          "multiplier (accounted) and train the adapters on them before DP-SGD, "
                          "whose sigma then covers the rest of the target (0: off)."),
        click.Option(["--warmup-clip"], type=click.FloatRange(min=0),
                     default=default_of(TrainJob, "warmup_clip"),
                     help="Latent clip norm of the release (0: sqrt of the latent size)."),
        click.Option(["--warmup-steps"], type=click.IntRange(min=0),
                     default=default_of(TrainJob, "warmup_steps"),
                     help="Adapter steps on the released means (no privacy cost)."),
        click.Option(["--ema-decay"], type=click.FloatRange(0, 1, max_open=True),
                     default=default_of(TrainJob, "ema_decay"),
                     help="Write the EMA of the DP iterates at this decay (0: the last "
                          "iterate); post-processing, no privacy cost."),
    ]


@main.command(cls=LazyCommand, options=_train_options, context_settings=CTX)
def train(preset, rank, alpha, dropout, blocks, class_embedding, warmup_sigma, warmup_clip,
          warmup_steps, ema_decay, **run) -> None:
    """DP-LoRA fine-tuning on one local silo (central mode): writes RUN_DIR with the adapter."""
    from dpfl.client.train import run_train
    from dpfl.shared.ldm.lora import LoraSpec

    try:
        lora = LoraSpec(preset=preset, rank=rank, alpha=alpha, dropout=dropout,
                        train_class_embedding=class_embedding,
                        blocks=tuple(b for b in blocks.split(",") if b) or None)
        job, dp = _job_and_dp(run)
        job = dataclasses.replace(job, warmup_sigma=warmup_sigma, warmup_clip=warmup_clip,
                                  warmup_steps=warmup_steps, ema_decay=ema_decay)
        summary = run_train(job, lora, dp, progress=run["progress"])
    except DpflError as exc:
        fail(exc)
    click.echo(json.dumps(summary, indent=2))


def _train_full_options() -> list[click.Parameter]:
    from dpfl.client.train_full import INITS, run_train_full

    full = partial(default_of, run_train_full)
    return [
        # the whole UNet: a smaller step and, for Opacus' per-sample gradients, a smaller batch
        *_run_options("runs/train-full", lr=3e-4, max_physical_batch=16,
                      model_help="Base model directory: its public autoencoder, scheduler, class "
                                 "names and UNet architecture (its UNet weights only with --init "
                                 "base)."),
        click.Option(["--init"], type=click.Choice(list(INITS)), default=full("init"),
                     help="scratch: a randomly initialised UNet (seeded by --seed), the DPDM "
                          "baseline; base: the base model's UNet (DP full fine-tuning)."),
        click.Option(["--ema-decay"], type=click.FloatRange(0, 1, max_open=True),
                     default=full("ema_decay"),
                     help="EMA of the weights (post-processing, no privacy cost); 0: off."),
    ]


@main.command("train-full", cls=LazyCommand, options=_train_full_options, context_settings=CTX)
def train_full(init, ema_decay, **run) -> None:
    """DP-SGD on every UNet parameter (default: from scratch): writes RUN_DIR/model.

    The from-scratch baseline of DPDM (Dockhorn et al., TMLR 2023), next to DP-LoRA: the
    UNet sees no public data. Protocol difference: DPDM is pixel-space; here the UNet
    denoises the latents of the base model's public autoencoder (the VAE saw public data,
    the UNet none). RUN_DIR/model is a whole diffusers-format model (public VAE, DP-trained
    UNet) that loads like any base model, with model_card.json and privacy.json.
    Opacus keeps a gradient per row and parameter: about physical-batch x K x 4 bytes per
    UNet parameter (fmnist UNet: 4.6M parameters, 1.2 GB at 16 x 4).
    """
    from dpfl.client.train_full import run_train_full

    try:
        job, dp = _job_and_dp(run)
        summary = run_train_full(job, dp, init=init, ema_decay=ema_decay,
                                 progress=run["progress"])
    except DpflError as exc:
        fail(exc)
    click.echo(json.dumps(summary, indent=2))


_NOT_AUDITED = {"budget", "accountant_file", "sample_steps", "per_class", "guidance"}


def _audit_options() -> list[click.Parameter]:
    from dpfl.client.audit import AuditJob
    from dpfl.shared.privacy.audit import AuditConfig

    audit = partial(default_of, AuditConfig)
    return [
        *[o for o in _train_options() if o.name not in _NOT_AUDITED],
        click.Option(["--canaries"], type=click.IntRange(min=10), default=audit("canaries"),
                     help="Gradient canaries m (each needs a trainable coordinate)."),
        click.Option(["--confidence"], type=click.FloatRange(0.5, 1, min_open=True,
                                                             max_open=True),
                     default=audit("confidence"), help="Confidence of the lower bound."),
        click.Option(["--mia-draws"], type=click.IntRange(min=1),
                     default=default_of(AuditJob, "draws"),
                     help="(t, noise) draws per image for the attack's loss."),
    ]


@main.command(cls=LazyCommand, options=_audit_options, context_settings=CTX)
def audit(preset, rank, alpha, dropout, blocks, class_embedding, canaries, confidence,
          mia_draws, **run) -> None:
    """Empirical privacy audit of DP-LoRA as built: writes RUN_DIR/audit and a report section.

    Trains once with these DP settings on the audit's OWN copy of the data (a seeded half of
    it; the other half is held out) under a temporary ledger that is deleted afterwards: no
    site's budget is spent and no ledger is touched. White-box: the one-run audit of
    Steinke, Nasr and Jagielski (NeurIPS 2023) with Dirac gradient canaries gives eps-hat, a
    lower bound on epsilon at --confidence, beside the claimed epsilon. Black-box: a
    loss-threshold membership-inference attack on the released adapter (ROC, TPR at 1%
    FPR). Cost: about one training run of the members (docs/audit.md).
    """
    from dpfl.client.audit import AuditJob, dumps, run_audit
    from dpfl.shared.ldm.lora import LoraSpec
    from dpfl.shared.privacy.audit import AuditConfig

    try:
        lora = LoraSpec(preset=preset, rank=rank, alpha=alpha, dropout=dropout,
                        train_class_embedding=class_embedding,
                        blocks=tuple(b for b in blocks.split(",") if b) or None)
        dp = _dp_config(run)
        job = AuditJob(data=run["data"], model=run["model_dir"], run_dir=run["run_dir"],
                       limit=run["limit"], draws=mia_draws, label_map=run.get("label_map"),
                       image_policy=run["image_policy"])
        record = run_audit(job, lora, dp, AuditConfig(canaries=canaries, confidence=confidence),
                           progress=run["progress"])
    except DpflError as exc:
        fail(exc)
    click.echo(dumps(record["whitebox"] | {"mia_tpr_at_fpr": record["mia"]["tpr_at_fpr"]}))


def _dp_config(o: dict) -> DPConfig:
    """DPConfig from the :func:`_sgd_options` and :func:`_budget_options` values."""
    from dpfl.shared.privacy.accountant import ledger_kind
    from dpfl.shared.privacy.dpsgd import DPConfig

    ledger = o.get("accountant_file") or Path(o["run_dir"]) / "accountant.json"
    return DPConfig(clip=o["clip"], noise_multiplier=o["sigma"], target_epsilon=o["epsilon"],
                    delta=o["delta"], accountant=ledger_kind(ledger, o["accountant"]),
                    batch_size=o["batch_size"],
                    max_physical_batch=o["physical_batch"],
                    noise_multiplicity=o["noise_multiplicity"], lr=o["lr"], epochs=o["epochs"],
                    planned_steps=o["planned_steps"], cond_drop=o["cond_drop"],
                    secure_mode=o["secure_mode"], seed=o["seed"], device=o["device"])


class DeltaParam(click.ParamType):
    """δ on the command line: a number in (0, 1) or ``auto`` (1/(n ln n) of the silo)."""

    name = "delta"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> float | str:
        try:
            return parse_delta(value)
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


def _site_data_options(site: Callable[[str], Any]) -> list[click.Parameter]:
    """``join``'s options for how the site's images are read (defaults: SiteConfig's)."""
    from dpfl.shared.defaults import IMAGE_POLICIES

    return [
        click.Option(["--label-map"], type=click.Path(dir_okay=False),
                     default=site("label_map"),
                     help="JSON {\"silo class\": \"base class\"} for classes not named exactly "
                          "after a base model class (README 'Data')."),
        click.Option(["--image-policy"], type=click.Choice(IMAGE_POLICIES),
                     default=site("image_policy"),
                     help="Images not of the base model's size: refuse them, resize them, or "
                          "cut the centre square and resize it."),
    ]


def _join_options() -> list[click.Parameter]:
    from dpfl.client.deploy import SiteNode
    from dpfl.shared.federation.config import ACCOUNTANTS, SiteConfig
    from dpfl.shared.privacy.choices import DEFAULT_ACCOUNTANT

    site = partial(default_of, SiteConfig)
    return [
        click.Option(["--superlink"], required=True, help="The coordinator's address, host:port."),
        click.Option(["--ca-cert"], required=True, type=click.Path(dir_okay=False),
                     help="The federation's CA certificate (verifies the coordinator)."),
        click.Option(["--node-key"], required=True, type=click.Path(dir_okay=False),
                     help="This site's node-authentication private key (from the "
                          "coordinator's 'dpfl-server certs')."),
        click.Option(["--site-id"], required=True, help="This site's name in the privacy ledger."),
        click.Option(["--data"], required=True,
                     help="Private images: image folder, .npz or IDX file."),
        click.Option(["--base-model"], required=True, type=click.Path(file_okay=False),
                     help="Local copy of the public base model (verified by fingerprint)."),
        click.Option(["--state-dir"], required=True, type=click.Path(file_okay=False),
                     help="Persistent state: accountant, cached latents. Never delete between "
                          "runs."),
        click.Option(["--epsilon-budget"], type=click.FloatRange(min=0, min_open=True),
                     default=site("epsilon_budget"),
                     help="The most epsilon this site will ever spend (across all runs)."),
        click.Option(["--delta"], type=DeltaParam(), default=site("delta"), show_default=True,
                     help="A number in (0, 1), below 1/n, or 'auto': 1/(n ln n) of this "
                          "site's n images (fixed in the ledger by the first round)."),
        click.Option(["--accountant"], type=click.Choice(ACCOUNTANTS), default=site("accountant"),
                     help=f"Privacy accountant [default: the state directory's ledger's own; "
                          f"{DEFAULT_ACCOUNTANT} for a new one]."),
        click.Option(["--max-physical-batch"], type=click.IntRange(min=1),
                     default=site("max_physical_batch")),
        click.Option(["--secure-mode/--no-secure-mode"], default=site("secure_mode"),
                     help="DP noise from the OS CSPRNG, hardened against floating-point attacks "
                          "(on by default for a real site; --no-secure-mode only for "
                          "experiments)."),
        click.Option(["--device"], default=site("device"), help="auto, cpu or cuda[:N]."),
        *_site_data_options(site),
        click.Option(["--runtime-port"], type=click.IntRange(1, 65535),
                     default=default_of(SiteNode, "runtime_port"),
                     help="Loopback port of the SuperNode's Runtime API (distinct per node)."),
        click.Option(["--max-wait-time"], type=click.FloatRange(min=0),
                     default=default_of(SiteNode, "max_wait_time"),
                     help="Give up after this many seconds without the coordinator (0: never)."),
    ]


@main.command(cls=LazyCommand, options=_join_options, context_settings=CTX)
def join(superlink: str, ca_cert: str, node_key: str, runtime_port: int,
         max_wait_time: float, **site) -> None:
    """Join a federation: a SuperNode serving this site's DP training (runs until stopped)."""
    from dpfl.client.deploy import SiteNode, preflight, run_node
    from dpfl.shared.federation.config import SiteConfig

    if site["label_map"]:  # the SuperNode's ClientApp runs in another working directory
        site["label_map"] = str(Path(site["label_map"]).expanduser().resolve())
    try:
        node = SiteNode(site=SiteConfig(**site), superlink=superlink, ca_cert=Path(ca_cert),
                        node_key=Path(node_key), runtime_port=runtime_port,
                        max_wait_time=max_wait_time)
        # certificates, keys and state directory, before any process starts
        created = preflight(node)
    except DpflError as exc:
        fail(exc)
    raise SystemExit(run_node(node, created))


@main.command(context_settings=CTX)
@click.option("--state-dir", required=True, type=click.Path(),
              help="The site's state directory (node config 'state-dir', 'join --state-dir').")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
def status(state_dir: str, as_json: bool) -> None:
    """This site's privacy spend: lifetime epsilon/delta, budget left, and every run and
    round that spent it (reads the state directory's accountant.json and rounds.jsonl;
    writes nothing)."""
    from dpfl.client.status import read_status, render_text

    try:
        site = read_status(state_dir)
        out = json.dumps(site.to_json(), indent=2, allow_nan=False) if as_json \
            else render_text(site).rstrip("\n")
    except DpflError as exc:
        fail(exc)
    click.echo(out)


if __name__ == "__main__":
    main()
