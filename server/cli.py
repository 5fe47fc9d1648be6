"""The ``loraplex`` command.

``loraplex serve`` loads the base model (the embedded SmolLM2-135M-Instruct unless ``--model``
names another), preloads the ``--adapter NAME=PATH`` peft directories, and serves the OpenAI
API with uvicorn on 127.0.0.1:8000. Every flag can also come from ``LORAPLEX_<FLAG>`` (e.g.
``LORAPLEX_MAX_LORAS=16``; ``LORAPLEX_ADAPTER=a=/x,b=/y`` for several adapters) or a ``--config``
file; a flag given on the command line wins (``server/settings.py`` resolves them into the frozen
configs of ``server/config.py``). Bad settings print one line and exit with status 2: a value that
does not convert, a config file that cannot be read, or a value out of its range (checked before
the model loads).

``loraplex keys add|limits|list`` manage the keys file and its tenants' limits (``server/keys_cli.py``).

``loraplex demo-adapters --out DIR`` trains small demo adapters (see ``server/demo_adapters.py``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from adapters.errors import StoreUnavailableError
from server.config import EngineConfig, ModelConfig, ServerConfig
from server.demo_adapters import add_demo_adapters_parser
from server.keys_cli import USAGE_ERROR, add_keys_parser
from server.settings import (
    EXTRA_FLAGS,
    SERVE_OPTIONS,
    build_configs,
    default_data_dir,
    human,
    parse_adapter_roots,
    range_help,
    resolve_options,
    settings_echo,
)

log = logging.getLogger("loraplex")


def build_parser() -> argparse.ArgumentParser:
    """The ``loraplex`` parser; the serve flags and their help come from ``server.settings``."""
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-LoRA inference server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API")
    add_serve_flags(serve)
    serve.set_defaults(func=serve_command)
    serve_ray = commands.add_parser(
        "serve-ray",
        help="serve the same API as replicas on Ray Serve, each adapter routed to the replica holding it",
    )
    add_serve_flags(serve_ray)
    add_ray_flags(serve_ray)
    serve_ray.set_defaults(func=serve_ray_command)
    add_keys_parser(commands)
    add_demo_adapters_parser(commands)
    return parser


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """Every ``loraplex serve`` flag (declared in ``server/config.py``), with its help."""
    for option in SERVE_OPTIONS:
        notes = [range_help(option.setting.range), f"env {option.env}"]
        notes += [] if option.default in (None, "") else [f"default {human(option.default)}"]
        parser.add_argument(f"--{option.flag}", help=_help(option.help, notes))
    for extra in EXTRA_FLAGS:
        parser.add_argument(f"--{extra.flag}", action="append" if extra.is_repeatable else None,
                            metavar=extra.metavar, help=_help(extra.help, [f"env {extra.env}"]))  # fmt: skip


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """``serve-ray``'s own flags (``server/ray_serve.py``'s ``RayOptions``)."""
    from server.ray_options import RAY_FLAGS  # no ray import: the options are plain data

    for flag, (default, meaning) in RAY_FLAGS.items():
        note = "" if default is None else f" (default {default})"
        parser.add_argument(f"--{flag}", help=f"{meaning}{note}".replace("%", "%%"))


def _help(text: str, notes: list[str]) -> str:
    """``text (note; note)`` with argparse's ``%`` escaped."""
    return f"{text} ({'; '.join(note for note in notes if note)})".replace("%", "%%")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``loraplex`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.func(args)


def serve_command(args: argparse.Namespace) -> int:
    """Load everything, serve until interrupted, shut the engine down; 2 for a bad setting."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app, engine, server_config = start_app(resolve_options(args, dict(os.environ)))
    except ValueError as exc:
        print(f"loraplex serve: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except StoreUnavailableError as exc:  # the shared adapter store's database or bucket is down
        print(f"loraplex serve: error: {exc}", file=sys.stderr)
        return 1
    try:
        return _run_server(app, server_config)
    finally:
        engine.shutdown()


def serve_ray_command(args: argparse.Namespace) -> int:
    """``loraplex serve-ray``: the settings are checked here, then each replica loads its own engine."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from server.ray_options import RayOptions

        options = resolve_options(args, dict(os.environ))
        check_settings(options)
        ray_options = RayOptions.from_args(args, options)
        ray_options.check_store(options)
        try:
            from server.ray_serve import run
        except ImportError as exc:
            raise ValueError(f"serve-ray needs Ray Serve: pip install 'loraplex[ray]' ({exc})") from None
    except ValueError as exc:
        print(f"loraplex serve-ray: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    return run(options, ray_options)


def check_settings(options: dict[str, object]) -> tuple[ModelConfig, EngineConfig, ServerConfig]:
    """The frozen configs of resolved options; ValueError for a bad or inconsistent setting."""
    model_config, engine_config, server_config = build_configs(options)
    if server_config.metrics_auth == "admin" and options["keys_file"] is None:
        raise ValueError("metrics_auth admin needs --keys-file: without keys there is no admin key")
    return model_config, engine_config, server_config


def start_app(options: dict[str, object]):
    """(app, engine, server config) for resolved options: the model loaded, the adapter registry
    open, the FastAPI app built. ValueError for a bad setting, StoreUnavailableError when a shared
    adapter store cannot be reached; the caller shuts the engine down."""
    model_config, engine_config, server_config = check_settings(options)
    engine, served_name, registry, keyring = _start_engine(options, model_config, engine_config)
    from server.api.app import create_app

    echo = settings_echo(model_config, engine_config, server_config, options)
    compositions = None
    if registry is not None:
        from adapters.compositions import Compositions

        compositions = Compositions(registry, _data_dir(options) / "compositions")
    app = create_app(engine, served_name, registry, keyring, max_queue=server_config.max_queue,
                     metrics_auth=server_config.metrics_auth, request_timeout=server_config.request_timeout,
                     settings=echo, compositions=compositions)  # fmt: skip
    if keyring is None:
        host = server_config.host
        remote = "" if host in ("127.0.0.1", "localhost", "::1") else f" ({host} is not a loopback address)"
        log.warning("serving %r single-tenant WITHOUT authentication: anyone who can reach the server can "
                    "use it%s", served_name, remote)  # fmt: skip
    else:
        log.info("serving %r with %d API keys", served_name, len(keyring))
    return app, engine, server_config


def _data_dir(options: dict[str, object]) -> Path:
    return Path(options["data_dir"] or default_data_dir(dict(os.environ))).expanduser()


def _open_registry(engine, options: dict[str, object]):
    """The adapter registry on --data-dir, attached to the engine, with --adapter dirs registered."""
    from adapters.store import SQLiteAdapterStore

    adapters: dict[str, str] = options["adapters"]
    roots = parse_adapter_roots(str(options["adapter_roots"]))
    roots += [Path(p).expanduser().resolve().parent for p in adapters.values()]  # named by the operator
    data_dir = _data_dir(options)
    store_url, blobs_url = options["adapter_store"], options["adapter_blobs"]
    if store_url is None and blobs_url is None:
        store = SQLiteAdapterStore(data_dir, allowed_roots=roots)
        where = str(data_dir)
    else:
        from adapters.shared_store import open_shared_store
        from adapters.urls import redact

        if store_url is None or blobs_url is None:
            raise ValueError("--adapter-store and --adapter-blobs go together: a shared catalogue needs both")
        store = open_shared_store(str(store_url), str(blobs_url), data_dir, allowed_roots=roots)
        where = f"{redact(str(store_url))} + {blobs_url} (local copies in {data_dir})"
    registry = engine.open_registry(store)
    log.info("adapter store %s: %d adapters", where, len(registry))
    for name, path in adapters.items():
        _register_cli_adapter(registry, name, path)
    return registry


def _register_cli_adapter(registry, spec_name: str, path: str) -> None:
    """``--adapter [TENANT/]NAME=PATH``: served in place; a restart with the same files adds no version."""
    from adapters.errors import UnknownAdapterError
    from adapters.store import file_sha256

    tenant, _, name = spec_name.rpartition("/")
    tenant = tenant or "default"
    directory = Path(path).expanduser().resolve()
    try:
        current = registry.resolve(tenant, name)
        same_files = current.sha256 == file_sha256(directory / "adapter_model.safetensors")
        if current.path == directory and same_files:
            log.info("adapter %s/%s v%d already registered from %s", tenant, name, current.version, directory)
            return
    except (UnknownAdapterError, OSError):
        pass
    try:
        record = registry.register_local(tenant, name, directory)
    except (OSError, ValueError) as exc:
        raise ValueError(f"adapter {spec_name!r} from {path}: {exc}") from exc
    log.info("registered adapter %s/%s v%d from %s", tenant, name, record.version, directory)


def _start_engine(options: dict[str, object], model_config: ModelConfig, engine_config: EngineConfig):
    """Load the model and preload adapters; ValueError for a bad setting."""
    from server.engine.engine import Engine  # heavy imports only once the flags parse

    served_name = options["served_model_name"] or options["model"]
    adapters: dict[str, str] = options["adapters"]
    if served_name in adapters:
        raise ValueError(f"--adapter name {served_name!r} is the base model's served name")
    keyring = None
    if options["keys_file"] is not None:
        from adapters.tenants import KeyRing

        keyring = KeyRing.load(options["keys_file"])
    engine = Engine.from_config(model_config, engine_config)
    try:
        registry = _open_registry(engine, options)
    except BaseException:
        engine.shutdown()
        raise
    return engine, served_name, registry, keyring


def _run_server(app, server_config: ServerConfig) -> int:
    import uvicorn

    from server.api.connections import guarded_protocol
    from server.api.shutdown import DrainingServer

    host, port = server_config.host, server_config.port
    log.info("listening on http://%s:%s", host, port)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
        http=guarded_protocol(server_config.request_timeout, server_config.max_connections),
    )  # fmt: skip
    DrainingServer(config, app.state.loraplex, server_config.drain_timeout).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
