"""Structured outputs and tools on the embedded SmolLM2-135M-Instruct, through the official
``openai`` package against a real ``loraplex serve`` process.

``parse`` with a pydantic model returns the parsed object; json_object replies are objects; forced
tool calls (a named function, ``required``) carry arguments valid for their function, whole and
streamed; a tool result sent back is answered.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.api.server_process import ServerProcess, running_server

pytestmark = pytest.mark.slow
pytest.importorskip("xgrammar")

MODEL = "smollm2"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: float
    landmarks: list[str] = Field(max_length=3)
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    root = tmp_path_factory.mktemp("smollm2-structured")
    args = ["--served-model-name", MODEL, "--data-dir", str(root / "data"), "--dtype", "float32",
            "--device", "cpu", "--max-num-seqs", "4"]  # fmt: skip
    server: ServerProcess
    with running_server(args, root / "server.log", startup_timeout_s=300) as server:  # noqa: SIM117
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300) as oai:
            yield oai


def test_parse_returns_the_pydantic_object(client):
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe the city of Paris as JSON."}],
        response_format=City,
        max_tokens=150,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)
    assert choice.message.parsed == City.model_validate_json(choice.message.content)


def test_json_object_is_an_object(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object about a dog."}],
        response_format={"type": "json_object"}, max_tokens=120, temperature=0,
    )  # fmt: skip
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:
        assert reply.choices[0].message.content.startswith("{")


def test_a_named_function_call_then_its_result(client):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ).choices[0]  # fmt: skip
    assert first.finish_reason == "tool_calls" and first.message.content is None
    (call,) = first.message.tool_calls
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    history = [
        *ASK_WEATHER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=40,
                                            temperature=0).choices[0]  # fmt: skip
    assert answer.message.content or answer.message.tool_calls


def test_required_calls_whole_and_streamed_agree(client):
    kwargs = dict(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                  parallel_tool_calls=False, max_tokens=80, temperature=0)  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    deltas = [
        delta
        for chunk in client.chat.completions.create(stream=True, **kwargs)
        if chunk.choices
        for delta in chunk.choices[0].delta.tool_calls or []
    ]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, "get_weather", call.function.arguments)
    ]


def test_auto_answers_with_text_or_well_formed_calls(client):
    choice = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], max_tokens=80, temperature=0
    ).choices[0]
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather"
        json.loads(call.function.arguments)
    assert choice.message.tool_calls or isinstance(choice.message.content, str)
    assert (choice.finish_reason == "tool_calls") == bool(
        choice.message.tool_calls
    ) or choice.finish_reason == "length"
