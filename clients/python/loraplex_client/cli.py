"""``loraplex-client``: the client's operations from a shell, for people and scripts.

Exit codes: 0 done; 1 the server refused or failed (its message on stderr) or could not be reached;
2 a usage error (bad arguments, an upload directory that is not a peft adapter). ``--json`` prints
the response body (a JSON array for ``list`` and ``models``) for tools like ``jq``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pydantic import BaseModel

from loraplex_client._base import API_KEY_ENV, BASE_URL_ENV, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT_S
from loraplex_client.client import Client
from loraplex_client.errors import LoraplexError
from loraplex_client.types import Adapter

PROG = "loraplex-client"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
_LIST_COLUMNS = ("id", "version", "rank", "size_bytes", "tier", "pinned")


# ---- output ----
def _print_json(value: BaseModel | list[BaseModel]) -> None:
    if isinstance(value, list):
        print(json.dumps([item.model_dump(mode="json") for item in value], indent=2))
    else:
        print(value.model_dump_json(indent=2))


def _show(args: argparse.Namespace, value: BaseModel | list[BaseModel], as_text: Callable[[], None]) -> None:
    """``--json``: the body as JSON; else the human form ``as_text`` prints."""
    if args.json:
        _print_json(value)
    else:
        as_text()


def _print_adapter(adapter: Adapter) -> None:
    for key, value in adapter.model_dump(mode="json").items():
        print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


def _print_table(adapters: list[Adapter]) -> None:
    rows = [_LIST_COLUMNS] + [tuple(str(getattr(a, c)) for c in _LIST_COLUMNS) for a in adapters]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_LIST_COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


# ---- commands ----
def _models(client: Client, args: argparse.Namespace) -> None:
    models = client.models()
    _show(args, models, lambda: print("\n".join(model.id for model in models)))


def _list(client: Client, args: argparse.Namespace) -> None:
    adapters = client.list_adapters(args.tenant)
    _show(args, adapters, lambda: _print_table(adapters))


def _get(client: Client, args: argparse.Namespace) -> None:
    adapter = client.get_adapter(args.name, tenant=args.tenant)
    _show(args, adapter, lambda: _print_adapter(adapter))


def _upload(client: Client, args: argparse.Namespace) -> None:
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    adapter = client.upload(args.name, args.directory, tenant=args.tenant, progress=progress)
    summary = (f"uploaded {adapter.id} version {adapter.version} ({adapter.size_bytes} bytes, "
               f"rank {adapter.rank}, sha256 {adapter.sha256[:12]})")  # fmt: skip
    _show(args, adapter, lambda: print(summary))


def _delete(client: Client, args: argparse.Namespace) -> None:
    deleted = client.delete_adapter(args.name, tenant=args.tenant)
    summary = f"deleted {deleted.id} (versions {', '.join(map(str, deleted.versions))})"
    _show(args, deleted, lambda: print(summary))


def _admin_action(action: str) -> Callable[[Client, argparse.Namespace], None]:
    def run(client: Client, args: argparse.Namespace) -> None:
        adapter = getattr(client, action)(args.name, tenant=args.tenant)
        _show(args, adapter, lambda: print(f"{adapter.id}: pinned={adapter.pinned} tier={adapter.tier}"))

    return run


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    fields = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    sampling = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    return {**sampling, "ignore_eos": True} if args.ignore_eos else sampling


def _complete(client: Client, args: argparse.Namespace) -> None:
    if args.stream:
        chunks = client.completions(args.model, args.prompt, stream=True, **_sampling(args))
        _write_stream(chunk.text for chunk in chunks)
        return
    completion = client.completions(args.model, args.prompt, **_sampling(args))
    _show(args, completion, lambda: print(completion.text))


def _chat(client: Client, args: argparse.Namespace) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.message})
    if args.stream:
        chunks = client.chat(args.model, messages, stream=True, **_sampling(args))
        _write_stream(chunk.content for chunk in chunks)
        return
    answer = client.chat(args.model, messages, **_sampling(args))
    _show(args, answer, lambda: print(answer.content))


def _write_stream(pieces: Iterable[str]) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


# ---- parser ----
def _add_connection_options(parser: argparse.ArgumentParser, *, is_subcommand: bool) -> None:
    """Connection flags, accepted before and after the command (``default`` only on the top level,
    so that a subcommand does not overwrite a value given before it)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if is_subcommand else value

    url_help = f"server URL (env {BASE_URL_ENV}; default http://127.0.0.1:8000)"
    parser.add_argument("--base-url", default=default(None), help=url_help)
    parser.add_argument("--api-key", default=default(None), help=f"API key (env {API_KEY_ENV})")
    timeout_help = f"seconds per request (default {DEFAULT_TIMEOUT_S:g})"
    parser.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT_S), help=timeout_help)
    retries_help = f"retries on 429/503 and failed connects (default {DEFAULT_MAX_RETRIES})"
    parser.add_argument(
        "--max-retries", type=_non_negative_int, default=default(DEFAULT_MAX_RETRIES), help=retries_help
    )


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the base model or an adapter name")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="a stop string; repeatable")
    parser.add_argument("--ignore-eos", action="store_true", help="generate max_tokens whatever comes")
    parser.add_argument("--stream", action="store_true", help="print the text as it arrives")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Client for a loraplex server.")
    _add_connection_options(parser, is_subcommand=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str, *, name_arg: bool = False, tenant: bool = True):
        sub = commands.add_parser(name, help=help, description=help)
        _add_connection_options(sub, is_subcommand=True)
        if name_arg:
            sub.add_argument("name", help="the adapter's name")
        if tenant:
            sub.add_argument("--tenant", help="act in another tenant (admin keys)")
        sub.add_argument("--json", action="store_true", help="print the response body as JSON")
        sub.set_defaults(func=func)
        return sub

    command("models", _models, "list the models this key may use", tenant=False)
    command("list", _list, "list adapters")
    command("get", _get, "show one adapter", name_arg=True)
    upload = command("upload", _upload, "upload a peft adapter directory", name_arg=True)
    upload.add_argument("directory", help="holds adapter_config.json and adapter_model.safetensors")
    upload.add_argument("--progress", action=argparse.BooleanOptionalAction,
                        help="a progress bar on stderr (default: when stderr is a terminal)")  # fmt: skip
    command("delete", _delete, "delete every version of an adapter", name_arg=True)
    for action in ("pin", "unpin", "merge", "unmerge"):
        command(action, _admin_action(action), f"{action} an adapter (admin keys)", name_arg=True)
    complete = command("complete", _complete, "complete a prompt and print the text", tenant=False)
    complete.add_argument("prompt")
    _add_sampling_options(complete)
    chat = command("chat", _chat, "send one user message and print the answer", tenant=False)
    chat.add_argument("message")
    chat.add_argument("--system", help="a system message sent before the user message")
    _add_sampling_options(chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        client = Client(args.base_url, args.api_key, timeout=args.timeout, max_retries=args.max_retries)
        with client:
            args.func(client, args)
    except LoraplexError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except FileNotFoundError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
