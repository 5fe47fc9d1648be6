"""``loraplex serve`` flags and LORAPLEX_* env vars (exit 2 for bad ones), and ``loraplex keys``."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.cli import build_parser, main
from server.config import DEFAULT_MODEL
from server.settings import parse_adapters, resolve_options

REPO_ROOT = Path(__file__).resolve().parents[2]


def options(argv: list[str], environ: dict[str, str] | None = None) -> dict:
    return resolve_options(build_parser().parse_args(["serve", *argv]), environ or {})


def test_defaults_serve_the_embedded_model_on_localhost():
    resolved = options([])
    assert (resolved["model"], resolved["host"], resolved["port"]) == (DEFAULT_MODEL, "127.0.0.1", 8000)
    assert resolved["served_model_name"] is None and resolved["adapters"] == {}
    assert resolved["max_loras"] == 8  # EngineConfig's default, declared on its field


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
    lines = [line.split(maxsplit=4) for line in out.splitlines()]
    assert lines == [
        ["TENANT", "ROLE", "SHA256", "LIMITS", "LABEL"],
        ["acme", "user", ring.entries[0].sha256[:8], "-", "ci bot"],
        ["ops", "admin", ring.entries[1].sha256[:8], "-", "-"],
    ]
    assert key not in out and admin_key not in out and ring.entries[0].sha256 not in out


def test_keys_limits_are_set_at_add_changed_later_and_listed(tmp_path, capsys):
    """Limits given to ``keys add`` land in the tenant's entry; ``keys limits`` changes or removes
    them (``none``), and ``keys list`` shows them on every key of the tenant."""
    from adapters.tenant_limits import TenantLimits
    from adapters.tenants import KeyRing

    keys = ["--keys-file", str(tmp_path / "keys.json")]
    assert main(["keys", "add", "--tenant", "acme", "--rpm", "60", "--max-concurrent", "2", *keys]) == 0
    assert main(["keys", "add", "--tenant", "acme", *keys]) == 0
    assert main(["keys", "add", "--tenant", "solo", *keys]) == 0
    assert KeyRing.load(tmp_path / "keys.json").limits("acme") == TenantLimits(max_concurrent=2, rpm=60)
    capsys.readouterr()
    changes = ["--rpm", "none", "--tpm", "5000", "--weight", "2.5"]
    assert main(["keys", "limits", "--tenant", "acme", *changes, *keys]) == 0
    assert capsys.readouterr().out == "acme  max_concurrent=2,tpm=5000,weight=2.5\n"
    ring = KeyRing.load(tmp_path / "keys.json")
    assert ring.limits("acme") == TenantLimits(max_concurrent=2, tpm=5000, weight=2.5)
    assert ring.limits("solo") == TenantLimits()
    assert main(["keys", "list", *keys]) == 0
    limits = [line.split()[3] for line in capsys.readouterr().out.splitlines()[1:]]
    assert limits == ["max_concurrent=2,tpm=5000,weight=2.5"] * 2 + ["-"]
    for flag in ("--max-concurrent", "--tpm", "--weight"):
        assert main(["keys", "limits", "--tenant", "acme", flag, "none", *keys]) == 0
    assert KeyRing.load(tmp_path / "keys.json").tenant_limits == {}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["keys", "limits", "--tenant", "ghost", "--rpm", "5", "--keys-file", "{file}"], "no key"),
        (["keys", "limits", "--tenant", "acme", "--keys-file", "{file}"], "at least one"),
        (["keys", "add", "--tenant", "acme", "--rpm", "0", "--keys-file", "{file}"], "rpm must be"),
        (["keys", "add", "--tenant", "acme", "--rpm", "ten", "--keys-file", "{file}"], "must be a number"),
        (["keys", "add", "--tenant", "acme", "--weight", "-1", "--keys-file", "{file}"], "weight must be"),
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


@pytest.fixture
def no_model_load(monkeypatch):
    """``loraplex serve`` fails instead of loading a model and serving (a regression must not hang)."""
    import server.engine.engine as engine_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load for a bad setting")

    monkeypatch.setattr(engine_module.Engine, "from_config", no_load)


# ---- config files: TOML without tomllib, unreadable files, value types ----
def test_toml_config_falls_back_to_tomli_without_tomllib(tmp_path, monkeypatch, capsys, no_model_load):
    import tomllib

    toml = tmp_path / "loraplex.toml"
    toml.write_text("max-loras = 16\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10: `import tomllib` fails
    monkeypatch.setitem(sys.modules, "tomli", tomllib)  # the backport has the same API
    assert options(["--config", str(toml)])["max_loras"] == 16
    monkeypatch.setitem(sys.modules, "tomli", None)  # neither: one line, exit 2, no traceback
    assert main(["serve", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "tomli" in err and str(toml) in err


def test_tomli_is_a_dependency_where_tomllib_is_missing():
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.10"
    assert "tomli>=1.1; python_version < '3.11'" in project["dependencies"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.toml", None, "No such file"),
        ("dir.toml", "directory", "Is a directory"),
        ("binary.toml", b"\xff\xfe\x00port", "codec"),
        ("bad.json", '{"port": 80', "Expecting"),
        ("list.json", "[1, 2]", "table/object"),
        ("twice.json", '{"max-loras": 1, "max_loras": 2}', "max-loras is given twice"),
        ("deep.json", "[" * 100_000 + "]" * 100_000, "--config"),
    ],
)
def test_unreadable_config_files_exit_2_with_one_line(
    tmp_path, capsys, no_model_load, name, content, message
):
    path = tmp_path / name
    if content == "directory":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    assert main(["serve", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err and str(path) in err


def config_options(tmp_path, content: str, name: str = "c.toml") -> dict:
    path = tmp_path / name
    path.write_text(content)
    return options(["--config", str(path)])


def test_config_lists_for_multi_valued_settings(tmp_path):
    resolved = config_options(tmp_path, 'adapter-roots = ["/srv/a", "/srv/b"]\nadapter = ["a=/x", "b=/y"]\n')
    assert resolved["adapter_roots"] == "/srv/a,/srv/b"  # as LORAPLEX_ADAPTER_ROOTS=/srv/a,/srv/b
    assert resolved["adapters"] == {"a": "/x", "b": "/y"}
    resolved = config_options(tmp_path, 'adapter-roots = "/srv/a,/srv/b"\nadapter = "a=/x, b=/y"\n')
    assert (resolved["adapter_roots"], resolved["adapters"]) == ("/srv/a,/srv/b", {"a": "/x", "b": "/y"})
    resolved = config_options(tmp_path, '{"adapter-roots": [], "adapter": null}', "c.json")
    assert (resolved["adapter_roots"], resolved["adapters"]) == ("", {})


def test_config_numbers_and_booleans_read_like_the_flag(tmp_path):
    content = "max-loras = 16\nmerge-share = 1\ndrain-timeout = 5\nmax-queue = 0\nhost = '0.0.0.0'\n"
    resolved = config_options(tmp_path, content)
    assert (resolved["max_loras"], resolved["merge_share"], resolved["drain_timeout"]) == (16, 1.0, 5.0)
    assert (resolved["max_queue"], resolved["host"]) == (0, "0.0.0.0")
    assert config_options(tmp_path, '{"port": 9100, "merge-share": 0.95}', "c.json")["merge_share"] == 0.95
    with pytest.raises(ValueError, match="config key max-loras: invalid int value 'true'"):
        config_options(tmp_path, "max-loras = true\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('host = ["a", "b"]', "config key host: expected a single value, got a list"),
        ("port = [8000]", "config key port: expected a single value, got a list"),
        ("[model]\npath = '/m'", "config key model: expected a single value, got a table"),
        ("adapter-roots = [1, 2]", "config key adapter-roots: expected a string or a list of strings"),
        ('adapter-roots = ["/a,b"]', "config key adapter-roots: '/a,b' holds a comma"),
        ("adapter = 5", "config key adapter: expected a table"),
        ("[adapter]\nbot = 1", "config key adapter: expected a table"),
        ("adapter = [1]", "config key adapter: expected a table"),
    ],
)
def test_config_values_of_the_wrong_shape_name_the_key(tmp_path, content, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_options(tmp_path, content)


# ---- ranges of the server settings and --device, checked before the model loads ----
@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        (["--port", "0"], {}, "port must be in [1, 65535], got 0"),
        (["--port", "65536"], {}, "port must be in [1, 65535], got 65536"),
        ([], {"LORAPLEX_PORT": "-1"}, "port must be in [1, 65535], got -1"),
        (["--max-queue", "-1"], {}, "max_queue must be >= 0, got -1"),
        (["--drain-timeout", "-0.5"], {}, "drain_timeout must be a finite number of seconds >= 0"),
        (["--drain-timeout", "nan"], {}, "drain_timeout must be a finite number of seconds >= 0"),
        (["--drain-timeout", "inf"], {}, "drain_timeout must be a finite number of seconds >= 0"),
        (["--device", "cudafoo"], {}, "device must be cpu, cuda or cuda:N, got 'cudafoo'"),
        (["--device", "cuda:"], {}, "device must be cpu, cuda or cuda:N"),
        (["--device", "cuda:x"], {}, "device must be cpu, cuda or cuda:N"),
        (["--device", "gpu"], {}, "device must be cpu, cuda or cuda:N"),
        (["--metrics-auth", "user"], {}, "metrics_auth must be none or admin, got 'user'"),
        (["--metrics-auth", "admin"], {}, "metrics_auth admin needs --keys-file"),
    ],
)
def test_out_of_range_settings_exit_2_before_the_model_loads(
    argv, environ, message, capsys, monkeypatch, no_model_load
):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_the_range_boundaries_are_accepted():
    from server.settings import build_configs

    for argv in (["--port", "1", "--max-queue", "0", "--drain-timeout", "0", "--device", "cpu"],
                 ["--port", "65535", "--device", "cuda"], ["--device", "cuda:12"]):  # fmt: skip
        build_configs(options(argv))


# ---- --help ----
def serve_help() -> dict[str, str]:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = commands.choices["serve"]._actions
    return {a.option_strings[0].removeprefix("--"): a.help for a in actions if a.option_strings}


def test_help_shows_every_effective_default():
    from server.settings import SERVE_OPTIONS, build_configs

    resolved = options([])
    configs = build_configs(resolved)
    helps = serve_help()
    for option in SERVE_OPTIONS:
        value = resolved[option.dest]
        for config in configs:
            value = getattr(config, option.dest, None) if value is None else value
        shown = re.search(r"; default (\S+?)[ )]", helps[option.flag])
        if value in (None, ""):
            assert shown is None and "default )" not in helps[option.flag], option.flag
        else:
            assert shown and shown[1] == str(value), f"--{option.flag}: {helps[option.flag]}"
    assert "default 8)" in helps["max-loras"] and "default 2048)" in helps["max-num-batched-tokens"]
    assert "default 2147483648 (2 GiB))" in helps["max-cpu-adapters-bytes"]


def test_help_says_the_host_tier_counts_adapters_in_slots():
    text = serve_help()["max-cpu-adapters-bytes"]
    assert "not in a slot" not in text and "in slots included" in text


def test_adapter_roots_are_split_on_commas_and_stripped():
    from server.settings import parse_adapter_roots

    assert parse_adapter_roots("/srv/a, /srv/b ,,") == [Path("/srv/a"), Path("/srv/b")]
    assert parse_adapter_roots("~/x") == [Path.home().resolve() / "x"]
    assert parse_adapter_roots("") == []
