"""Tools through the official ``openai`` package against a real ``loraplex serve`` process.

A tiny random Llama (it knows nothing of tools): forced calls (``required``, a named function)
are valid because the grammar makes them so, whole and streamed; the stream adds up to the whole
response; tool results in later turns are accepted; ``none`` answers in text.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.api.conftest import STRUCTURED_ADAPTER as ADAPTER
from tests.api.conftest import STRUCTURED_BASE as BASE

pytest.importorskip("xgrammar")

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_ARGS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_ARGS = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_ARGS, "strict": True}},
    {
        "type": "function",
        "function": {"name": "get_time", "description": "Time now", "parameters": TIME_ARGS},
    },
]
SCHEMAS = {"get_weather": WEATHER_ARGS, "get_time": TIME_ARGS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def ask(structured_client, **kwargs):
    return structured_client.chat.completions.create(
        **{"model": BASE, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 200, "temperature": 0, **kwargs}
    )


def assert_valid_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({call.id for call in calls}) == len(calls)


def streamed(structured_client, **kwargs) -> tuple[str, list[dict], str | None]:
    """(content, calls as {id, name, arguments}, finish_reason) put together from the stream."""
    content, calls, finish = "", {}, None
    for chunk in ask(structured_client, stream=True, **kwargs):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] = call["name"] or delta.function.name
            call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def as_dicts(calls) -> list[dict]:
    return [{"name": c.function.name, "arguments": c.function.arguments} for c in calls]


@pytest.mark.parametrize("model", [BASE, ADAPTER])
def test_a_named_function_is_called_with_valid_arguments(structured_client, model):
    choice = ask(structured_client, model=model, tool_choice=NAMED).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    assert_valid_calls(choice.message.tool_calls)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("temperature", [0, 1.0])
def test_required_makes_one_or_more_valid_calls(structured_client, parallel, temperature):
    """With parallel calls the random model may go on listing calls up to max_tokens: the complete
    ones are its calls, the cut one is left as content."""
    choice = ask(structured_client, tool_choice="required", parallel_tool_calls=parallel,
                 temperature=temperature, seed=4, max_tokens=400).choices[0]  # fmt: skip
    assert_valid_calls(choice.message.tool_calls)
    if not parallel:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    elif choice.finish_reason == "length":
        assert choice.message.content
    else:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None


@pytest.mark.parametrize("tool_choice", [NAMED, "required"])
def test_a_streamed_call_adds_up_to_the_whole_one(structured_client, tool_choice):
    whole = ask(structured_client, tool_choice=tool_choice, parallel_tool_calls=False).choices[0]
    content, calls, finish = streamed(structured_client, tool_choice=tool_choice, parallel_tool_calls=False)
    assert (content, finish) == ("", "tool_calls")
    assert [{"name": c["name"], "arguments": c["arguments"]} for c in calls] == as_dicts(
        whole.message.tool_calls
    )
    assert all(c["id"].startswith("call_") for c in calls)


def test_tool_results_in_later_turns_are_accepted_and_change_the_prompt(structured_client):
    first = ask(structured_client, tool_choice=NAMED).choices[0].message
    call = first.tool_calls[0]
    history = [
        *MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    reply = ask(structured_client, messages=history, max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > ask(structured_client, max_tokens=4).usage.prompt_tokens


def test_none_answers_in_text_without_the_tools(structured_client):
    with_none = ask(
        structured_client, tool_choice="none", max_tokens=8, extra_body={"ignore_eos": True}
    ).choices[0]
    without = structured_client.chat.completions.create(
        model=BASE, messages=MESSAGES, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    ).choices[0]
    assert with_none.message.tool_calls == [] and with_none.finish_reason == "length"
    assert with_none.message.content == without.message.content  # the tools were not in its prompt


def test_auto_lets_the_model_answer_in_text(structured_client):
    choice = ask(structured_client, max_tokens=8, extra_body={"ignore_eos": True}).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls == []
    assert isinstance(choice.message.content, str)
