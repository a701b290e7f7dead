"""Console entry points that work in every install: ``dpfl-server`` and ``dpfl-client``
need click, torch and flwr, which a torch-free edge install (numpy, onnxruntime and Pillow,
then ``pip install --no-deps``) does not have; there they say so and exit 2 instead of
crashing with an ImportError. ``dpfl-sample`` needs none of them."""

from __future__ import annotations

import importlib
import sys

FULL_INSTALL = "pip install -r requirements/constraints.txt -e . (see README.md)"


def run(module: str, prog: str) -> None:
    """Import ``module`` and call its click group ``main``."""
    try:
        main = importlib.import_module(module).main
    except ModuleNotFoundError as exc:
        if not exc.name or exc.name.split(".")[0] == "dpfl":
            raise
        sys.stderr.write(f"{prog}: this install lacks {exc.name!r}: it is a torch-free edge "
                         f"install, which runs only dpfl-sample. For {prog}, install the full "
                         f"dpfl: {FULL_INSTALL}\n")
        raise SystemExit(2) from None
    main()


def server() -> None:
    run("dpfl.server.cli", "dpfl-server")


def client() -> None:
    run("dpfl.client.cli", "dpfl-client")
