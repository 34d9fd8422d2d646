"""The CLI explains itself: every option and subcommand has help, bad arguments answer fast, `config show`."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fsae.cli import build_parser, main
from fsae.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _walk(parser: argparse.ArgumentParser, path: str):
    """(command path, action) of every action of ``parser`` and its subcommands, -h excepted."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            helped = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield f"{path} {name}", helped.get(name)
                yield from _walk(sub, f"{path} {name}")
        else:
            yield f"{path} {'/'.join(action.option_strings) or action.dest}", action.help


def test_every_option_and_subcommand_has_help():
    items = list(_walk(build_parser(), "fsae"))
    assert len(items) > 150  # the walk reaches every subcommand (demo ... weights check)
    missing = [name for name, text in items if not (text and text.strip())]
    assert missing == []


def test_description_names_the_stages_in_order():
    text = build_parser().description
    positions = [text.index(f"\n  {stage} ") for stage in ("data", "train", "cam", "eval", "crf", "seg", "report")]
    assert positions == sorted(positions)
    assert "FSAE" in text and "``" not in text  # written for users, not a module docstring


@pytest.mark.parametrize("command", ["cam", "irn", "psa", "seg train", "seg infer"])
def test_set_example_is_not_fsae_enabled_where_it_does_nothing(command):
    parser = build_parser()
    for name in command.split():
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    (text,) = [a.help for a in parser._actions if "--set" in a.option_strings]
    assert "fsae.enabled" not in text


def _fresh(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


@pytest.mark.parametrize("argv", [
    ["train"],  # missing argument (argparse)
    ["train", "configs/synthetic/cam_fsae.yaml", "--set", "trian.epochs=1"],  # a typo in --set
    ["train", "configs/synthetic/no_such.yaml"],
    ["cam", "runs/no_such_run"],
    ["seg", "train", "configs/synthetic/deeplabv2_r18.yaml", "--set", "train.iterations=x"],
    ["eval", "--seeds", "s", "--gt", "g", "--num-classes", "0"],
    ["crf", "--threshold", "bestest"],
])
def test_bad_arguments_answer_without_torch(argv):
    result = _fresh("import sys\nfrom fsae.cli import main\n"
                    "try:\n    code = main(%r)\nexcept SystemExit as exc:\n    code = exc.code\n"
                    "print('torch' in sys.modules, code)" % (argv,))
    assert result.stdout.split() == ["False", "2"], result.stderr
    assert "Traceback" not in result.stderr and "error" in result.stderr


def test_config_show_prints_the_resolved_config(capsys):
    recipe = ROOT / "configs/synthetic/cam_fsae.yaml"
    assert main(["config", "show", str(recipe), "--set", "fsae.tau_fae=0.9", "--set", "train.epochs=3"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(recipe).to_dict()
    expected["fsae"]["tau_fae"], expected["train"]["epochs"] = 0.9, 3
    assert shown == expected
    assert set(shown) == {"name", "data", "model", "optim", "fsae", "train", "infer", "eval"}


def test_config_show_other_stages_and_bad_input(capsys):
    assert main(["config", "show", str(ROOT / "configs/synthetic/irn.yaml"), "--kind", "irn"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert set(shown) >= {"ir_label", "train"}
    assert main(["config", "show", str(ROOT / "configs/synthetic/cam_fsae.yaml"), "--set", "fsae.tau_fae=2"]) == 2
    assert "fsae.tau_fae" in capsys.readouterr().err
