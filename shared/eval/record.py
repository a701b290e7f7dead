"""The one schema of a results-table row as committed under ``docs/results/`` (issue #15).

One JSON file per row, written by :meth:`ResultRecord.write` and read back (validated, every
error naming the file and the field) by :meth:`ResultRecord.read`, so anyone can recompute
``docs/results.md`` from the files. ``dpfl-server experiment`` writes one as ``record.json``
into every run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpfl.shared.errors import DataError
from dpfl.shared.io import atomic_write_json

FORMAT = "dpfl-result/1"
# DPImageBench's three classifiers (dpfl.shared.eval.classifiers): ``accuracy_mean3`` is the
# plain mean of their real-test accuracies, each recorded in ``extra["classifiers"]``
MEAN3 = ("resnet", "wrn", "resnext")
# what ``--classifiers`` may choose: our CNN alone (default), or the CNN and the three
CLASSIFIER_SETS: dict[str, tuple[str, ...]] = {"cnn": ("cnn",), "all": ("cnn", *MEAN3)}


def mean3(accuracies: dict[str, float]) -> float:
    """The DPImageBench number: the mean of the :data:`MEAN3` classifiers' accuracies."""
    missing = [n for n in MEAN3 if n not in accuracies]
    if missing:
        raise DataError(f"the 3-classifier mean needs accuracies of {list(MEAN3)}; "
                        f"missing {missing}")
    return sum(float(accuracies[n]) for n in MEAN3) / len(MEAN3)


