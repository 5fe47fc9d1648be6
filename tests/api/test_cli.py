"""``loraplex serve`` flags and LORAPLEX_* env vars (exit 2 for bad ones), and ``loraplex keys``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, main, parse_adapters, resolve_options
from server.config import DEFAULT_MODEL

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def test_config_file_keys_apply_and_env_and_flags_win(tmp_path):
    toml = tmp_path / "loraplex.toml"
    toml.write_text('max-loras = 16\nmax_queue = 5\ndata-dir = "/srv/data"\n[adapter]\nbot = "/a/bot"\n')
    resolved = options(["--config", str(toml)])
    assert (resolved["max_loras"], resolved["max_queue"], resolved["data_dir"]) == (16, 5, Path("/srv/data"))
    assert resolved["adapters"] == {"bot": "/a/bot"}
    assert options(["--config", str(toml)], {"LORAPLEX_MAX_LORAS": "4"})["max_loras"] == 4
    assert options(["--config", str(toml), "--max-loras", "2"])["max_loras"] == 2
    as_json = tmp_path / "loraplex.json"
    as_json.write_text('{"port": 9100}')
    assert options([], {"LORAPLEX_CONFIG": str(as_json)})["port"] == 9100


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("max-lora = 16", "unknown keys max-lora"),
        ("port = ", "--config"),
        ('port = "eighty"', "config key port"),
    ],
)
def test_bad_config_files_are_refused_with_the_key(tmp_path, content, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(content)
    with pytest.raises(ValueError, match=message):
        options(["--config", str(toml)])


def test_a_bad_env_value_names_the_env_var():
    with pytest.raises(ValueError, match="LORAPLEX_PORT"):
        options([], {"LORAPLEX_PORT": "eighty"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-loras", "0"], "max_loras"),
        (["--merge-policy", "sometimes"], "merge_policy"),
        (["--merge-share", "0.1"], "unmerge_share"),
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


def test_keys_add_prints_only_the_key_and_list_shows_hashes(tmp_path, capsys, monkeypatch):
    from adapters.tenants import KeyRing, Principal

    keys_file = tmp_path / "keys.json"
    assert main(["keys", "add", "--tenant", "acme", "--keys-file", str(keys_file), "--label", "ci bot"]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert out == key + "\n" and key.startswith("lpx-")
    assert str(keys_file) in err and "once" in err and key not in err
    monkeypatch.setenv("LORAPLEX_KEYS_FILE", str(keys_file))
    assert main(["keys", "add", "--tenant", "ops", "--role", "admin"]) == 0
    admin_key = capsys.readouterr().out.strip()
    ring = KeyRing.load(keys_file)
    assert ring.authenticate(key) == Principal("acme", "user")
    assert ring.authenticate(admin_key) == Principal("ops", "admin")
    assert main(["keys", "list"]) == 0
    out = capsys.readouterr().out
    lines = [line.split(maxsplit=3) for line in out.splitlines()]
    assert lines == [
        ["TENANT", "ROLE", "SHA256", "LABEL"],
        ["acme", "user", ring.entries[0].sha256[:8], "ci bot"],
        ["ops", "admin", ring.entries[1].sha256[:8], "-"],
    ]
    assert key not in out and admin_key not in out and ring.entries[0].sha256 not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "add", "--tenant", "acme"], "LORAPLEX_KEYS_FILE"),
        (["keys", "list"], "--keys-file"),
        (["keys", "add", "--tenant", "a/b", "--keys-file", "{file}"], "tenant 'a/b'"),
        (["keys", "add", "--tenant", "acme", "--role", "root", "--keys-file", "{file}"], "role"),
        (["keys", "list", "--keys-file", "{file}"], "cannot be read"),
        (["keys", "add", "--tenant", "acme", "--keys-file", "{dir}/no/such/dir/keys.json"], "No such file"),
    ],
)
def test_bad_keys_settings_exit_with_status_2_and_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LORAPLEX_KEYS_FILE", raising=False)
    argv = [arg.format(file=tmp_path / "keys.json", dir=tmp_path) for arg in argv]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "keys.json").exists()


def test_keys_requires_an_action():
    with pytest.raises(SystemExit) as exit_info:
        main(["keys"])
    assert exit_info.value.code == 2


def test_keys_add_output_can_be_captured_by_a_shell(tmp_path):
    keys_file = tmp_path / "keys.json"
    command = [
        sys.executable,
        "-m",
        "server.cli",
        "keys",
        "add",
        "--tenant",
        "acme",
        "--keys-file",
        str(keys_file),
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    key = done.stdout.removesuffix("\n")
    assert key.startswith("lpx-") and "\n" not in key
    assert key.encode() not in keys_file.read_bytes()
