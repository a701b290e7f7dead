"""``dpfl-client``: what a hospital runs (its data, local DP training, its site)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from dpfl.shared.errors import DpflError

if TYPE_CHECKING:  # imported lazily below: the CLI starts fast
    from dpfl.client.train import TrainJob
    from dpfl.shared.privacy.dpsgd import DPConfig

CTX = {"show_default": True, "help_option_names": ["-h", "--help"]}


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


@click.group(context_settings=CTX)
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """dpfl site: trains LoRA adapters on local images under DP; images never leave."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.group()
def data() -> None:
    """Inspect and split local data."""


@data.command(context_settings=CTX)
@click.argument("source")
@click.option("--skip-bad", is_flag=True, help="Leave out unreadable images (they are listed).")
def inspect(source: str, skip_bad: bool) -> None:
    """Read SOURCE (image folder, .npz, IDX file or fmnist:private...) and summarise it."""
    from dpfl.shared.data.sources import load_source

    try:
        ds = load_source(source, skip_bad=skip_bad)
    except DpflError as exc:
        _fail(exc)
    counts = np.bincount(ds.labels, minlength=len(ds.class_names))
    click.echo(json.dumps({
        "source": ds.source, "examples": len(ds), "shape": list(ds.images.shape[1:]),
        "classes": {n: int(c) for n, c in zip(ds.class_names, counts)},
        "skipped": [{"file": f, "reason": r} for f, r in ds.skipped]}, indent=2))


@data.command(context_settings=CTX)
@click.argument("source")
@click.option("--clients", type=click.IntRange(min=1), default=3)
@click.option("--scheme", type=click.Choice(["iid", "class", "dirichlet"]), default="dirichlet")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=0.5,
              help="Dirichlet concentration (smaller: more skewed).")
@click.option("--seed", type=int, default=0)
@click.option("--out", type=click.Path(file_okay=False), default="silos")
def partition(source: str, clients: int, scheme: str, alpha: float, seed: int, out: str) -> None:
    """Split SOURCE into client silos written as OUT/client-<i>.npz (for simulations)."""
    from dpfl.shared.data.partition import partition as split
    from dpfl.shared.data.readers import write_npz
    from dpfl.shared.data.sources import load_source

    try:
        ds = load_source(source)
        parts = split(ds.labels, clients, scheme, seed=seed, alpha=alpha)
    except DpflError as exc:
        _fail(exc)
    Path(out).mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(parts):
        path = Path(out) / f"client-{i}.npz"
        write_npz(path, ds.subset(idx))
        counts = np.bincount(ds.labels[idx], minlength=len(ds.class_names)).tolist()
        click.echo(f"{path}: {len(idx)} images, per class {counts}")


def _run_options(run_dir: str, lr: float, physical_batch: int, model_help: str):
    """The options ``train`` and ``train-full`` share: silo, model, DP-SGD, ledger, grids."""
    options = [
        click.option("--data", required=True,
                     help="Private silo: image folder, .npz, IDX file or fmnist:private."),
        click.option("--model", "model_dir", required=True, type=click.Path(), help=model_help),
        click.option("--run-dir", type=click.Path(file_okay=False), default=run_dir),
        click.option("--limit", type=click.IntRange(min=0), default=0,
                     help="Use a seeded random subset of this many examples (0: all)."),
        click.option("--epsilon", type=click.FloatRange(min=0, min_open=True), default=10.0,
                     help="Target epsilon for sigma calibration (and default budget)."),
        click.option("--sigma", type=click.FloatRange(min=0), default=None,
                     help="Noise multiplier; overrides calibration from --epsilon."),
        click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     default=1e-5),
        click.option("--budget", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Epsilon budget of the ledger [default: --epsilon]."),
        click.option("--accountant", type=click.Choice(["rdp", "prv"]), default="rdp"),
        click.option("--accountant-file", type=click.Path(dir_okay=False), default=None,
                     help="Privacy ledger [default: RUN_DIR/accountant.json]."),
        click.option("--clip", type=click.FloatRange(min=0, min_open=True), default=1.0,
                     help="Clipping norm C."),
        click.option("--batch-size", type=click.IntRange(min=1), default=256,
                     help="Expected logical batch."),
        click.option("--physical-batch", type=click.IntRange(min=1), default=physical_batch,
                     help="Examples per forward/backward pass (memory grows with it times K)."),
        click.option("-k", "--noise-multiplicity", type=click.IntRange(min=1), default=4),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=lr),
        click.option("--epochs", type=click.IntRange(min=1), default=1),
        click.option("--planned-steps", type=click.IntRange(min=1), default=None,
                     help="Steps of the whole planned run for calibration [default: this run's]."),
        click.option("--cond-drop", type=click.FloatRange(0, 1, max_open=True), default=0.1),
        click.option("--secure-mode/--no-secure-mode", default=False,
                     help="DP noise from the OS CSPRNG, hardened against floating-point "
                          "attacks (Opacus' secure-mode construction); use for real data."),
        click.option("--seed", type=int, default=0),
        click.option("--device", default="auto", help="auto, cpu or cuda[:N]."),
        click.option("--sample-steps", type=click.IntRange(1, 1000), default=50),
        click.option("--per-class", type=click.IntRange(1, 64), default=8),
        click.option("--guidance", type=click.FloatRange(min=0), default=1.0),
        click.option("--progress/--no-progress", default=True),
    ]

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f
    return apply


