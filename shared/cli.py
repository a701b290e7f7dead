"""What the click command lines ``dpfl-server`` and ``dpfl-client`` share.

Options take their defaults from the configuration dataclasses
(:func:`dpfl.shared.defaults.default_of`) and their choices from the registries
(``KINDS``, ``PRESETS``...). Where those live in torch modules, the command is a
:class:`LazyCommand`: its options are made on first use, so ``--help`` of the group and
the commands that need no torch start in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import click

CTX = {"show_default": True, "help_option_names": ["-h", "--help"]}


def fail(exc: Exception) -> NoReturn:
    """Report a :class:`~dpfl.shared.errors.DpflError` as a one-line click error."""
    raise click.ClickException(str(exc)) from exc


class LazyCommand(click.Command):
    """A command whose options ``options()`` makes when they are first needed (its help,
    its parsing): their defaults and choices are read from modules that import torch.

    Options made here come before those given by decorators (e.g. a model argument).
    """

    def __init__(self, *args: Any, options: Callable[[], list[click.Parameter]],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._make_options: Callable[[], list[click.Parameter]] | None = options

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if self._make_options is not None:
            self.params = [*self._make_options(), *self.params]
            self._make_options = None
        return super().get_params(ctx)
