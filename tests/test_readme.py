"""The README documents every command and option the CLI has."""

from pathlib import Path

from mlxbatch.cli import cli

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_every_command_is_documented():
    for name in cli.commands:
        assert f"`mlxbatch {name} " in README, name


def test_every_process_option_is_documented():
    missing = []
    for param in cli.commands["process"].params:
        flags = [o for o in param.opts if o.startswith("--")]
        if flags and not any(f in README for f in flags):
            missing.append(flags[0])
    assert missing == []


def test_quick_start_commands():
    assert "make demo" in README and "make test" in README
