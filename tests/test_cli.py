"""The CLI layer: flags derived from dataclasses, --set overrides, exit codes."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from minimind_v import cli
from minimind_v.errors import UserError
from minimind_v.model.config import VLMConfig
from minimind_v.options import add_dataclass_args, apply_overrides, dataclass_from_args, field_docs


@dataclass
class _Opts:
    data: str
    """Path to the data."""
    from_: str = "none"
    """Where to start from."""
    stage: Literal["lm", "sft"] = "sft"
    """Which stage."""
    image: list[str] = field(default_factory=list)
    """An image; repeat the flag for more."""
    corpus: list[str] = field(default_factory=list, metadata={"nargs": "+"})
    """Corpus files."""
    greedy: bool = False
    """Greedy decoding."""
    lr: float | None = None
    """Learning rate."""


def _parse(argv: list[str]) -> _Opts:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, _Opts)
    return dataclass_from_args(_Opts, parser.parse_args(argv))


def test_flags_follow_the_dataclass():
    opts = _parse(["--data", "d", "--from", "x.pth", "--stage", "lm", "--image", "a", "--image", "b",
                   "--corpus", "c1", "c2", "--greedy", "--lr", "3e-4"])
    assert opts == _Opts(data="d", from_="x.pth", stage="lm", image=["a", "b"], corpus=["c1", "c2"],
                         greedy=True, lr=3e-4)
    assert _parse(["--data", "d"]).image == []


def test_field_docstrings_become_help():
    assert field_docs(_Opts)["from_"] == "Where to start from."
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, _Opts)
    assert "An image; repeat the flag for more." in parser.format_help()


def test_bad_choice_and_missing_required_flag_are_usage_errors():
    with pytest.raises(SystemExit):
        _parse(["--data", "d", "--stage", "nope"])
    with pytest.raises(SystemExit):
        _parse([])


def test_set_overrides_nested_fields_with_types_checked():
    cfg = apply_overrides(VLMConfig(), ["lm.hidden_size=256", "projector=mlp", "lm.rope_theta=10000"])
    assert cfg.lm.hidden_size == 256 and cfg.projector == "mlp" and cfg.lm.rope_theta == 10000.0
    assert VLMConfig().lm.hidden_size == 512  # the default object is untouched
    for bad in ["lm.hidden=3", "projector=conv", "lm.hidden_size=big", "lm.hidden_size"]:
        with pytest.raises(UserError, match="--set"):
            apply_overrides(VLMConfig(), [bad])


def test_config_round_trip_is_strict():
    cfg = apply_overrides(VLMConfig(), ["lm.use_moe=true"])
    assert VLMConfig.from_dict(cfg.to_dict()) == cfg
    data = cfg.to_dict()
    data["lm"]["hiddn_size"] = 3
    with pytest.raises(ValueError, match="lm.hiddn_size"):
        VLMConfig.from_dict(data)


def test_unknown_command_exits_2_and_help_exits_0(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "convert import-upstream", "quickstart"):
        assert name in out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_help(name, capsys):
    assert cli.main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert f"usage: minimind-v {name}" in out
    assert "--" in out.split("options:", 1)[1]


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "minimind_v.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "quickstart" in result.stdout


@pytest.mark.parametrize("argv", [["convert"], ["convert", "--help"], ["convert", "-h"]])
def test_a_command_group_lists_its_commands(argv, capsys):
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: minimind-v convert <command>")
    for name in ("convert import-upstream", "convert export-hf", "convert import-hf"):
        assert name in out
    assert "quickstart" not in out


def test_an_unknown_command_of_a_group_is_named(capsys):
    assert cli.main(["convert", "export-gguf"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'convert export-gguf'") and "convert import-hf" in err


def test_preset_help_names_the_presets(capsys):
    from minimind_v.presets import PRESETS

    assert cli.main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "SPEC" not in out and all(name in out for name in PRESETS)
