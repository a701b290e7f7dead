"""Every command of the three CLIs answers ``--help``, and the defaults and choices it shows
are the ones of the dataclasses and registries that own them (one home per default)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dpfl.client.cli import main as client_main
from dpfl.server.cli import main as server_main
from dpfl.shared.defaults import default_of, defaults_of

SCRIPTS = {"dpfl-server": "dpfl.shared.entry:server", "dpfl-client": "dpfl.shared.entry:client",
           "dpfl-sample": "dpfl.shared.edge.cli:main"}


def commands(group: click.Command, path: tuple[str, ...] = ()):
    """(path, command) of ``group`` and of every command below it."""
    yield path, group
    if isinstance(group, click.Group):
        for name, cmd in group.commands.items():
            yield from commands(cmd, (*path, name))


ALL = [(root, path) for root, main in (("dpfl-server", server_main),
                                       ("dpfl-client", client_main))
       for path, _ in commands(main)]


@pytest.mark.parametrize("root, path", ALL, ids=[" ".join([r, *p]) for r, p in ALL])
def test_every_command_answers_help(root, path):
    main = server_main if root == "dpfl-server" else client_main
    res = CliRunner().invoke(main, [*path, "--help"], prog_name=root)
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"Usage: {' '.join([root, *path])} ")


def test_the_walk_finds_every_command():
    names = {" ".join([r, *p]) for r, p in ALL}
    assert {"dpfl-server pretrain", "dpfl-server run", "dpfl-server experiment",
            "dpfl-client data partition", "dpfl-client train-full", "dpfl-client join"} <= names


def test_edge_sampler_answers_help(capsys):
    from dpfl.shared.edge.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "--solver {ddim,dpmpp2m,unipc}" in capsys.readouterr().out


def option(main: click.Group, path: str, name: str) -> click.Option:
    """The option ``--name`` of command ``path`` (space-separated)."""
    cmd = main
    for part in path.split():
        cmd = cmd.commands[part]
    ctx = click.Context(cmd)
    found = [p for p in cmd.get_params(ctx) if f"--{name}" in p.opts]
    assert len(found) == 1, f"{path} has no option --{name}"
    return found[0]


def test_choices_are_the_registries():
    from dpfl.client.train_full import INITS
    from dpfl.server.experiment import PRESETS as EXPERIMENTS
    from dpfl.server.experiment import SETTINGS
    from dpfl.shared.data.partition import SCHEMES
    from dpfl.shared.federation.config import ACCOUNTANTS
    from dpfl.shared.ldm.lora import PRESETS as LORA
    from dpfl.shared.ldm.models import PRESETS as MODELS
    from dpfl.shared.privacy.accountant import KINDS

    expected = [(client_main, "train", "accountant", sorted(KINDS)),
                (client_main, "train-full", "accountant", sorted(KINDS)),
                (client_main, "join", "accountant", sorted(ACCOUNTANTS)),
                (client_main, "train", "preset", sorted(LORA)),
                (client_main, "train-full", "init", sorted(INITS)),
                (client_main, "data partition", "scheme", sorted(SCHEMES)),
                (server_main, "simulate", "scheme", sorted(SCHEMES)),
                (server_main, "pretrain", "preset", sorted(MODELS)),
                (server_main, "experiment", "preset", sorted(EXPERIMENTS)),
                (server_main, "experiment", "setting", sorted(SETTINGS))]
    for main, path, name, names in expected:
        assert sorted(option(main, path, name).type.choices) == names, f"{path} --{name}"


def test_defaults_are_the_dataclasses():
    from dpfl.client.train import TrainJob
    from dpfl.server.experiment import Experiment
    from dpfl.shared.eval.evaluate import EvalConfig
    from dpfl.shared.federation.config import FedConfig, SiteConfig
    from dpfl.shared.ldm.lora import LoraSpec
    from dpfl.shared.ldm.pretrain import PretrainConfig
    from dpfl.shared.privacy.dpsgd import DPConfig

    dp, lora = defaults_of(DPConfig), defaults_of(LoraSpec)
    # --accountant has no fixed default: an existing ledger keeps its kind (help shows
    # DPConfig's for a new one, test_help_shows_the_registry_and_its_default)
    cases = [("train", "clip", dp["clip"]), ("train", "accountant", None),
             ("train", "physical-batch", dp["max_physical_batch"]),
             ("train", "noise-multiplicity", dp["noise_multiplicity"]),
             ("train", "limit", default_of(TrainJob, "limit")),
             ("train", "rank", lora["rank"]), ("train", "preset", lora["preset"]),
             ("join", "epsilon-budget", default_of(SiteConfig, "epsilon_budget")),
             ("join", "max-physical-batch", default_of(SiteConfig, "max_physical_batch"))]
    for path, name, value in cases:
        assert option(client_main, path, name).default == value, f"{path} --{name}"
    cases = [("pretrain", "unet-steps", default_of(PretrainConfig, "unet_steps")),
             ("evaluate", "per-class", default_of(EvalConfig, "per_class")),
             ("simulate", "run-dir", default_of(FedConfig, "run_dir")),
             ("experiment", "preset", default_of(Experiment, "preset"))]
    for path, name, value in cases:
        assert option(server_main, path, name).default == value, f"{path} --{name}"


def test_help_shows_the_registry_and_its_default():
    from dpfl.shared.privacy.accountant import KINDS
    from dpfl.shared.privacy.dpsgd import DPConfig

    res = CliRunner().invoke(client_main, ["train", "--help"], terminal_width=200)
    line = next(x for x in res.output.splitlines() if "--accountant " in x)
    assert f"[{'|'.join(KINDS)}]" in line
    assert f"{default_of(DPConfig, 'accountant')} for a new one]" in line


def test_train_full_keeps_its_own_step_size_and_physical_batch():
    """train-full departs from DPConfig's defaults on purpose (the whole UNet trains)."""
    assert option(client_main, "train-full", "lr").default == 3e-4
    assert option(client_main, "train-full", "physical-batch").default == 16


