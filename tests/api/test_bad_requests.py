"""A table of bad requests against a real ``loraplex serve`` process with API keys and an adapter store.

Every refusal must be an OpenAI-shaped JSON error (exactly ``{"error": {"message", "type", "param",
"code"}}``) with the right status, code and a message that says what was wrong; and no bad request
may hurt the server: after the table it is healthy and serves a normal completion.

Tenants: ``acme`` and ``globex`` (user keys) and an ``ops`` admin; acme uploaded the adapter ``bot``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from adapters.tenants import add_key
from tests.api.conftest import BASE_MODEL, MAX_MODEL_LEN
from tests.api.server_process import ServerProcess as Server
from tests.api.server_process import running_server
from tests.engine.test_engine_parity import save_peft_adapter
from tests.engine.tiny import write_tiny_llama

ADAPTER = "bot"  # uploaded by acme
VOCAB_SIZE = 260  # tests/engine/tiny.py
MAX_BODY_BYTES = 16 * 1024**2  # server.api.limits.DEFAULT_MAX_BODY_BYTES
ERROR_KEYS = {"message", "type", "param", "code"}
UNCHECKED = object()  # Bad.param: not checked
DROP = object()  # a field value that removes the field from the body
REAL_ADAPTER_FILES = "real adapter files"  # Bad.files: acme's valid adapter_config.json + safetensors


@dataclass(frozen=True)
class Bad:
    """One bad request and the error it must get back."""

    method: str
    path: str
    status: int
    fragment: str  # must appear in error.message
    code: str | None = None  # error.code
    param: object = UNCHECKED  # error.param, unless UNCHECKED
    error_type: str = "invalid_request_error"
    who: str | None = "acme"  # whose key is sent: acme, globex, admin, forged; None: no Authorization
    json: object = DROP  # a JSON body, unless DROP
    content: bytes | Callable[[], bytes] | None = None  # a raw body (a callable: built when sent)
    content_type: str | None = "application/json"  # for ``content``; None: no Content-Type header
    form: tuple[tuple[str, str], ...] = ()  # multipart fields
    files: tuple[tuple[str, bytes], ...] | str | None = None  # multipart ``files`` parts


def _body(defaults: dict, fields: dict) -> dict:
    merged = {**defaults, **fields}
    return {key: value for key, value in merged.items() if value is not DROP}


def completion(status: int, fragment: str, *, code: str | None = None, param: object = UNCHECKED,
               who: str | None = "acme", **fields: object) -> Bad:  # fmt: skip
    """A /v1/completions request: a valid body with ``fields`` changed (DROP removes one)."""
    body = _body({"model": BASE_MODEL, "prompt": "Hello", "max_tokens": 4}, fields)
    return Bad("POST", "/v1/completions", status, fragment, code=code, param=param, who=who, json=body)


def chat(status: int, fragment: str, *, code: str | None = None, param: object = UNCHECKED,
         who: str | None = "acme", **fields: object) -> Bad:  # fmt: skip
    """A /v1/chat/completions request: a valid body with ``fields`` changed (DROP removes one)."""
    defaults = {"model": BASE_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    body = _body(defaults, fields)
    return Bad("POST", "/v1/chat/completions", status, fragment, code=code, param=param, who=who, json=body)


def raw(content: bytes | Callable[[], bytes], status: int, fragment: str, *,
        content_type: str | None = "application/json", code: str | None = None) -> Bad:  # fmt: skip
    """A /v1/completions request with a raw body."""
    return Bad(
        "POST", "/v1/completions", status, fragment, code=code, content=content, content_type=content_type
    )


def _huge_body() -> bytes:
    """A valid completion body just over the JSON body limit."""
    return b'{"model": "tiny", "prompt": "' + b"a" * (MAX_BODY_BYTES + 1024) + b'"}'


def upload(status: int, fragment: str, files: tuple | str | None, *, code: str | None = None,
           param: object = UNCHECKED, who: str = "acme", **form: str) -> Bad:  # fmt: skip
    """A multipart POST /v1/adapters of ``files`` (REAL_ADAPTER_FILES: acme's valid ones) as ``name``."""
    return Bad("POST", "/v1/adapters", status, fragment, code=code, param=param, who=who,
               form=tuple({"name": "new", **form}.items()), files=files)  # fmt: skip


NOT_FOUND = "model_not_found"
DENIED = "permission_denied"
BAD_KEY = "invalid_api_key"
TOO_LONG_PROMPT = [65] * (MAX_MODEL_LEN - 8)
LONG_PATH_COMPONENT = "a" * 300  # over NAME_MAX (255): stat() fails with ENAMETOOLONG
TOOL_F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
CASES = {
    # ---- wrong types for the main fields ----
    "model not a string": completion(400, "valid string", param="model", model=5),
    "prompt an object": completion(400, "prompt must be a string", param="prompt", prompt={"text": "x"}),
    "prompt a number": completion(400, "prompt must be a string", param="prompt", prompt=42),
    "prompt mixes ids and text": completion(400, "prompt must be a string", param="prompt", prompt=[1, "a"]),
    "prompt of booleans": completion(400, "prompt must be a string", param="prompt", prompt=[True]),
    "prompt missing": completion(400, "required", param="prompt", prompt=DROP),
    "max_tokens a string": completion(400, "valid integer", param="max_tokens", max_tokens="16"),
    "max_tokens a float": completion(400, "valid integer", param="max_tokens", max_tokens=1.5),
    "temperature a string": completion(400, "valid number", param="temperature", temperature="hot"),
    "top_p a string": completion(400, "valid number", param="top_p", top_p="high"),
    "n a string": completion(400, "valid integer", param="n", n="1"),
    "stream a string": completion(400, "valid boolean", param="stream", stream="yes"),
    "stream_options a string": completion(400, "dictionary", param="stream_options", stream_options="x"),
    "stop a number list": completion(400, "stop must be a string or a list", param="stop", stop=[1]),
    "seed a string": completion(400, "valid integer", param="seed", seed="7"),
    "top_k a float": completion(400, "valid integer", param="top_k", top_k=1.5),
    "ignore_eos a string": completion(400, "valid boolean", param="ignore_eos", ignore_eos="true"),
    "priority a string": completion(400, "valid integer", param="priority", priority="1"),
    "priority a float": completion(400, "valid integer", param="priority", priority=1.5),
    "priority a boolean": completion(400, "valid integer", param="priority", priority=True),
    "priority over 32 bits": completion(400, "less than or equal", param="priority", priority=2**31),
    "chat priority a string": chat(400, "valid integer", param="priority", priority="high"),
    "logprobs a string": completion(400, "valid integer", param="logprobs", logprobs="5"),
    "user a number": completion(400, "valid string", param="user", user=1),
    "cache_salt a number": completion(400, "valid string", param="cache_salt", cache_salt=7),
    "cache_salt empty": completion(400, "at least 1 character", param="cache_salt", cache_salt=""),
    "cache_salt too long": completion(
        400, "at most 256 characters", param="cache_salt", cache_salt="s" * 257
    ),
    # ---- values out of range (SamplingParams and the API's own limits) ----
    "temperature negative": completion(400, "temperature must be >= 0", param="temperature", temperature=-1),
    "top_p 0": completion(400, "top_p must be in (0, 1]", param="top_p", top_p=0),
    "top_p 1.5": completion(400, "top_p must be in (0, 1]", param="top_p", top_p=1.5),
    "top_k -2": completion(400, "top_k must be >= 1", param="top_k", top_k=-2),
    "n over the limit": completion(400, "n must be in [1, 16], got 17", param="n", n=17),
    "n 0": completion(400, "n must be in [1, 16], got 0", param="n", n=0),
    "stop list over the limit": completion(
        400, "at most 16", param="stop", stop=[f"s{i}" for i in range(17)]
    ),
    "stop empty string": completion(400, "non-empty strings", param="stop", stop=[""]),
    "seed over 64 bits": completion(400, "seed must be in", param="seed", seed=2**64),
    "seed at the top of its range with n 2": completion(
        400, "seed must be in", param="seed", seed=2**64 - 1, n=2
    ),
    "presence_penalty 3": completion(
        400, "presence_penalty must be in", param="presence_penalty", presence_penalty=3
    ),
    "repetition_penalty 0": completion(
        400, "repetition_penalty must be > 0", param="repetition_penalty", repetition_penalty=0
    ),
    "max_tokens 0": completion(
        400, "max_tokens must be >= 1 (0 only with echo", param="max_tokens", max_tokens=0
    ),
    "max_tokens negative": completion(400, "max_tokens must be >= 1", param="max_tokens", max_tokens=-5),
    "max_tokens negative with echo": completion(
        400, "max_tokens must be >= 0", param="max_tokens", max_tokens=-1, echo=True, logprobs=1
    ),
    "logprobs negative": completion(400, "greater than or equal to 0", param="logprobs", logprobs=-1),
    "logprobs over max-logprobs": completion(
        400, "logprobs must be at most 20", param="logprobs", logprobs=21
    ),
    "echo logprobs over max-logprobs": completion(
        400, "at most 20", param="logprobs", logprobs=50, echo=True, max_tokens=0
    ),
    "echo a string": completion(400, "valid boolean", param="echo", echo="yes"),
    "logprobs a boolean": completion(400, "valid integer", param="logprobs", logprobs=True),
    "an unknown field": completion(400, "min_p: this server does not support", param="min_p", min_p=0.1),
    "a misspelt field": completion(400, "does not support this field", param="max_token", max_token=3),
    "a misspelt composition field": completion(
        400,
        "does not support this field",
        param="adapters[0].scale",
        adapters=[{"name": "bot", "scale": 1.0}],
    ),
    "an unknown stream option": completion(
        400, "does not support", param="stream_options.foo", stream_options={"include_usage": True, "foo": 1}
    ),
    "an unknown message field": chat(  # the SDK's ``name`` would change the prompt: refused, not dropped
        400,
        "does not support",
        param="messages[0].name",
        messages=[{"role": "user", "content": "x", "name": "a"}],
    ),
    "an unknown chat field": chat(400, "does not support", param="modalities", modalities=["text"]),
    "suffix": completion(400, "suffix is not supported", param="suffix", suffix="!"),
    "best_of 2": completion(400, "best_of is not supported", param="best_of", best_of=2),
    "logit_bias key not an id": completion(400, "token ids", param="logit_bias", logit_bias={"a": 5}),
    "logit_bias key a float": completion(400, "token ids", param="logit_bias", logit_bias={"6.5": 5}),
    "logit_bias key negative": completion(400, "token ids >= 0", param="logit_bias", logit_bias={"-1": 5}),
    "logit_bias id past the vocabulary": completion(
        400, f"outside the vocabulary [0, {VOCAB_SIZE})", param="logit_bias", logit_bias={str(VOCAB_SIZE): 1}
    ),
    "logit_bias over 100": completion(400, "in [-100, 100]", param="logit_bias", logit_bias={"65": 100.5}),
    "logit_bias under -100": completion(400, "in [-100, 100]", param="logit_bias", logit_bias={"65": -101}),
    "logit_bias a string value": completion(
        400, "valid number", param="logit_bias.65", logit_bias={"65": "5"}
    ),
    "logit_bias a list": completion(400, "dictionary", param="logit_bias", logit_bias=[65, 5]),
    "logit_bias NaN": raw(
        b'{"model": "tiny", "prompt": "x", "logit_bias": {"65": NaN}}',
        400,
        "logit_bias must be a finite number",
    ),
    "logit_bias Infinity": raw(
        b'{"model": "tiny", "prompt": "x", "logit_bias": {"65": -Infinity}}',
        400,
        "logit_bias must be a finite",
    ),
    # ---- prompts the engine refuses ----
    "empty prompt": completion(400, "the prompt is empty", prompt=""),
    "empty token-id prompt": completion(400, "the prompt is empty", prompt=[]),
    "too many prompts": completion(400, "at most 256 prompts", param="prompt", prompt=["a"] * 257),
    "an empty prompt among several": completion(400, "the prompt is empty", prompt=["a", ""]),
    "a bad token id among several prompts": completion(
        400, f"[0, {VOCAB_SIZE})", prompt=[[65], [VOCAB_SIZE]]
    ),
    "token id past the vocabulary": completion(400, f"[0, {VOCAB_SIZE})", prompt=[VOCAB_SIZE]),
    "negative token id": completion(400, f"[0, {VOCAB_SIZE})", prompt=[65, -1]),
    "context length exceeded": completion(
        400,
        f"maximum context length is {MAX_MODEL_LEN} tokens; the request asks for "
        f"{len(TOO_LONG_PROMPT) + 10} ({len(TOO_LONG_PROMPT)} in the prompt + 10 max_tokens)",
        code="context_length_exceeded",
        prompt=TOO_LONG_PROMPT,
        max_tokens=10,
    ),
    "max_tokens beyond any context": completion(
        400, f"maximum context length is {MAX_MODEL_LEN}", code="context_length_exceeded", max_tokens=10**30
    ),
    "a million token ids": completion(
        400, f"maximum context length is {MAX_MODEL_LEN}", code="context_length_exceeded", prompt=[65] * 10**6
    ),
    "streamed and too long": completion(
        400,
        "maximum context length",
        code="context_length_exceeded",
        prompt=TOO_LONG_PROMPT,
        max_tokens=10,
        stream=True,
    ),
    "lone surrogate in the prompt": raw(
        b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 2}', 400, "prompt"
    ),
    # ---- NaN and infinity (Python's JSON parser accepts them) ----
    "temperature NaN": raw(
        b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "temperature must be a finite number"
    ),
    "top_p Infinity": raw(
        b'{"model": "tiny", "prompt": "x", "top_p": Infinity}', 400, "top_p must be a finite number"
    ),
    # ---- bodies that are not a JSON object ----
    "malformed JSON": raw(b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    "JSON array body": raw(b'[{"model": "tiny", "prompt": "x"}]', 400, "must be a JSON object"),
    "JSON string body": raw(b'"hello"', 400, "must be a JSON object"),
    "empty body": raw(b"", 400, "required"),
    "invalid UTF-8": raw(b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "error parsing the body"),
    "deeply nested JSON": raw(b"[" * 100_000 + b"]" * 100_000, 400, "error parsing the body"),
    "text/plain content type": raw(
        b'{"model": "tiny", "prompt": "x"}', 400, "Content-Type: application/json", content_type="text/plain"
    ),
    "form content type": raw(
        b"model=tiny&prompt=x", 400, "must be a JSON object", content_type="application/x-www-form-urlencoded"
    ),
    "body over 16 MiB": raw(_huge_body, 413, f"limit of {MAX_BODY_BYTES} bytes", code="request_too_large"),
    # ---- models and tenants ----
    "unknown adapter": completion(
        404, "The model 'nope' does not exist", code=NOT_FOUND, param="model", model="nope"
    ),
    "another tenant's adapter": completion(
        404,
        f"The model '{ADAPTER}' does not exist",
        code=NOT_FOUND,
        param="model",
        who="globex",
        model=ADAPTER,
    ),
    "tenant/name by another tenant's user": completion(
        404, "does not exist", code=NOT_FOUND, who="globex", model=f"acme/{ADAPTER}"
    ),
    "tenant/name of another tenant by a user": completion(
        404, "does not exist", code=NOT_FOUND, model=f"globex/{ADAPTER}"
    ),
    "unknown adapter in chat": chat(404, "does not exist", code=NOT_FOUND, model="nope"),
    "another tenant's adapter info": Bad(
        "GET", f"/v1/adapters/{ADAPTER}", 404, "does not exist", code=NOT_FOUND, who="globex"
    ),
    "deleting another tenant's adapter": Bad(
        "DELETE", f"/v1/adapters/{ADAPTER}", 404, "does not exist", code=NOT_FOUND, who="globex"
    ),
    "listing another tenant's adapters": Bad(
        "GET", "/v1/adapters?tenant=acme", 403, "Only admins", code=DENIED, who="globex"
    ),
    # ---- keys and roles ----
    "missing key": Bad("GET", "/v1/models", 401, "API key", code=BAD_KEY, who=None),
    "unknown key": completion(401, "API key", code=BAD_KEY, who="forged"),
    "key sent as Basic auth": Bad("GET", "/v1/models", 401, "API key", code=BAD_KEY, who="basic"),
    "user pins": Bad("POST", f"/v1/adapters/{ADAPTER}/pin", 403, "admin key", code=DENIED),
    "user unpins": Bad("POST", f"/v1/adapters/{ADAPTER}/unpin", 403, "admin key", code=DENIED),
    "user loads a local adapter": Bad(
        "POST",
        "/v1/load_lora_adapter",
        403,
        "admin key",
        code=DENIED,
        json={"lora_name": "x", "lora_path": "/tmp"},
    ),
    "user unloads an adapter": Bad(
        "POST", "/v1/unload_lora_adapter", 403, "admin key", code=DENIED, json={"lora_name": ADAPTER}
    ),
    # ---- admin routes with bad bodies ----
    "load without lora_path": Bad(
        "POST",
        "/v1/load_lora_adapter",
        400,
        "lora_path: this field is required",
        who="admin",
        json={"lora_name": "x"},
    ),
    "load with an unknown field": Bad(
        "POST",
        "/v1/load_lora_adapter",
        400,
        "does not support this field",
        param="zzz",
        who="admin",
        json={"lora_name": "x", "lora_path": "/x", "zzz": 1},
    ),
    "load from outside the roots": Bad(
        "POST",
        "/v1/load_lora_adapter",
        400,
        "allowed",
        who="admin",
        code="invalid_adapter_source",
        json={"lora_name": "x", "lora_path": "/etc"},
    ),
    "load with an over-long path": Bad(
        "POST",
        "/v1/load_lora_adapter",
        400,
        "cannot use that path",
        code="invalid_adapter_source",
        param="lora_path",
        who="admin",
        json={"lora_name": "x", "lora_path": f"{{roots}}/{LONG_PATH_COMPONENT}"},
    ),
    "unload an unknown adapter": Bad(
        "POST",
        "/v1/unload_lora_adapter",
        404,
        "does not exist",
        code=NOT_FOUND,
        who="admin",
        json={"lora_name": "nope"},
    ),
    # ---- uploads ----
    "upload missing the weights": upload(
        422,
        "missing file(s): adapter_model.safetensors",
        (("adapter_config.json", b"{}"),),
        code="invalid_adapter",
    ),
    "upload with a config that is not JSON": upload(
        422,
        "not valid JSON",
        (("adapter_config.json", b"not json"), ("adapter_model.safetensors", b"x")),
        code="invalid_adapter",
    ),
    "upload of a pickle": upload(
        422, "pickle", (("adapter_model.bin", b"\x80\x04pickle"),), code="invalid_adapter"
    ),
    "upload of the same file twice": upload(
        422,
        "sent twice",
        (("adapter_config.json", b"{}"), ("adapter_config.json", b"{}")),
        code="invalid_adapter",
    ),
    "upload with a path in a file name": upload(
        422,
        "unexpected file(s) '../adapter_config.json'",
        (("../adapter_config.json", b"{}"),),
        code="invalid_adapter",
    ),
    "upload with a bad adapter name": upload(
        422, "may only contain", REAL_ADAPTER_FILES, code="invalid_adapter", name="a/b"
    ),
    "upload without files": upload(400, "files: this field is required", None, param="files"),
    "upload for another tenant by a user": upload(
        403, "Only admins", REAL_ADAPTER_FILES, code=DENIED, tenant="globex"
    ),
    # ---- routes and methods ----
    "unknown route": Bad("GET", "/v1/nothing", 404, "Not Found"),
    "unknown route without a key": Bad("POST", "/v2/completions", 404, "Not Found", who=None),
    "GET on completions": Bad("GET", "/v1/completions", 405, "Method Not Allowed"),
    "DELETE on models": Bad("DELETE", "/v1/models", 405, "Method Not Allowed"),
    "PUT on chat": Bad("PUT", "/v1/chat/completions", 405, "Method Not Allowed", json={}),
    # ---- chat ----
    "messages missing": chat(400, "messages: this field is required", param="messages", messages=DROP),
    "messages a string": chat(400, "valid list", param="messages", messages="Hi"),
    "messages empty": chat(400, "at least 1 item", param="messages", messages=[]),
    "message role invalid": chat(
        400,
        "'system', 'developer', 'user', 'assistant' or 'tool'",
        param="messages[0].role",
        messages=[{"role": "robot", "content": "x"}],
    ),
    "message content a number": chat(
        400,
        "content must be a string",
        param="messages[0].content",
        messages=[{"role": "user", "content": 1}],
    ),
    "message content an image": chat(
        400,
        "content must be a string",
        param="messages[0].content",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    ),
    "message without content": chat(
        400, "required", param="messages[0].content", messages=[{"role": "user"}]
    ),
    "chat logprobs a number": chat(400, "valid boolean", param="logprobs", logprobs=5),
    "chat top_logprobs without logprobs": chat(
        400, "top_logprobs needs logprobs: true", param="top_logprobs", top_logprobs=5
    ),
    "chat top_logprobs over max-logprobs": chat(
        400, "top_logprobs must be at most 20", param="top_logprobs", top_logprobs=21, logprobs=True
    ),
    "chat top_logprobs negative": chat(
        400, "greater than or equal to 0", param="top_logprobs", top_logprobs=-1, logprobs=True
    ),
    "chat top_logprobs a string": chat(400, "valid integer", param="top_logprobs", top_logprobs="2"),
    "chat logit_bias past the vocabulary": chat(
        400, "outside the vocabulary", param="logit_bias", logit_bias={"100000": 1}
    ),
    "chat logit_bias key not an id": chat(400, "token ids", param="logit_bias", logit_bias={"x": 1}),
    "chat echo": chat(400, "does not support this field", param="echo", echo=True),
    "chat max_tokens 0": chat(400, "max_tokens must be >= 1, got 0", param="max_tokens", max_tokens=0),
    "tool_choice naming an unknown function": chat(
        400,
        "tool_choice names the function 'g', which is not in tools",
        param="tool_choice",
        tools=[TOOL_F],
        tool_choice={"type": "function", "function": {"name": "g"}},
    ),
    "tool_choice an unknown string": chat(
        400, "'none', 'auto' or 'required'", param="tool_choice", tools=[TOOL_F], tool_choice="always"
    ),
    "tool_choice without tools": chat(
        400, "tool_choice needs tools", param="tool_choice", tool_choice="required"
    ),
    "tools a parameters schema that is not an object": chat(
        400,
        "parameters must be an object schema",
        param="tools",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
    ),
    "tools a forced call whose schema cannot compile": chat(
        400,
        "cannot be compiled to a grammar",
        param="tools",
        tool_choice="required",
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {"type": "object", "properties": {"a": {"type": "nope"}}},
                },
            }
        ],
    ),
    "tools a named call whose schema cannot compile": chat(
        400,
        "cannot be compiled to a grammar",
        param="tools",
        tool_choice={"type": "function", "function": {"name": "f"}},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/missing"}}}],
    ),
    "tools two functions of one name": chat(
        400, "function names must be unique", param="tools", tools=[TOOL_F, TOOL_F]
    ),
    "tools a bad function name": chat(
        400,
        "should match pattern",
        param="tools[0].function.name",
        tools=[{"type": "function", "function": {"name": "a b"}}],
    ),
    "tools a tool without its function": chat(
        400, "required", param="tools[0].function", tools=[{"type": "function"}]
    ),
    "tools of an unknown type": chat(
        400,
        "'function'",
        param="tools[0].type",
        tools=[{"type": "code_interpreter", "function": {"name": "f"}}],
    ),
    "tools with response_format and a forced call": chat(
        400,
        "response_format cannot be combined with tool_choice",
        param="response_format",
        tools=[TOOL_F],
        tool_choice="required",
        response_format={"type": "json_object"},
    ),
    "a tool message without tool_call_id": chat(
        400, "tool_call_id is required", param="messages[0]", messages=[{"role": "tool", "content": "x"}]
    ),
    "tool_calls in a user message": chat(
        400,
        "tool_calls belong to assistant messages",
        param="messages[0]",
        messages=[
            {
                "role": "user",
                "content": "x",
                "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            }
        ],
    ),
    "an assistant message with neither content nor tool_calls": chat(
        400,
        "content is required",
        param="messages[1].content",
        messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],
    ),
    "parallel_tool_calls a string": chat(
        400, "valid boolean", param="parallel_tool_calls", tools=[TOOL_F], parallel_tool_calls="yes"
    ),
    "response_format an unknown type": chat(
        400,
        "'text', 'json_object' or 'json_schema'",
        param="response_format.type",
        response_format={"type": "yaml"},
    ),
    "response_format json_schema without its schema object": chat(
        400,
        "json_schema is required",
        param="response_format",
        response_format={"type": "json_schema"},
    ),
    "response_format json_schema a bad name": chat(
        400,
        "should match pattern",
        param="response_format.json_schema.name",
        response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
    ),
    "response_format json_schema an unknown field": chat(
        400,
        "does not support",
        param="response_format.json_schema.schema_extra",
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema_extra": {}}},
    ),
    "response_format a schema that cannot compile": chat(
        400,
        'cannot be compiled to a grammar: Unsupported type "nope"',
        param="response_format",
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "nope"}}},
    ),
    "response_format a schema with a dangling $ref": chat(
        400,
        "cannot be compiled",
        param="response_format",
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {"$ref": "#/x"}}},
    ),
    "chat max_completion_tokens 0": chat(
        400, "max_completion_tokens must be >= 1", param="max_completion_tokens", max_completion_tokens=0
    ),
    "chat temperature negative": chat(400, "temperature must be >= 0", param="temperature", temperature=-0.5),
    "chat context length exceeded": chat(
        400,
        f"maximum context length is {MAX_MODEL_LEN} tokens",
        code="context_length_exceeded",
        messages=[{"role": "user", "content": "A" * MAX_MODEL_LEN}],
    ),
    "lone surrogate in a chat message": Bad(
        "POST",
        "/v1/chat/completions",
        400,
        "messages",
        content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udc00"}], "max_tokens": 2}',
    ),
}


