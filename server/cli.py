"""``dpfl-server``: what the coordinator runs (public pretraining, base model tools)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import click

from dpfl.shared.errors import DpflError

CTX = {"show_default": True, "help_option_names": ["-h", "--help"]}


def _fail(exc: Exception) -> None:
    raise click.ClickException(str(exc)) from exc


@click.group(context_settings=CTX)
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def main(verbose: bool) -> None:
    """dpfl coordinator: hosts the public base model and aggregates DP adapters."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command(context_settings=CTX)
@click.option("--data", default="fmnist:public",
              help="PUBLIC data only: fmnist:public, an image folder, .npz or IDX file.")
@click.option("--preset", type=click.Choice(["tiny", "fmnist"]), default="fmnist")
@click.option("--run-dir", type=click.Path(file_okay=False), default="runs/pretrain")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Base model directory to write [default: RUN_DIR/model].")
@click.option("--ae-steps", type=click.IntRange(min=0), default=3000)
@click.option("--unet-steps", type=click.IntRange(min=0), default=20000)
@click.option("--batch-size", type=click.IntRange(min=1), default=128)
@click.option("--ae-lr", type=click.FloatRange(min=0, min_open=True), default=1e-3)
@click.option("--unet-lr", type=click.FloatRange(min=0, min_open=True), default=5e-4)
@click.option("--kl-weight", type=click.FloatRange(min=0), default=1e-4)
@click.option("--cond-drop", type=click.FloatRange(0, 1, max_open=True), default=0.1)
@click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True), default=0.999)
@click.option("--seed", type=int, default=0)
@click.option("--checkpoint-every", type=click.IntRange(min=1), default=500)
@click.option("--device", default="auto", help="auto, cpu or cuda[:N].")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="torch CPU threads (0: torch's default).")
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
        _fail(exc)
    click.echo(f"base model: {out or Path(run_dir) / 'model'}  fingerprint {ldm.card['fingerprint']}")
    click.echo(f"sample grid: {Path(run_dir) / 'samples.png'}")


@main.command(context_settings=CTX)
@click.argument("model_dir", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default="samples.png")
@click.option("--per-class", type=click.IntRange(1, 64), default=8)
@click.option("--steps", type=click.IntRange(1, 1000), default=50)
@click.option("--guidance", type=click.FloatRange(min=0), default=1.0)
@click.option("--seed", type=int, default=0)
def sample(model_dir: str, out: str, per_class: int, steps: int, guidance: float, seed: int) -> None:
    """Sample a class grid PNG from a base model directory."""
    from dpfl.shared.ldm.models import load_ldm
    from dpfl.shared.ldm.sampling import class_grid

    try:
        ldm = load_ldm(model_dir)
    except DpflError as exc:
        _fail(exc)
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
        _fail(exc)
    click.echo(json.dumps({"spec": dataclasses.asdict(ldm.spec), "card": ldm.card,
                           "fingerprint": ldm.fingerprint()}, indent=2, default=str))


@main.command(context_settings=CTX)
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="Base model whose samples are evaluated (or give --train-real).")
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="peft adapter directory merged into --model (e.g. RUN_DIR/adapter).")
@click.option("--train-real", default=None, metavar="SOURCE",
              help="Evaluate this real set instead of samples (the non-private ceiling).")
@click.option("--train-per-class", type=click.IntRange(min=0), default=0,
              help="With --train-real: at most this many images of each class, seeded (0: all).")
@click.option("--per-class", type=click.IntRange(min=1), default=200, help="Samples per class.")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, help="DDIM steps.")
@click.option("--guidance", type=click.FloatRange(min=0), default=1.0)
@click.option("--seed", type=int, default=0)
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Sampling batch.")
@click.option("--test", default="fmnist:test", help="Real test set (also the FD reference).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for evaluation.json, samples.png and samples.npz.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, help="Downstream CNN epochs.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.1,
              help="Share of the training set held out to pick the epoch (0: last epoch).")
@click.option("--classifier-dir", type=click.Path(file_okay=False), default=None,
              help="Domain classifier folder, trained there on --classifier-data if absent "
                   "[default: MODEL/eval-classifier, or models/fmnist-base/eval-classifier].")
@click.option("--classifier-data", default="fmnist:public",
              help="PUBLIC data for the domain classifier.")
@click.option("--inception", type=click.Path(dir_okay=False), default=None,
              help="Local inception-2015-12-05.pt for FID [default: $DPFL_INCEPTION; unset: "
                   "no FID].")
