"""Matching a silo's classes to the base model's classes by name, never by position.

A silo's labels index its own class names (an image folder's sub-folder names in sorted
order, an ``.npz``'s ``class_names``). Before training they are translated to the base
model's class indices, class by class:

1. a label map entry (``--label-map FILE``, node config ``label-map``): JSON
   ``{"silo class": "base class"}``;
2. the exact base class name (case and spaces matter). A folder name cannot hold ``/`` (or,
   on Windows, ``\\ : * ? " < > |``), so folder names are percent-decoded first:
   ``T-shirt%2Ftop`` is the class ``T-shirt/top`` (``%25`` is a literal ``%``);
3. a decimal number ``k`` below the number of base classes is base class ``k``: the names an
   ``.npz`` or IDX file without class names gets (``0``, ``1``, ...), so such data keeps
   index semantics, and a folder named ``3`` holds class 3.

A class that holds images and matches none of these is refused with a :class:`DataError`
listing the silo's and the base model's class names. Classes without images need no match.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from dpfl.shared.errors import DataError

HOW_TO_MATCH = ("name each class exactly after a base class (in a folder name write '/' as "
                "'%2F', e.g. 'T-shirt%2Ftop'), or give a label map (--label-map FILE, node "
                "config 'label-map'): JSON {\"silo class\": \"base class\"}")


def folder_class_name(folder: str) -> str:
    """The class a sub-folder of an image folder holds: its name, percent-decoded."""
    return unquote(folder)


def read_label_map(path: str | Path | None) -> dict[str, str] | None:
    """A label map file: a JSON object of silo class names (or folder names, escaped or
    not) to base class names. ``None`` or ``""``: no map."""
    if not path:
        return None
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except FileNotFoundError:
        raise DataError(f"label map {p} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"label map {p} is not readable JSON ({exc})") from exc
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in raw.items()):
        raise DataError(f"label map {p} must be a JSON object of strings, "
                        "{\"silo class\": \"base class\"}")
    return {unquote(k): v for k, v in raw.items()}


def class_index(silo_names: Sequence[str], used: Sequence[int], base_names: Sequence[str],
                label_map: Mapping[str, str] | None = None, source: str = "") -> np.ndarray:
    """For each silo class, the index of its base class (-1 for classes without images).

    ``used``: the silo classes that hold images. Raises :class:`DataError` when one of them
    matches no base class, or when a label map names something that is not a base class.
    """
    base = {name: i for i, name in enumerate(base_names)}
    label_map = dict(label_map or {})
    bad_targets = sorted(v for v in set(label_map.values()) if v not in base)
    if bad_targets:
        raise DataError(f"{source}: the label map names {bad_targets}, which are not classes "
                        f"of the base model; its classes are {list(base_names)}")
    out = np.full(len(silo_names), -1, dtype=np.int64)
    unmatched, out_of_range = [], []
    for i in sorted(set(int(u) for u in used)):
        name = silo_names[i]
        target = label_map.get(name, name)
        if target in base:
            out[i] = base[target]
        elif name.isdecimal() and name == str(int(name)) and int(name) < len(base):
            out[i] = int(name)
        elif name.isdecimal() and name == str(int(name)):
            out_of_range.append(name)
        else:
            unmatched.append(name)
    if out_of_range:
        raise DataError(f"{source}: label {out_of_range[-1]} is out of range for the base "
                        f"model's {len(base)} classes {list(base_names)}")
    if unmatched:
        raise DataError(f"{source}: silo class(es) {unmatched} match no class of the base "
                        f"model. Silo classes: {list(silo_names)}; base model classes: "
                        f"{list(base_names)}. Fix: {HOW_TO_MATCH}")
    _check_unambiguous(silo_names, out, label_map, source)
    return out


def _check_unambiguous(silo_names: Sequence[str], index: np.ndarray,
                       label_map: Mapping[str, str], source: str) -> None:
    """Two silo classes may share a base class only when a label map says so."""
    seen: dict[int, str] = {}
    for name, j in zip(silo_names, index):
        if j < 0:
            continue
        other = seen.setdefault(int(j), name)
        if other != name and not (name in label_map and other in label_map):
            raise DataError(f"{source}: silo classes {other!r} and {name!r} both match base "
                            f"class {int(j)}; merge them in one folder or say so in a label map")