@dataclass
class Api:
    server: Server
    client: httpx.Client
    keys: dict[str, str]
    adapter_files: tuple[tuple[str, bytes], ...]
    roots: Path

    def send(self, case: Bad) -> httpx.Response:
        headers = {}
        if case.who == "basic":
            headers["Authorization"] = f"Basic {self.keys['acme']}"
        elif case.who is not None:
            headers["Authorization"] = f"Bearer {self.keys[case.who]}"
        kwargs: dict = {}
        if case.json is not DROP:
            kwargs["content"] = json.dumps(case.json).replace("{roots}", str(self.roots)).encode()
            headers["Content-Type"] = "application/json"
        elif case.content is not None:
            kwargs["content"] = case.content() if callable(case.content) else case.content
            if case.content_type is not None:
                headers["Content-Type"] = case.content_type
        elif case.form or case.files is not None:
            files = self.adapter_files if case.files == REAL_ADAPTER_FILES else case.files or ()
            kwargs["data"] = dict(case.form)
            kwargs["files"] = [("files", part) for part in files]
        return self.client.request(case.method, case.path, headers=headers, **kwargs)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A server with a keys file (acme, globex: users; ops: admin), a data dir and acme's adapter ``bot``."""
    root = tmp_path_factory.mktemp("bad-requests")
    model_dir = write_tiny_llama(root / "model", max_position_embeddings=MAX_MODEL_LEN)
    adapter_dir = save_peft_adapter(
        model_dir, root / "adapter", seed=5, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]
    )
    (root / "roots").mkdir()
    keys_file = root / "keys.json"
    keys = {who: add_key(keys_file, tenant, role) for who, tenant, role in
            (("acme", "acme", "user"), ("globex", "globex", "user"), ("admin", "ops", "admin"))}  # fmt: skip
    keys["forged"] = "lpx-not-a-real-key"
    args = [
        "--model", str(model_dir), "--served-model-name", BASE_MODEL, "--data-dir", str(root / "data"),
        "--keys-file", str(keys_file), "--adapter-roots", str(root / "roots"), "--max-lora-rank", "16",
        "--max-num-seqs", "2", "--dtype", "float32", "--device", "cpu",
    ]  # fmt: skip
    adapter_files = tuple(
        (name, (adapter_dir / name).read_bytes())
        for name in ("adapter_config.json", "adapter_model.safetensors")
    )
    with (
        running_server(args, root / "server.log") as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        api = Api(server, client, keys, adapter_files, root / "roots")
        uploaded = api.send(upload(201, "", REAL_ADAPTER_FILES, name=ADAPTER))
        assert uploaded.status_code == 201, uploaded.text
        yield api


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    """The response is ``status`` with a JSON body of exactly ``{"error": {message, type, param, code}}``."""
    assert response.status_code == status, response.text[:2000]
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_bad_request_gets_an_openai_error(api: Api, case: Bad) -> None:
    """Each bad request gets its status, error code, type and a message naming what was wrong."""
    error = assert_openai_error(api.send(case), case.status)
    assert case.fragment in error["message"]
    assert error["code"] == case.code
    assert error["type"] == case.error_type
    if case.param is not UNCHECKED:
        assert error["param"] == case.param


def test_another_tenants_adapter_looks_exactly_like_an_unknown_one(api: Api) -> None:
    """globex learns nothing about acme's ``bot``: the 404 is the unknown-model 404, name aside."""
    body = {"prompt": "Hi", "max_tokens": 2}
    hidden = api.send(completion(404, "", who="globex", model=ADAPTER, **body))
    unknown = api.send(completion(404, "", who="globex", model="zzz", **body))
    assert hidden.status_code == unknown.status_code == 404
    assert hidden.json() == json.loads(unknown.text.replace("zzz", ADAPTER))
    assert api.send(completion(200, "", model=ADAPTER)).status_code == 200, "acme itself can use it"


def test_the_server_survives_the_table(api: Api) -> None:
    """After every bad request above the process is alive, healthy, ready and serves completions."""
    assert api.server.process.poll() is None, api.server.log_tail()
    assert api.client.get("/health").json() == {"status": "ok"}
    assert api.client.get("/ready").status_code == 200
    for model in (BASE_MODEL, ADAPTER):
        response = api.send(completion(200, "", model=model, temperature=0, ignore_eos=True))
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        assert choice["finish_reason"] == "length" and response.json()["usage"]["completion_tokens"] == 4
    listed = api.client.get("/v1/adapters", headers={"Authorization": f"Bearer {api.keys['acme']}"})
    assert [a["name"] for a in listed.json()["data"]] == [ADAPTER], "no bad upload left an adapter behind"