@click.option("--device", default="cpu", help="auto, cpu or cuda[:N].")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="torch CPU threads (0: torch's default).")
@click.option("--progress/--no-progress", default=True)
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
        _fail(exc)
    click.echo(summary_table(record))
    click.echo(f"wrote {Path(out) / 'evaluation.json'}"
               + (f" and {record['grid']}" if record["grid"] else ""))


@main.command(context_settings=CTX)
@click.argument("model_dir", type=click.Path())
@click.option("--adapter", type=click.Path(file_okay=False), default=None,
              help="peft adapter directory to merge (from 'dpfl-client train'); none: base only.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Bundle directory to write (must not exist unless --overwrite).")
@click.option("--privacy", type=click.Path(dir_okay=False), default=None,
              help="JSON with the adapter's epsilon/delta/accountant (e.g. the accountant state).")
@click.option("--epsilon", type=click.FloatRange(min=0), default=None,
              help="Stated epsilon, when there is no --privacy file.")
@click.option("--delta", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Stated delta, with --epsilon.")
@click.option("--fp16", is_flag=True, help="Also write a float16 variant.")
@click.option("--int8", is_flag=True, help="Also write an int8 (dynamic quantization) variant.")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=1e-3,
              help="Max |ONNX - torch| allowed for the fp32 UNet and decoder outputs.")
@click.option("--image-tolerance", type=click.FloatRange(min=0, min_open=True), default=1e-2,
              help="Max |ONNX - torch| allowed for images sampled end to end (fp32).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at --out.")
def export(model_dir: str, adapter: str | None, out: str, privacy: str | None,
           epsilon: float | None, delta: float | None, fp16: bool, int8: bool, tolerance: float,
           image_tolerance: float, overwrite: bool) -> None:
    """Merge an adapter into the base model and write an ONNX bundle for dpfl-sample."""
    from dpfl.shared.export.onnx_bundle import ExportConfig, PrivacyGuarantee, export_bundle
    from dpfl.shared.ldm.models import load_ldm

    try:
        if privacy and (epsilon is not None or delta is not None):
            raise DpflError("give either --privacy FILE or --epsilon/--delta, not both")
        guarantee = (PrivacyGuarantee.from_file(privacy) if privacy
                     else PrivacyGuarantee.from_values(epsilon, delta))
        cfg = ExportConfig(tolerance=tolerance, image_tolerance=image_tolerance, fp16=fp16,
                           int8=int8)
        path = export_bundle(load_ldm(model_dir), out, adapter_dir=adapter, privacy=guarantee,
                             config=cfg, overwrite=overwrite)
    except DpflError as exc:
        _fail(exc)
    meta = json.loads((Path(path) / "bundle.json").read_text())
    for name, v in meta["variants"].items():
        click.echo(f"{name}: unet max|diff| {v['parity']['unet']['max_abs_diff']:.2e}, decoder "
                   f"{v['parity']['decoder']['max_abs_diff']:.2e}, images "
                   f"{v['image_parity']['max_abs_diff']:.2e}")
    click.echo(f"privacy: {meta['privacy']['status']} (eps={meta['privacy']['epsilon']}, "
               f"delta={meta['privacy']['delta']})")
    click.echo(f"wrote bundle {path}; sample it with: dpfl-sample {path} --out samples")


@main.command(context_settings=CTX)
@click.option("--base-model", type=click.Path(), default="models/fmnist-base")
@click.option("--data", default="fmnist:private", help="PRIVATE data to split among the sites.")
@click.option("--sites", "num_sites", type=click.IntRange(min=1), default=3)
@click.option("--scheme", type=click.Choice(["iid", "class", "dirichlet"]), default="dirichlet")
@click.option("--alpha", type=click.FloatRange(min=0, min_open=True), default=0.5)
@click.option("--max-examples", type=click.IntRange(min=0), default=0,
              help="Use at most this many private images in total (0: all).")
@click.option("--epsilon-budget", type=click.FloatRange(min=0, min_open=True), default=10.0,
              help="Each site's own epsilon budget.")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=1e-5)
@click.option("--cpus-per-site", type=click.FloatRange(min=0, min_open=True), default=1.0)
@click.option("--gpus-per-site", type=click.FloatRange(min=0), default=0.0,
              help="Fractional GPUs per virtual site (e.g. 0.25: four sites per GPU).")
