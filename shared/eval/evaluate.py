"""Utility of a (DP-fine-tuned) LDM: downstream accuracy, domain Fréchet distance, FID,
precision/recall, following the protocol of DPDM (Dockhorn et al., TMLR 2023).

1. Sample a class-balanced synthetic set from the base model (plus an optional adapter).
2. Train a small CNN (:mod:`dpfl.shared.eval.cnn`) on it for a fixed number of epochs, choosing
   the epoch on a held-out slice of the synthetic set, and report accuracy on the real test
   set. The same function on a real set gives the non-private ceiling. With
   ``classifiers="all"``, also DPImageBench's ResNet, WideResNet and ResNeXt, and their mean.
3. Compare the synthetic set with the real test set in the feature space of a classifier
   trained once on public data only (cached as ``eval-classifier/`` beside the base model):
   Fréchet distance (overall and per class) and k-NN precision/recall
   (:mod:`dpfl.shared.eval.fid`). With a local Inception file, also the FID.

:func:`evaluate` does all of it and writes ``evaluation.json``, ``samples.png`` (a per-class
grid of the evaluated images) and ``samples.npz`` into an output folder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dpfl.shared.data.readers import ImageSet, write_npz
from dpfl.shared.data.sources import load_source
from dpfl.shared.edge.grid import save_grid
from dpfl.shared.errors import ConfigError, DataError, DpflError, ModelError
from dpfl.shared.eval.classifiers import build, parameter_count
from dpfl.shared.eval.cnn import (
    META_FILE,
    TrainedCNN,
    TrainSettings,
    accuracy,
    load_classifier,
    predict_logits,
    save_classifier,
    train_classifier,
    train_cnn,
)
from dpfl.shared.eval.fid import (
    GaussianStats,
    frechet_distance,
    frechet_from_features,
    inception_features,
    inception_path,
    load_inception,
    precision_recall,
)
from dpfl.shared.eval.record import CLASSIFIER_SETS, MEAN3, mean3
from dpfl.shared.io import atomic_write_json
from dpfl.shared.ldm.diffusion import SPACINGS
from dpfl.shared.ldm.models import LatentDiffusion, crop_center, fingerprint_modules, load_ldm
from dpfl.shared.ldm.sampling import sample_images
from dpfl.shared.rundir import versions

log = logging.getLogger(__name__)

CLASSIFIER_SUBDIR = "eval-classifier"
DEFAULT_CLASSIFIER_DIR = "models/fmnist-base/" + CLASSIFIER_SUBDIR
EVALUATION_FILE = "evaluation.json"
_NOT_PUBLIC = ("fmnist:private", "fmnist:test")


# -- the images under evaluation -------------------------------------------------------------
def load_generator(model_dir: str | Path, adapter_dir: str | Path | None = None,
                   device: str = "cpu") -> LatentDiffusion:
    """The base LDM, with the peft adapter in ``adapter_dir`` merged into its UNet if given."""
    from dpfl.shared.ldm.lora import load_adapter, merged_unet

    ldm = load_ldm(model_dir)
    if adapter_dir is not None:
        ldm = dataclasses.replace(ldm, unet=merged_unet(load_adapter(ldm.unet, adapter_dir)).eval())
    return ldm.to(device)


def synthetic_set(ldm: LatentDiffusion, per_class: int, steps: int = 25, guidance: float = 1.0,
                  seed: int = 0, batch_size: int = 256, progress: bool = True,
                  spacing: str | None = None) -> ImageSet:
    """``per_class`` DDIM samples of every class, cropped to the data resolution, quantised to
    8 bits like real images. Labels cycle through the classes, so every batch is balanced;
    batch ``i`` draws its noise with seed ``seed + i`` (same seed and batch size, same set)."""
    if per_class < 1 or batch_size < 1:
        raise ConfigError(f"per_class and batch_size must be >= 1, got {per_class}, {batch_size}")
    spec = ldm.spec
    labels = torch.arange(spec.num_classes).repeat(per_class)
    chunks = []
    bar = tqdm(total=len(labels), desc="sampling", unit="img", disable=not progress)
    for i, chunk in enumerate(labels.split(batch_size)):
        img = sample_images(ldm, chunk, steps=steps, guidance=guidance, seed=seed + i,
                            batch_size=batch_size, spacing=spacing)
        chunks.append(crop_center(img, spec.source_size))
        bar.update(len(chunk))
    bar.close()
    x = ((torch.cat(chunks).clamp(-1, 1) + 1) * 127.5).round() / 255.0
    return ImageSet(x.permute(0, 2, 3, 1).numpy().astype(np.float32), labels.numpy(),
                    spec.class_names, source=f"{per_class}/class samples, {steps} DDIM steps"
                                             + (f" ({spacing} spacing)" if spacing else "")
                                             + f", guidance {guidance}, seed {seed}")


def balanced_subset(data: ImageSet, per_class: int, seed: int = 0) -> ImageSet:
    """At most ``per_class`` images of each class (0: all), a seeded random draw. A real set
    the size and balance of a synthetic one makes distances and accuracy comparable."""
    if not per_class:
        return data
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(data.labels):
        idx = np.flatnonzero(data.labels == c)
        keep.append(rng.choice(idx, min(per_class, len(idx)), replace=False))
    return data.subset(np.sort(np.concatenate(keep)),
                       source=f"{data.source} (at most {per_class}/class, seed {seed})")


# -- downstream accuracy ---------------------------------------------------------------------
@dataclass
class AccuracyResult:
    """Real-test accuracy of a classifier (by default our CNN, DPDM protocol) trained on one
    image set."""

    accuracy: float
    per_class: dict[str, float | None]
    epochs: int
    selected_epoch: int
    train_size: int
    val_size: int
    test_size: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    classifier: str = "cnn"  # a name of dpfl.shared.eval.classifiers.CLASSIFIERS
    parameters: int = 0  # its trainable parameters

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_compatible(a: ImageSet, b: ImageSet) -> None:
    if a.images.shape[1:] != b.images.shape[1:]:
        raise DataError(f"{a.source} has images of shape {a.images.shape[1:]} but {b.source} "
                        f"has {b.images.shape[1:]}; both sets need the same size and channels")
    if len(a.class_names) != len(b.class_names):
        raise DataError(f"{a.source} has {len(a.class_names)} classes but {b.source} has "
                        f"{len(b.class_names)}")


def downstream_accuracy(train: ImageSet, test: ImageSet,
                        settings: TrainSettings = TrainSettings(),
                        progress: bool = False, classifier: str = "cnn") -> AccuracyResult:
    """Train ``classifier`` (our CNN, or one of DPImageBench's three) on ``train`` (synthetic
    or real) and score it on ``test``.

    ``test`` is used once, after training and epoch selection are finished.
    """
    _check_compatible(train, test)
    channels, n_classes = train.images.shape[3], len(train.class_names)
    build(classifier, channels, n_classes)  # an unknown name fails before any training
    trained = train_classifier(train, lambda: build(classifier, channels, n_classes), settings,
                               progress, desc=f"downstream {classifier}")
    acc, per_class = accuracy(trained.model, test)
    return AccuracyResult(acc, dict(zip(test.class_names, per_class)), settings.epochs,
                          trained.selected_epoch, trained.train_size, trained.val_size,
                          len(test), trained.seconds, trained.history, classifier,
                          parameter_count(trained.model))


def mean3_accuracy(train: ImageSet, test: ImageSet, settings: TrainSettings = TrainSettings(),
                   progress: bool = False) -> dict[str, Any]:
    """DPImageBench's protocol: ResNet, WideResNet and ResNeXt (:data:`MEAN3`) each trained on
    ``train`` like the CNN, scored on ``test``; ``accuracy`` is the mean of the three."""
    members: dict[str, dict[str, Any]] = {}
    for name in MEAN3:
        members[name] = downstream_accuracy(train, test, settings, progress, name).to_json()
        log.info("%s: accuracy %.4f (epoch %d/%d chosen, %.0f s)", name,
                 members[name]["accuracy"], members[name]["selected_epoch"], settings.epochs,
                 members[name]["seconds"])
    return {"accuracy": mean3({n: m["accuracy"] for n, m in members.items()}),
            "classifiers": members}


# -- domain feature space --------------------------------------------------------------------
def domain_classifier(folder: str | Path, data: str = "fmnist:public",
                      settings: TrainSettings = TrainSettings(),
                      progress: bool = True) -> TrainedCNN:
    """The feature extractor for domain FD: loaded from ``folder``, or trained on the PUBLIC
    source ``data`` and saved there first. A cached classifier trained on other data is
    refused."""
    folder = Path(folder)
    if (folder / META_FILE).exists():
        trained = load_classifier(folder, settings.device)
        if trained.meta.get("data") != data:
            raise ModelError(f"{folder / META_FILE}: field 'data' is {trained.meta.get('data')!r}, "
                             f"not {data!r}; pass another --classifier-dir or delete this one")
        return trained
    if data.split("@")[0] in _NOT_PUBLIC:
        raise ConfigError(f"the domain classifier must be trained on public data only, not {data}")
    ds = load_source(data)
    log.info("training the domain classifier on %d images of %s into %s", len(ds), data, folder)
    trained = train_cnn(ds, settings, progress=progress, desc="domain classifier")
    val = [h["val_accuracy"] for h in trained.history if "val_accuracy" in h]
    best = max(val) if val else None
    trained.meta = {"data": data, "seen_classes": sorted(int(c) for c in np.unique(ds.labels)),
                    "val_accuracy": best, "settings": dataclasses.asdict(settings),
                    "fingerprint": fingerprint_modules({"cnn": trained.model})}
    save_classifier(trained, folder)
    return trained


def domain_metrics(classifier: TrainedCNN, generated: ImageSet, reference: ImageSet,
                   k: int = 3, seed: int = 0) -> dict[str, Any]:
    """Fréchet distance (overall and per class) and precision/recall of ``generated``
    against ``reference`` in the classifier's penultimate-layer feature space."""
    _check_compatible(generated, reference)
    if classifier.model.cfg.in_channels != generated.images.shape[3]:
        raise DataError(f"the domain classifier takes {classifier.model.cfg.in_channels} "
                        f"channel(s) but {generated.source} has {generated.images.shape[3]}")
    fg = predict_logits(classifier.model, generated, features=True).numpy()
    fr = predict_logits(classifier.model, reference, features=True).numpy()
    per_class: dict[str, float | None] = {}
    for c, name in enumerate(reference.class_names):
        a, b = fg[generated.labels == c], fr[reference.labels == c]
        per_class[name] = frechet_from_features(a, b) if len(a) > 1 and len(b) > 1 else None
    return {"fd": frechet_distance(GaussianStats.of(fg), GaussianStats.of(fr)),
            "fd_per_class": per_class, **precision_recall(fr, fg, k=k, seed=seed),
            "feature_dim": int(fg.shape[1]), "generated": len(fg), "reference": len(fr)}