def test_default_of_reads_dataclass_fields_and_function_parameters():
    @dataclasses.dataclass
    class Config:
        required: int
        rate: float = 0.5

    def step(x, size=3):
        return x

    assert default_of(Config, "rate") == 0.5 and default_of(step, "size") == 3
    assert defaults_of(Config) == {"rate": 0.5}
    for owner, name in ((Config, "required"), (Config, "rat"), (step, "x"), (step, "sise")):
        with pytest.raises(TypeError, match=repr(name)):
            default_of(owner, name)


def test_importing_the_clis_needs_no_torch():
    """Help of the groups stays fast: torch loads only for a command that needs it."""
    code = ("import sys, dpfl.server.cli, dpfl.client.cli, dpfl.shared.edge.cli\n"
            "heavy = {'torch', 'opacus', 'diffusers', 'peft', 'flwr'} & set(sys.modules)\n"
            "assert not heavy, sorted(heavy)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_installed_console_scripts_answer_help():
    declared = {e.name: e.value for e in entry_points(group="console_scripts")
                if e.name in SCRIPTS}
    assert declared == SCRIPTS
    bin_dir = Path(sys.executable).parent
    if not all((bin_dir / name).exists() for name in SCRIPTS):
        pytest.skip(f"console scripts not installed in {bin_dir} (pip install -e .)")
    for name in SCRIPTS:
        res = subprocess.run([str(bin_dir / name), "--help"], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        assert f"usage: {name}" in res.stdout.lower()


@pytest.mark.parametrize("name", ["server", "client"])
def test_an_edge_install_says_what_its_server_and_client_commands_lack(name):
    """Without click (an edge install), the entry point names what is missing, exit 2."""
    code = ("import sys\nsys.modules['click'] = None\n"
            f"from dpfl.shared.entry import {name}\n{name}()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2, res.stderr
    assert f"dpfl-{name}: this install lacks 'click'" in res.stderr
    assert "Traceback" not in res.stderr