@click.option("--run-dir", type=click.Path(file_okay=False), default="runs/federated")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any run-config key, kebab-case, e.g. --set num-rounds=5 --set ffa=true.")
def simulate(base_model: str, data: str, num_sites: int, scheme: str, alpha: float,
             max_examples: int, epsilon_budget: float, delta: float, cpus_per_site: float,
             gpus_per_site: float, run_dir: str, overrides: tuple[str, ...]) -> None:
    """Federated DP fine-tuning of N simulated sites (Flower simulation engine)."""
    from dpfl.server.simulate import SimulationSetup
    from dpfl.server.simulate import simulate as run_simulation
    from dpfl.shared.federation.config import FedConfig
    from dpfl.shared.federation.ledger import PrivacyLedger

    try:
        pairs = dict(o.split("=", 1) for o in overrides if "=" in o)
        if len(pairs) != len(overrides):
            raise DpflError(f"--set takes KEY=VALUE, got {list(overrides)}")
        cfg = FedConfig.from_run_config({"base-model": base_model, "run-dir": run_dir,
                                         "min-available-nodes": num_sites, **pairs})
        setup = SimulationSetup(data=data, num_sites=num_sites, scheme=scheme, alpha=alpha,
                                max_examples=max_examples, epsilon_budget=epsilon_budget,
                                delta=delta, cpus_per_site=cpus_per_site,
                                gpus_per_site=gpus_per_site)
        run_simulation(cfg, setup)
        ledger = PrivacyLedger.load_or_create(Path(run_dir) / "ledger.json")
    except DpflError as exc:
        _fail(exc)
    click.echo(ledger.table())
    click.echo(f"run directory: {run_dir} (ledger.json, metrics.jsonl, samples_round_*.png, "
               "adapter/, report/report.html)")


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
        _fail(exc)
    click.echo(f"wrote {path} (self-contained) and {path.with_name('report.md')}")