@dataclass(frozen=True)
class ResultRecord:
    """One row of the results table.

    Attributes:
        setting: what was run: ``federated``, ``central``, ``scratch``, ``floor``, ``ceiling``,
            ``ae-ceiling``, ...
        sites: silos the private data was split over (1: one pooled silo, as in central,
            ceiling and ae-ceiling; 0: no private data was used, as in floor).
        epsilon, delta: the reported (ε, δ) guarantee; ``None`` for rows without one (the
            ceilings train on real private data: ε = ∞); 0.0 where no private data was touched.
        seed: seed of training, partitioning and evaluation.
        accuracy_cnn: the downstream CNN's accuracy on the real test set, a fraction in [0, 1].
        accuracy_mean3: the mean accuracy of the three DPImageBench-style classifiers (ResNet,
            WideResNet, ResNeXt: :data:`MEAN3`), a fraction; ``None`` where not measured. When
            set, ``extra["classifiers"]`` holds each one's ``accuracy`` (and ``per_class``,
            ``selected_epoch``, ``epochs``, ``seconds``, ``parameters``) and the mean must
            equal theirs.
        per_class: the CNN's accuracy per class name (fractions; None for an absent class).
        wall_s: wall-clock seconds of the whole row (training and evaluation).
        command: the command that reproduces the row.
        base_model_fingerprint: ``sha256:...`` of the base model's weights (its model card).
        preset, date, machine: size preset, UTC date (ISO 8601) and machine, in words.
        extra: setting-specific measurements (e.g. reconstruction MSE, domain FD, the
            per-classifier results under ``classifiers``).
    """

    setting: str
    sites: int
    epsilon: float | None
    delta: float | None
    seed: int
    accuracy_cnn: float
    accuracy_mean3: float | None
    per_class: dict[str, float | None]
    wall_s: float
    command: str
    base_model_fingerprint: str
    preset: str | None = None
    date: str = ""
    machine: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check("ResultRecord")

    def check(self, where: str) -> None:
        """Raise :class:`DataError` naming ``where`` and the field for any invalid value."""
        def bad(name: str, why: str) -> DataError:
            return DataError(f"{where}: field {name!r} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.setting, str) or not self.setting:
            raise bad("setting", "must be a non-empty string")
        if not isinstance(self.sites, int) or isinstance(self.sites, bool) or self.sites < 0:
            raise bad("sites", "must be an integer >= 0")
        for name in ("accuracy_cnn", "accuracy_mean3"):
            v = getattr(self, name)
            if not (v is None and name == "accuracy_mean3") and not _fraction(v):
                raise bad(name, "must be a fraction in [0, 1] (not a percentage)")
        if not isinstance(self.per_class, dict) or not all(
                isinstance(k, str) and (v is None or _fraction(v))
                for k, v in self.per_class.items()):
            raise bad("per_class", "must map class names to fractions in [0, 1] or null")
        if self.epsilon is not None and not (_number(self.epsilon) and self.epsilon >= 0):
            raise bad("epsilon", "must be a finite number >= 0, or null for no guarantee")
        if self.delta is not None and not (_number(self.delta) and 0 <= self.delta < 1):
            raise bad("delta", "must be in [0, 1), or null for no guarantee")
        if not (_number(self.wall_s) and self.wall_s >= 0):
            raise bad("wall_s", "must be a number of seconds >= 0")
        if not str(self.base_model_fingerprint).startswith("sha256:"):
            raise bad("base_model_fingerprint", "must be 'sha256:' + hex digest")
        self._check_mean3(where)
        if not isinstance(self.command, str) or not isinstance(self.seed, int):
            raise DataError(f"{where}: fields 'command' (a string) and 'seed' (an integer) "
                            f"got {self.command!r} and {self.seed!r}")

    def _check_mean3(self, where: str) -> None:
        members = self.extra.get("classifiers") if isinstance(self.extra, dict) else None
        if self.accuracy_mean3 is None:
            return
        if not isinstance(members, dict) or not all(
                isinstance(members.get(n), dict) and _fraction(members[n].get("accuracy"))
                for n in MEAN3):
            raise DataError(f"{where}: field 'accuracy_mean3' is set but extra['classifiers'] "
                            f"does not hold an accuracy for each of {list(MEAN3)}")
        expected = mean3({n: members[n]["accuracy"] for n in MEAN3})
        if abs(self.accuracy_mean3 - expected) > 1e-9:
            raise DataError(f"{where}: field 'accuracy_mean3' must be the mean of "
                            f"extra['classifiers'] accuracies ({expected!r}), got "
                            f"{self.accuracy_mean3!r}")

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def write(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    @classmethod
    def from_json(cls, d: Any, where: str = "result record") -> ResultRecord:
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise DataError(f"{where}: field 'format' must be {FORMAT!r}, got {got!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing, unknown = sorted(required - set(d)), sorted(set(d) - names - {"format"})
        if missing or unknown:
            raise DataError(f"{where}: missing field(s) {missing}, unknown field(s) {unknown}")
        record = object.__new__(cls)  # validated below with the file's name
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            object.__setattr__(record, f.name, d.get(f.name, default))
        record.check(where)
        return record

    @classmethod
    def read(cls, path: str | Path) -> ResultRecord:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a readable JSON result record ({exc})") from exc
        return cls.from_json(d, str(path))


def read_records(folder: str | Path) -> list[ResultRecord]:
    """Every ``*.json`` record in ``folder`` (sorted by file name), each validated."""
    return [ResultRecord.read(f) for f in sorted(Path(folder).glob("*.json"))]


def records_table(records: list[ResultRecord]) -> str:
    """A Markdown table of records: the numbers ``docs/results.md`` quotes, recomputed."""
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f} %"

    def num(v: float | None, spec: str, none: str) -> str:
        return none if v is None else format(v, spec)

    lines = ["| setting | sites | ε | δ | seed | CNN accuracy | 3-classifier mean | "
             "per class (%) | wall | base model | command |", "|" + "---|" * 11]
    for r in records:
        per = ", ".join(f"{k} {100 * v:.0f}" for k, v in r.per_class.items() if v is not None)
        lines.append("| " + " | ".join([
            r.setting, str(r.sites), num(r.epsilon, ".2f", "∞"), num(r.delta, ".1e", "-"),
            str(r.seed),
            pct(r.accuracy_cnn), _mean3_cell(r), per, f"{r.wall_s / 60:.1f} min",
            r.base_model_fingerprint[:19], f"`{r.command}`"]) + " |")
    return "\n".join(lines) + "\n"


def _mean3_cell(r: ResultRecord) -> str:
    """``89.0 % (resnet 90.1, wrn 89.2, resnext 87.7)``, or ``-`` where not measured."""
    if r.accuracy_mean3 is None:
        return "-"
    members = r.extra["classifiers"]  # check() guarantees the three accuracies
    return (f"{100 * r.accuracy_mean3:.1f} % ("
            + ", ".join(f"{n} {100 * members[n]['accuracy']:.1f}" for n in MEAN3) + ")")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fraction(v: Any) -> bool:
    return _number(v) and 0 <= v <= 1
