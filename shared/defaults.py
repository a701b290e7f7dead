"""Every default once: command-line options read the default of the dataclass field (or
function parameter) that the option sets, instead of repeating its value.

Standard library only: the torch-free ``dpfl-sample`` reads its defaults here too.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

#: diffusers' timestep spacings, which every dpfl sampler (torch and torch-free) accepts
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

#: how images whose size is not the base model's are fitted to it
#: (:func:`dpfl.shared.data.readers.fit_to_model`); every ``--image-policy`` choice reads this
IMAGE_POLICIES = ("refuse", "resize", "center-crop")
#: refuse: how a site's images are changed is the site's decision, made once with the sizes
#: in front of it (the refusal names them and the choices); a resize that only a log line
#: reports would be close to silent, and it changes what the model learns
DEFAULT_IMAGE_POLICY = "refuse"

#: the one format of dpfl's log lines (the CLIs, the ServerApp, a deployed site's ClientApp)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def default_of(owner: type | Callable[..., Any], name: str) -> Any:
    """The default of field ``name`` of dataclass ``owner``, or of parameter ``name`` of
    function ``owner``; a ``TypeError`` names a field or parameter without one (a typo)."""
    if dataclasses.is_dataclass(owner):
        field = {f.name: f for f in dataclasses.fields(owner)}.get(name)
        if field is not None and field.default is not dataclasses.MISSING:
            return field.default
    else:
        param = inspect.signature(owner).parameters.get(name)
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    raise TypeError(f"{getattr(owner, '__qualname__', owner)} has no default for {name!r}")


def defaults_of(cls: type) -> dict[str, Any]:
    """Field name -> default of every field of dataclass ``cls`` that has one."""
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}