def _job_and_dp(o: dict) -> tuple[TrainJob, DPConfig]:
    """(TrainJob, DPConfig) from the :func:`_run_options` values; raises ConfigError."""
    from dpfl.client.train import TrainJob
    from dpfl.shared.privacy.dpsgd import DPConfig

    dp = DPConfig(clip=o["clip"], noise_multiplier=o["sigma"], target_epsilon=o["epsilon"],
                  delta=o["delta"], accountant=o["accountant"], batch_size=o["batch_size"],
                  max_physical_batch=o["physical_batch"],
                  noise_multiplicity=o["noise_multiplicity"], lr=o["lr"], epochs=o["epochs"],
                  planned_steps=o["planned_steps"], cond_drop=o["cond_drop"],
                  secure_mode=o["secure_mode"], seed=o["seed"], device=o["device"])
    job = TrainJob(data=o["data"], model=o["model_dir"], run_dir=o["run_dir"], limit=o["limit"],
                   budget=o["budget"], accountant_file=o["accountant_file"],
                   sample_steps=o["sample_steps"], per_class=o["per_class"],
                   guidance=o["guidance"])
    return job, dp


@main.command(context_settings=CTX)
@_run_options("runs/train", lr=1e-3, physical_batch=64, model_help="Base model directory.")
@click.option("--preset", type=click.Choice(["attention", "attention+proj", "attention+conv"]),
              default="attention", help="Layers that get LoRA adapters.")
@click.option("--rank", type=click.IntRange(min=1), default=4)
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=8.0)
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=0.0)
@click.option("--blocks", default="", help="Comma-separated module prefixes, e.g. up_blocks,mid_block (empty: all).")
@click.option("--class-embedding/--no-class-embedding", default=True,
              help="Train the class embedding too.")
def train(preset, rank, alpha, dropout, blocks, class_embedding, **run) -> None:
    """DP-LoRA fine-tuning on one local silo (central mode): writes RUN_DIR with the adapter."""
    from dpfl.client.train import run_train
    from dpfl.shared.ldm.lora import LoraSpec

    try:
        lora = LoraSpec(preset=preset, rank=rank, alpha=alpha, dropout=dropout,
                        train_class_embedding=class_embedding,
                        blocks=tuple(b for b in blocks.split(",") if b) or None)
        job, dp = _job_and_dp(run)
        summary = run_train(job, lora, dp, progress=run["progress"])
    except DpflError as exc:
        _fail(exc)
    click.echo(json.dumps(summary, indent=2))


@main.command("train-full", context_settings=CTX)
@_run_options("runs/train-full", lr=3e-4, physical_batch=16,
              model_help="Base model directory: its public autoencoder, scheduler, class names "
                         "and UNet architecture (its UNet weights only with --init base).")
@click.option("--init", type=click.Choice(["scratch", "base"]), default="scratch",
              help="scratch: a randomly initialised UNet (seeded by --seed), the DPDM "
                   "baseline; base: the base model's UNet (DP full fine-tuning).")
@click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=0.999,
              help="EMA of the weights (post-processing, no privacy cost); 0: off.")
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
        _fail(exc)
    click.echo(json.dumps(summary, indent=2))


@main.command(context_settings=CTX)
@click.option("--superlink", required=True, help="The coordinator's address, host:port.")
@click.option("--ca-cert", required=True, type=click.Path(dir_okay=False),
              help="The federation's CA certificate (verifies the coordinator).")
@click.option("--node-key", required=True, type=click.Path(dir_okay=False),
              help="This site's node-authentication private key (from the coordinator's "
                   "'dpfl-server certs').")
@click.option("--site-id", required=True, help="This site's name in the privacy ledger.")
@click.option("--data", required=True, help="Private images: image folder, .npz or IDX file.")
@click.option("--base-model", required=True, type=click.Path(file_okay=False),
              help="Local copy of the public base model (verified by fingerprint).")
@click.option("--state-dir", required=True, type=click.Path(file_okay=False),
              help="Persistent state: accountant, cached latents. Never delete between runs.")
@click.option("--epsilon-budget", type=click.FloatRange(min=0, min_open=True), default=10.0,
              help="The most epsilon this site will ever spend (across all runs).")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-5)
@click.option("--accountant", type=click.Choice(["rdp", "prv"]), default="rdp")
@click.option("--max-physical-batch", type=click.IntRange(min=1), default=256)
@click.option("--secure-mode/--no-secure-mode", default=True,
              help="DP noise from the OS CSPRNG, hardened against floating-point attacks "
                   "(on by default for a real site; --no-secure-mode only for experiments).")
@click.option("--device", default="auto", help="auto, cpu or cuda[:N].")
@click.option("--runtime-port", type=click.IntRange(1, 65535), default=9094,
              help="Loopback port of the SuperNode's Runtime API (distinct per node).")
@click.option("--max-wait-time", type=click.FloatRange(min=0), default=0.0,
              help="Give up after this many seconds without the coordinator (0: never).")
def join(superlink: str, ca_cert: str, node_key: str, runtime_port: int,
         max_wait_time: float, **site) -> None:
    """Join a federation: a SuperNode serving this site's DP training (runs until stopped)."""
    from dpfl.client.deploy import SiteNode, preflight, run_node
    from dpfl.shared.federation.config import SiteConfig

    try:
        node = SiteNode(site=SiteConfig(**site), superlink=superlink, ca_cert=Path(ca_cert),
                        node_key=Path(node_key), runtime_port=runtime_port,
                        max_wait_time=max_wait_time)
        preflight(node)  # certificates, keys and state directory, before any process starts
    except DpflError as exc:
        _fail(exc)
    raise SystemExit(run_node(node))


if __name__ == "__main__":
    main()
