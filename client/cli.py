"""``dpfl-client``: what a hospital runs (its data, local DP training, its site)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import numpy as np

from dpfl.shared.errors import DpflError

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
    from dpfl.shared.sources import load_source

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
    from dpfl.shared.data import write_npz
    from dpfl.shared.partition import partition as split
    from dpfl.shared.sources import load_source

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


if __name__ == "__main__":
    main()