def fid(generated: ImageSet, reference: ImageSet, weights: str | Path, device: str = "cpu",
        batch_size: int = 64, progress: bool = True) -> float:
    """FID with NVIDIA's TorchScript Inception-v3 read from the local file ``weights``."""
    net = load_inception(weights, device)
    fg = inception_features(net, generated.images, batch_size, device, progress)
    fr = inception_features(net, reference.images, batch_size, device, progress)
    return frechet_from_features(fg, fr)


# -- the whole evaluation --------------------------------------------------------------------
@dataclass(frozen=True)
class EvalConfig:
    """What :func:`evaluate` measures.

    Attributes:
        model: base model directory; its samples are evaluated. Exactly one of ``model`` and
            ``train_real`` is given.
        adapter: peft adapter directory merged into the model's UNet (optional).
        train_real: a real data source evaluated instead of samples (the non-private ceiling).
        train_per_class: with ``train_real``, use at most this many images of each class, a
            seeded draw (0: all).
        autoencoder: with ``train_real``, a model directory whose autoencoder reconstructs
            the real set; the CNN trains on the reconstructions (the autoencoder ceiling,
            :mod:`dpfl.shared.eval.autoencoder`). Neither is ever written out; the record holds
            the reconstruction MSE and a grid of reconstructed *test* images.
        per_class: samples per class (>= 1, default 200).
        steps: DDIM steps (>= 1, default 25); guidance: classifier-free guidance (>= 0, 1 =
            plain conditional sampling); spacing: DDIM timestep spacing (``leading``,
            ``trailing``, ``linspace``; default None: the model scheduler's).
        seed: sampling noise, CNN initialisation, splits and subsampling (default 0).
        batch_size: sampling batch size (>= 1, default 256).
        test: the real test set (default ``fmnist:test``); the reference of every distance.
        epochs: downstream CNN epochs (>= 1, default 10); val_fraction: share of the training
            set held out to choose the epoch (0 <= f < 1, default 0.1; 0: last epoch).
        classifiers: ``cnn`` (default): our CNN only; ``all``: also DPImageBench's ResNet,
            WideResNet and ResNeXt (:mod:`dpfl.shared.eval.classifiers`), same epochs and
            selection, and their mean (``mean3`` in the record); about 5-6 times the CNN's
            training time on one CPU thread (docs/results.md).
        classifier_dir: domain classifier folder (default ``MODEL/eval-classifier``, or
            ``models/fmnist-base/eval-classifier`` without a model); trained there if absent.
        classifier_data: the PUBLIC data it is trained on (default ``fmnist:public``).
        classifier_epochs: its training epochs (default 10).
        inception: Inception weights file for FID (default ``$DPFL_INCEPTION``; unset: no FID).
        k: neighbours of the precision/recall manifolds (>= 1, default 3).
        device: ``auto``, ``cpu`` or ``cuda[:N]`` (default cpu).
    """

    model: str | None = None
    adapter: str | None = None
    train_real: str | None = None
    train_per_class: int = 0
    autoencoder: str | None = None
    per_class: int = 200
    steps: int = 25
    guidance: float = 1.0
    spacing: str | None = None
    seed: int = 0
    batch_size: int = 256
    test: str = "fmnist:test"
    epochs: int = 10
    val_fraction: float = 0.1
    classifiers: str = "cnn"
    classifier_dir: str | None = None
    classifier_data: str = "fmnist:public"
    classifier_epochs: int = 10
    inception: str | None = None
    k: int = 3
    device: str = "cpu"

    def __post_init__(self) -> None:
        if (self.model is None) == (self.train_real is None):
            raise ConfigError("give a model to evaluate its samples, or a real training set "
                              "(train_real) for the ceiling, not both and not neither")
        if self.adapter is not None and self.model is None:
            raise ConfigError("an adapter needs the base model it belongs to (model)")
        if self.autoencoder is not None and self.train_real is None:
            raise ConfigError("an autoencoder reconstructs a real training set: give train_real "
                              "with it (to evaluate a model's samples, give model instead)")
        if min(self.per_class, self.steps, self.batch_size, self.epochs, self.k,
               self.classifier_epochs) < 1 or self.train_per_class < 0 or self.guidance < 0:
            raise ConfigError("per_class, steps, batch_size, epochs, classifier_epochs and k must "
                              "be >= 1; train_per_class and guidance >= 0")
        if self.spacing not in (None, *SPACINGS):
            raise ConfigError(f"spacing must be one of {SPACINGS} (or unset: the model "
                              f"scheduler's), got {self.spacing!r}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.classifiers not in CLASSIFIER_SETS:
            raise ConfigError(f"classifiers must be one of {list(CLASSIFIER_SETS)}, got "
                              f"{self.classifiers!r}")

    def resolved_classifier_dir(self) -> Path:
        if self.classifier_dir:
            return Path(self.classifier_dir)
        return Path(self.model) / CLASSIFIER_SUBDIR if self.model else Path(DEFAULT_CLASSIFIER_DIR)


def _adapter_privacy(adapter: str | None, model: str | None = None) -> dict[str, Any] | None:
    """The guarantee of what was trained on private data, read with the one ``privacy.json``
    reader: the adapter's ``privacy.json`` (central and federated training write it; for a
    central run of older dpfl, the accountant state beside the adapter), or for a whole
    model trained under DP (``dpfl-client train-full``) the model directory's."""
    from dpfl.shared.privacy.guarantee import PrivacyGuarantee

    if adapter is None:
        if model is None or not (Path(model) / "privacy.json").exists():
            return None
        candidates: tuple[Path, ...] = (Path(model) / "privacy.json",)
    else:
        candidates = (Path(adapter) / "privacy.json", Path(adapter).parent / "accountant.json")
    for p in candidates:
        if p.exists():
            try:
                g = PrivacyGuarantee.from_file(p)
            except DpflError as exc:
                return {"status": "unreadable", "source": str(p), "error": str(exc)}
            return {"status": g.status, "epsilon": g.epsilon, "delta": g.delta,
                    "accountant": g.accountant, "source": g.source}
    return {"status": "unknown", "source": "none"}


def _save_class_grid(data: ImageSet, path: Path, title: str) -> Path:
    counts = np.bincount(data.labels, minlength=len(data.class_names))
    n = int(min(8, counts.min()))
    idx = np.concatenate([np.flatnonzero(data.labels == c)[:n] for c in range(len(counts))])
    images = data.images[idx].transpose(0, 3, 1, 2) * 2 - 1
    return save_grid(images, path, nrow=n, row_labels=list(data.class_names), title=title)


def _reconstructed(cfg: EvalConfig, real: ImageSet, device: str, out: Path, progress: bool,
                   record: dict[str, Any]) -> ImageSet:
    """The autoencoder's reconstructions of ``real`` (kept in memory only), their MSE, and a
    grid of reconstructed test images."""
    from dpfl.shared.eval.autoencoder import mse_summary, reconstruct, reconstruction_grid

    record["kind"] = "reconstructed"
    ldm = load_ldm(str(cfg.autoencoder)).to(device)
    start = time.perf_counter()
    data, mse = reconstruct(ldm, real, cfg.batch_size, progress)
    test = load_source(cfg.test)
    _, mse_test = reconstruct(ldm, test, cfg.batch_size, progress)
    title = f"{cfg.autoencoder}: test images and their reconstructions"
    counts = np.bincount(test.labels)
    record["grid"] = str(reconstruction_grid(ldm, test, out / "reconstructions.png",
                                             int(min(8, counts[counts > 0].min())), title))
    record["autoencoder"] = {"model": cfg.autoencoder, "fingerprint": ldm.fingerprint(),
                             "card_fingerprint": ldm.card.get("fingerprint"),
                             "latent_shape": list(ldm.latent_shape),
                             "train": mse_summary(mse, real), "test": mse_summary(mse_test, test),
                             "seconds": time.perf_counter() - start}
    return data


def _training_set(cfg: EvalConfig, device: str, out: Path, progress: bool,
                  record: dict[str, Any]) -> ImageSet:
    if cfg.train_real is not None:
        record["kind"] = "real"
        real = balanced_subset(load_source(cfg.train_real), cfg.train_per_class, cfg.seed)
        if cfg.autoencoder is None:
            return real
        return _reconstructed(cfg, real, device, out, progress, record)
    model = str(cfg.model)  # EvalConfig guarantees exactly one of model / train_real
    record["kind"] = "synthetic"
    ldm = load_generator(model, cfg.adapter, device)
    start = time.perf_counter()
    data = synthetic_set(ldm, cfg.per_class, cfg.steps, cfg.guidance, cfg.seed, cfg.batch_size,
                         progress, spacing=cfg.spacing)
    record["generator"] = {"model": model, "base_fingerprint": ldm.card.get("fingerprint"),
                           "fingerprint": ldm.fingerprint(), "adapter": cfg.adapter,
                           "privacy": _adapter_privacy(cfg.adapter, model),
                           "sampling_seconds": time.perf_counter() - start,
                           "sampling": {"steps": cfg.steps, "guidance": cfg.guidance,
                                        "spacing": cfg.spacing or
                                        ldm.scheduler.config.get("timestep_spacing")}}
    write_npz(out / "samples.npz", data)
    title = (f"{cfg.adapter or model}: {cfg.steps} DDIM steps"
             + (f" ({cfg.spacing})" if cfg.spacing else "") + f", guidance {cfg.guidance}")
    record["grid"] = str(_save_class_grid(data, out / "samples.png", title))
    return data


def evaluate(cfg: EvalConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Run every metric and write ``evaluation.json`` (and for samples ``samples.png`` and
    ``samples.npz``) into ``out_dir``; returns the same record. A real training set is never
    copied into ``out_dir``."""
    from dpfl.shared.ldm.models import resolve_device

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = str(resolve_device(cfg.device))
    fid_weights = inception_path(cfg.inception)  # fail early on a missing file
    record: dict[str, Any] = {"config": dataclasses.asdict(cfg), "versions": versions(),
                              "grid": None}
    train = _training_set(cfg, device, out, progress, record)
    test = load_source(cfg.test)
    record["train_set"] = {"source": train.source, "size": len(train),
                           "per_class": np.bincount(train.labels,
                                                    minlength=len(train.class_names)).tolist()}
    record["test_set"] = {"source": cfg.test, "size": len(test)}
    settings = TrainSettings(epochs=cfg.epochs, val_fraction=cfg.val_fraction, seed=cfg.seed,
                             device=device)
    record["downstream"] = downstream_accuracy(train, test, settings, progress).to_json()
    record["mean3"] = (mean3_accuracy(train, test, settings, progress)
                       if set(MEAN3) <= set(CLASSIFIER_SETS[cfg.classifiers]) else None)
    cdir = cfg.resolved_classifier_dir()
    classifier = domain_classifier(cdir, cfg.classifier_data,
                                   TrainSettings(epochs=cfg.classifier_epochs, device=device),
                                   progress)
    seen = np.isin(test.labels, classifier.meta.get("seen_classes", []))
    seen_acc = accuracy(classifier.model, test.subset(seen))[0] if seen.any() else None
    record["classifier"] = {"dir": str(cdir), "data": classifier.meta.get("data"),
                            "fingerprint": classifier.meta.get("fingerprint"),
                            "val_accuracy": classifier.meta.get("val_accuracy"),
                            "test_accuracy_seen_classes": seen_acc}
    record["domain"] = domain_metrics(classifier, train, test, k=cfg.k, seed=cfg.seed)
    record["fid"] = None
    if fid_weights is not None:
        record["fid"] = {"value": fid(train, test, fid_weights, device, progress=progress),
                         "weights": str(fid_weights)}
    record["seconds"] = time.perf_counter() - start
    atomic_write_json(out / EVALUATION_FILE, record)
    return record


def summary_table(record: dict[str, Any]) -> str:
    """A few lines for a terminal: accuracy, per-class accuracy, distances."""
    d, dom = record["downstream"], record["domain"]
    fid_value = record["fid"]["value"] if record.get("fid") else None
    lines = [f"{record['kind']} training set: {record['train_set']['size']} images "
             f"({record['train_set']['source']})",
             f"  downstream accuracy on {record['test_set']['source']}: {d['accuracy']:.4f} "
             f"(epoch {d['selected_epoch']}/{d['epochs']}, {d['seconds']:.0f} s)",
             *([f"  3-classifier mean (ResNet, WRN, ResNeXt): {record['mean3']['accuracy']:.4f} "
                + "(" + ", ".join(f"{n} {m['accuracy']:.4f}"
                                  for n, m in record["mean3"]["classifiers"].items()) + ")"]
               if record.get("mean3") else []),
             f"  domain FD {dom['fd']:.3f}   precision {dom['precision']:.3f}   recall "
             f"{dom['recall']:.3f} (k={dom['k']})   FID "
             + (f"{fid_value:.2f}" if fid_value is not None else "- (no --inception)"),
             f"  {'class':<14}{'accuracy':>9}{'domain FD':>11}"]
    for name, acc in d["per_class"].items():
        fd = dom["fd_per_class"].get(name)
        lines.append(f"  {name:<14}" + (f"{acc:>9.3f}" if acc is not None else f"{'-':>9}")
                     + (f"{fd:>11.3f}" if fd is not None else f"{'-':>11}"))
    return "\n".join(lines)
