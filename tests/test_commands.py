"""Plugin commands (the ``register_commands`` hook) and ``model.lora.layers`` ranges."""

from __future__ import annotations

import pytest

from trl_plus import TrlPlusError
from trl_plus.config import LoraSpec, parse_layers
from trl_plus.registry import get_registry
from trl_plus.testing import cli, registered


def _add(parser):
    parser.add_argument("target")
    parser.add_argument("--times", type=int, default=1)


def _run(args):
    print(f"echo {args.target * args.times}")
    return 0


def _fail(args):
    raise TrlPlusError("echo fail: the target must not be empty")


COMMANDS = (("demo echo", "repeat a word", _add, _run), ("demo fail", "always fails", _add, _fail),
            ("solo", "a one-word command", _add, _run))  # fmt: skip


def test_register_commands_adds_subcommands_listed_in_help(capsys):
    with registered(name="demo-plugin", commands=COMMANDS):
        assert set(get_registry().commands) >= {"demo echo", "demo fail", "solo"}
        with pytest.raises(SystemExit):
            cli("--help")
        top = capsys.readouterr().out
        assert "demo" in top and "echo, fail" in top and "solo" in top and "a one-word command" in top
        with pytest.raises(SystemExit):
            cli("demo", "--help")
        assert "repeat a word" in capsys.readouterr().out
        assert cli("demo", "echo", "ab", "--times", "2") == 0
        assert capsys.readouterr().out == "echo abab\n"
        assert cli("solo", "x") == 0
        assert cli("demo", "fail", "x") == 2  # a TrlPlusError is one line, no traceback
        assert capsys.readouterr().err == "error: echo fail: the target must not be empty\n"
        assert cli("plugins") == 0 and "`trl-plus demo echo`" in capsys.readouterr().out
    assert "demo echo" not in get_registry().commands  # unregistered with its plugin


def test_a_command_may_not_take_a_core_or_taken_name():
    registry = get_registry()
    with pytest.raises(TrlPlusError, match="core's `trl-plus train`"):
        registry._register_command("train fast", "", _add, _run, "bad-plugin")
    with registered(name="demo-plugin", commands=COMMANDS[:1]):
        with pytest.raises(TrlPlusError, match="registered twice: by demo-plugin and by other"):
            registry._register_command("demo echo", "", _add, _run, "other")
        with pytest.raises(TrlPlusError, match="registered twice"):
            registry._register_command("demo", "", _add, _run, "other")  # a group of that name exists
    with pytest.raises(TypeError, match="one or two words"):
        registry._register_command("a b c", "", _add, _run, "bad-plugin")


@pytest.mark.parametrize("text, layers", [
    ("19-23,24,25", [19, 20, 21, 22, 23, 24, 25]), ("3", [3]), ([0, "2-3"], [0, 2, 3]), (5, [5]),
    ("1-2, 2-3", [1, 2, 3]),
])  # fmt: skip
def test_lora_layers_take_ranges(text, layers):
    assert parse_layers(text) == layers
    assert LoraSpec(layers=text).layers == layers


@pytest.mark.parametrize("text, message", [("5-3", "runs backwards: write 3-5"), ("a-b", "not a layer number"),
                                           ("1,x", "'x' is not a layer number")])  # fmt: skip
def test_lora_layers_bad_ranges(text, message):
    with pytest.raises(ValueError, match=message):
        LoraSpec(layers=text)
