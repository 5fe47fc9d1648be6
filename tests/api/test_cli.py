"""``loraplex serve`` settings: flags, LORAPLEX_* env vars, and exit status 2 for bad ones."""

from __future__ import annotations

import pytest

from server.cli import build_parser, main, parse_adapters, resolve_options
from server.config import DEFAULT_MODEL


def options(argv: list[str], environ: dict[str, str] | None = None) -> dict:
    return resolve_options(build_parser().parse_args(["serve", *argv]), environ or {})


def test_defaults_serve_the_embedded_model_on_localhost():
    resolved = options([])
    assert (resolved["model"], resolved["host"], resolved["port"]) == (DEFAULT_MODEL, "127.0.0.1", 8000)
    assert resolved["served_model_name"] is None and resolved["adapters"] == {}
    assert resolved["max_loras"] is None  # EngineConfig's default applies


def test_env_vars_apply_and_flags_win():
    env = {"LORAPLEX_PORT": "9001", "LORAPLEX_MAX_LORAS": "3", "LORAPLEX_SERVED_MODEL_NAME": "m"}
    assert (options([], env)["port"], options([], env)["max_loras"]) == (9001, 3)
    assert options(["--port", "9002"], env)["port"] == 9002
    assert options([], env)["served_model_name"] == "m"


def test_adapters_from_flags_or_env():
    assert options(["--adapter", "a=/x", "--adapter", "b=/y"])["adapters"] == {"a": "/x", "b": "/y"}
    assert options([], {"LORAPLEX_ADAPTER": "a=/x, b=/y"})["adapters"] == {"a": "/x", "b": "/y"}
    assert options(["--adapter", "c=/z"], {"LORAPLEX_ADAPTER": "a=/x"})["adapters"] == {"c": "/z"}


@pytest.mark.parametrize("specs", [["noequals"], ["=/path"], ["name="], ["a=/x", "a=/y"]])
def test_malformed_adapter_specs_are_refused(specs):
    with pytest.raises(ValueError, match="adapter"):
        parse_adapters(specs)


def test_a_bad_env_value_names_the_env_var():
    with pytest.raises(ValueError, match="LORAPLEX_PORT"):
        options([], {"LORAPLEX_PORT": "eighty"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-loras", "0"], "max_loras"),
        (["--dtype", "float64"], "dtype"),
        (["--model", "/no/such/checkpoint"], "/no/such/checkpoint"),
        (["--port", "x"], "--port"),
        (["--adapter", "broken"], "NAME=PATH"),
    ],
)
def test_bad_settings_exit_with_status_2(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_requires_a_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
