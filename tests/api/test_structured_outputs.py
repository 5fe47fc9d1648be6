"""Structured outputs through the official ``openai`` package against a real ``loraplex serve``.

The server runs a tiny random Llama (byte-level tokenizer) with an adapter: the model knows no
JSON, so every reply that parses does so because the grammar made it. ``parse`` with a pydantic
model returns the parsed object; json_object replies are JSON objects; a schema the grammar engine
cannot compile is a 400 naming response_format; free requests beside constrained ones are served
as they are alone.
"""

from __future__ import annotations

import json
import sys
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.api.conftest import STRUCTURED_ADAPTER as ADAPTER
from tests.api.conftest import STRUCTURED_BASE as BASE

pytest.importorskip("xgrammar")

MESSAGES = [{"role": "user", "content": "Describe a pet."}]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(max_length=8)
    legs: list[Literal[0, 2, 4]] = Field(max_length=2)
    indoor: bool


@pytest.mark.parametrize("model", [BASE, ADAPTER])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_parse_with_a_pydantic_model_returns_the_parsed_object(structured_client, model, temperature):
    completion = structured_client.chat.completions.parse(
        model=model, messages=MESSAGES, response_format=Pet, max_tokens=200, temperature=temperature, seed=1
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Pet)
    assert Pet.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_replies_are_json_objects_and_stream_the_same(structured_client):
    kwargs = dict(model=ADAPTER, messages=MESSAGES, max_tokens=60, temperature=0,
                  response_format={"type": "json_object"})  # fmt: skip
    whole = structured_client.chat.completions.create(**kwargs)
    streamed = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in structured_client.chat.completions.create(stream=True, **kwargs)
        if chunk.choices
    )
    assert streamed == whole.choices[0].message.content
    if whole.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(streamed), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert streamed.startswith("{")


def test_a_schema_without_strict_allows_what_it_does_not_forbid(structured_client):
    """json_schema without strict: the reply follows the schema (it always does here)."""
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"]}
    completion = structured_client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_tokens=80, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
    )  # fmt: skip
    assert json.loads(completion.choices[0].message.content)["n"] in (1, 2, 3)


def test_free_requests_beside_constrained_ones_are_unchanged(structured_client):
    """The same greedy free request alone, then while constrained requests of the other model run
    in the same batches (concurrently): identical text."""
    from concurrent.futures import ThreadPoolExecutor

    def free() -> str:
        reply = structured_client.chat.completions.create(
            model=BASE, messages=MESSAGES, max_tokens=40, temperature=0, extra_body={"ignore_eos": True}
        )
        return reply.choices[0].message.content

    def constrained() -> object:
        return (
            structured_client.chat.completions.parse(
                model=ADAPTER, messages=MESSAGES, response_format=Pet, max_tokens=200, temperature=1.0
            )
            .choices[0]
            .message.parsed
        )

    alone = free()
    with ThreadPoolExecutor(4) as pool:
        others = [pool.submit(constrained) for _ in range(3)]
        beside = pool.submit(free)
        assert beside.result() == alone
        assert all(isinstance(o.result(), Pet) for o in others)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
    ],
)
def test_a_schema_the_engine_cannot_compile_is_a_400_naming_response_format(
    structured_client, response_format
):
    with pytest.raises(openai.BadRequestError) as caught:
        structured_client.chat.completions.create(
            model=BASE, messages=MESSAGES, response_format=response_format
        )
    error = caught.value.body
    assert error["param"] == "response_format"
    assert "cannot be compiled" in error["message"]
    assert structured_client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_tokens=2
    ).choices  # still serving


def test_without_the_grammar_engine_structured_requests_get_a_400_saying_how_to_install_it(
    tiny_llama_factory, monkeypatch
):
    """A server whose environment lacks xgrammar (``import xgrammar`` fails) serves free requests
    and refuses response_format and forced tool calls with the install command."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from server.config import EngineConfig, ModelConfig
    from server.engine.engine import Engine

    monkeypatch.setitem(sys.modules, "xgrammar", None)
    config = EngineConfig(max_loras=1, max_lora_rank=8, max_num_seqs=2, max_model_len=2048)
    model_dir = tiny_llama_factory(max_position_embeddings=2048)  # byte tokens: a long tools prompt
    engine = Engine.from_config(ModelConfig(model=str(model_dir), dtype="float32", device="cpu"), config)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    try:
        with TestClient(create_app(engine, BASE)) as http:
            body = {"model": BASE, "messages": MESSAGES, "max_tokens": 4}
            for extra, param in [
                ({"response_format": {"type": "json_object"}}, "response_format"),
                ({"tools": [tool], "tool_choice": "required"}, "tools"),
            ]:
                response = http.post("/v1/chat/completions", json={**body, **extra})
                assert response.status_code == 400, response.text
                error = response.json()["error"]
                assert error["param"] == param
                assert "pip install 'loraplex[structured]'" in error["message"]
            assert http.post("/v1/chat/completions", json=body).status_code == 200
            assert (
                http.post("/v1/chat/completions", json={**body, "tools": [tool]}).status_code == 200
            )  # auto
    finally:
        engine.shutdown()