@main.command(context_settings=CTX)
@click.option("--out", type=click.Path(file_okay=False), default="deploy/pki",
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
        _fail(exc)
    click.echo(f"coordinator keeps: {layout.server_cert}, {layout.server_key}, "
               f"{layout.root / 'sites'}/*/node.pub; move {layout.ca_key} offline")
    for site in sites:
        click.echo(f"give site {site}: {layout.ca_cert} and {layout.node_key(site)}")


def _coordinator(pki: str, state_dir: str, host: str, port: int, address: str):
    from dpfl.server.deploy import Coordinator

    return Coordinator(pki=Path(pki), state_dir=Path(state_dir), host=host, port=port,
                       address=address)


_PKI = click.option("--pki", type=click.Path(file_okay=False), default="deploy/pki",
                    help="Directory written by 'dpfl-server certs'.")
_STATE = click.option("--state-dir", type=click.Path(file_okay=False),
                      default="runs/coordinator",
                      help="Coordinator state: SuperLink database, FLWR_HOME, logs.")
_HOST = click.option("--host", default="127.0.0.1",
                     help="Interface of the SuperLink's HTTPS API (loopback unless sites are "
                          "remote).")
_PORT = click.option("--port", type=click.IntRange(1, 65535), default=9093)


@main.command(context_settings=CTX)
@_PKI
@_STATE
@_HOST
@_PORT
@click.option("--site-key", "site_keys", multiple=True, metavar="SITE=PUBKEY",
              help="List a site's public key [default: every PKI/sites/<id>/node.pub].")
def serve(pki: str, state_dir: str, host: str, port: int, site_keys: tuple[str, ...]) -> None:
    """Start the coordinator's SuperLink (TLS, only listed sites may join); runs until stopped."""
    from dpfl.server.pki import PkiLayout

    try:
        coord = _coordinator(pki, state_dir, host, port, "")
        if site_keys:
            if not all("=" in k for k in site_keys):
                raise DpflError(f"--site-key takes SITE=PUBKEY, got {list(site_keys)}")
            keys = {k.split("=", 1)[0]: Path(k.split("=", 1)[1]) for k in site_keys}
        else:
            keys = {p.parent.name: p for p in sorted((PkiLayout(Path(pki)).root / "sites")
                                                     .glob("*/node.pub"))}
        from dpfl.server.deploy import serve as run_serve

        code = run_serve(coord, keys)
    except DpflError as exc:
        _fail(exc)
    raise SystemExit(code)


@main.command(name="run", context_settings=CTX)
@_PKI
@_STATE
@click.option("--superlink", "address", default="127.0.0.1:9093", help="SuperLink host:port.")
@click.option("--app", "app", type=click.Path(file_okay=False), default=None,
              help="dpfl source directory holding pyproject.toml [default: this checkout].")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Run-config key, kebab-case, e.g. --set num-rounds=5 --set run-dir=/abs.")
@click.option("--timeout", type=click.FloatRange(min=1), default=24 * 3600.0,
              help="Seconds to wait for the run to finish.")
@click.option("--wait/--no-wait", default=True, help="Wait for the run and print the ledger.")
def run_cmd(pki: str, state_dir: str, address: str, app: str | None,
            overrides: tuple[str, ...], timeout: float, wait: bool) -> None:
    """Submit the federated DP fine-tuning run to a running coordinator SuperLink."""
    from dpfl.server import deploy
    from dpfl.shared.federation.config import FedConfig
    from dpfl.shared.federation.ledger import PrivacyLedger

    try:
        pairs = dict(o.split("=", 1) for o in overrides if "=" in o)
        if len(pairs) != len(overrides):
            raise DpflError(f"--set takes KEY=VALUE, got {list(overrides)}")
        cfg = FedConfig.from_run_config(pairs)  # validate here, before anything is sent
        values = {k: getattr(cfg, k.replace("-", "_")) for k in pairs}
        for key in ("base-model", "run-dir"):  # the SuperLink's cwd differs from ours
            if key in values:
                values[key] = str(Path(str(values[key])).resolve())
        host, _, port = address.rpartition(":")
        coord = _coordinator(pki, state_dir, host or "127.0.0.1", int(port), address)
        coord.write_connection()
        app_path = deploy.app_dir(app, coord.state_dir / "app")
        run_id = deploy.submit_run(coord, app_path, values)
        click.echo(f"run {run_id} submitted to {address}")
        if not wait:
            return
        status = deploy.wait_run(coord, run_id, timeout)
    except (DpflError, ValueError) as exc:
        _fail(exc)
    click.echo(f"run {run_id}: {status}")
    ledger_path = Path(str(values.get("run-dir", cfg.run_dir))) / "ledger.json"
    if ledger_path.exists():
        click.echo(PrivacyLedger.load_or_create(ledger_path).table())
    if status != f"{deploy.FINISHED}:completed":
        raise SystemExit(1)



@main.command(context_settings=CTX)
@click.option("--setting", type=click.Choice(["federated", "central", "scratch", "floor",
                                              "ceiling"]), required=True,
              help="federated: 3 non-IID hospitals, DP-LoRA; central: one silo, DP-LoRA; "
                   "scratch: whole UNet under DP from random init; floor: the public base model "
                   "unchanged; ceiling: the CNN on real private images (no privacy).")
@click.option("--epsilon", type=click.FloatRange(min=0, min_open=True), default=10.0,
              help="Target epsilon of the private settings (each site's, for federated).")
@click.option("--delta", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=1e-5)
@click.option("--preset", type=click.Choice(["tiny", "cpu", "fulldata", "full"]), default="cpu",
              help="tiny: a test-sized check; cpu: minutes on 2 cores; fulldata: all private "
                   "data and 60,000 synthetic images, about 1.5 h per federated row on 2 "
                   "cores; full: paper size (GPU).")
@click.option("--base-model", type=click.Path(), default="models/fmnist-base")
@click.option("--out", type=click.Path(file_okay=False), default="runs/experiments",
              help="Parent folder: one run directory per row, results.jsonl and results.md.")
@click.option("--seed", type=int, default=0)
@click.option("--device", default="auto", help="auto, cpu or cuda[:N].")
@click.option("--classifier-dir", type=click.Path(file_okay=False), default=None,
              help="Domain classifier folder [default: BASE_MODEL/eval-classifier].")
@click.option("--threads", type=click.IntRange(min=0), default=0,
              help="torch CPU threads (0: torch's default).")
def experiment(threads: int, **kw) -> None:
    """Run one row of the privacy-utility table end to end on Fashion-MNIST's standard split:
    train (per setting), evaluate (downstream CNN accuracy on the real test set, domain FD,
    precision/recall, FID with a local Inception file), write the run report, add the row
    to OUT/results.jsonl and OUT/results.md."""
    import torch

    from dpfl.server.experiment import Experiment, command_line, run_experiment

    if threads:
        torch.set_num_threads(threads)
    try:
        exp = Experiment(**kw)
        row = run_experiment(exp, command_line())
    except DpflError as exc:
        _fail(exc)
    click.echo(f"{row['setting']} ({row['preset']}): epsilon={row['epsilon']:.3f} "
               f"delta={row['delta']:g}  accuracy={row['accuracy']:.4f}  "
               f"domain FD={row['domain_fd']:.3f}  {row['total_seconds'] / 60:.1f} min")
    click.echo(f"run directory: {row['run_dir']} (evaluation/, report/report.html); table: "
               f"{Path(kw['out']) / 'results.md'}")


if __name__ == "__main__":
    main()
