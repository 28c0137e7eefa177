"""Config dataclasses -> options: help from docstrings, env overrides, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import pytest

from services.common.config import ConfigError, build_parser, field_docs, parse_config


@dataclass(frozen=True)
class DemoConfig:
    """A demo component."""

    port: int = 8000
    """Port to listen on."""
    ratio: float = 0.5
    """A fraction of something."""
    name: str = "demo"
    """The demo's name."""
    verbose: bool = False
    """Talk a lot."""
    backend: Literal["auto", "ref"] = "auto"
    """Which backend."""
    peers: tuple[str, ...] = ()
    """Peer addresses."""
    limit: int | None = None
    """An optional limit."""

    def __post_init__(self) -> None:
        if self.port <= 0:
            raise ValueError(f"--port must be positive, got {self.port}")


def test_field_docs_become_help() -> None:
    docs = field_docs(DemoConfig)
    assert docs["port"] == "Port to listen on."
    help_text = build_parser(DemoConfig, "demo").format_help()
    for doc in ("Port to listen on.", "A fraction of something.", "Talk a lot.", "Peer addresses."):
        assert doc in " ".join(help_text.split())
    assert "TANDEM_PORT" in help_text


def test_defaults_env_and_cli_priority() -> None:
    assert parse_config(DemoConfig, [], "demo", env={}) == DemoConfig()
    env = {"TANDEM_PORT": "9000", "TANDEM_VERBOSE": "true", "TANDEM_PEERS": "a:1, b:2", "TANDEM_LIMIT": "7"}
    config = parse_config(DemoConfig, [], "demo", env=env)
    assert (config.port, config.verbose, config.peers, config.limit) == (9000, True, ("a:1", "b:2"), 7)
    # The command line beats the environment.
    config = parse_config(DemoConfig, ["--port", "9100", "--no-verbose", "--peers", "c:3"], "demo", env=env)
    assert (config.port, config.verbose, config.peers) == (9100, False, ("c:3",))


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--port", "abc"], {}, "--port"),
        (["--ratio", "x"], {}, "--ratio"),
        (["--backend", "gpu"], {}, "--backend"),
        ([], {"TANDEM_PORT": "abc"}, "TANDEM_PORT"),
        ([], {"TANDEM_VERBOSE": "maybe"}, "TANDEM_VERBOSE"),
        (["--port", "-1"], {}, "--port must be positive"),
    ],
)
def test_bad_value_is_one_line_naming_the_option(
    argv: list[str], env: dict[str, str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        parse_config(DemoConfig, argv, "demo", env=env)
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert needle in err


def test_config_error_type() -> None:
    from services.common.config import convert

    with pytest.raises(ConfigError, match="--x: invalid int value 'q'"):
        convert("q", int, "--x")


def test_cli_help_and_version() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tandem", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("tandem ")
    out = subprocess.run(
        [sys.executable, "-m", "tandem", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("up", "gateway", "styler", "worker"):
        assert command in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "tandem", "up", "--help"], capture_output=True, text=True, check=True
    )
    assert "Hugging Face model directory" in out.stdout and "--workers" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "tandem", "up", "--workers", "many"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--workers" in bad.stderr and bad.stderr.count("\n") == 1
