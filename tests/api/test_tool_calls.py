"""Reading replies for tool calls (server/api/tool_calls.py) and rendering tools into the prompt
(server/api/tools.py), on real request bodies and a real chat template.

A reply read in one piece and the same reply read in any chunking give the same content and calls,
so a stream adds up to the whole response.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from server.api.schemas import ChatCompletionRequest
from server.api.tool_calls import ToolCallReader
from server.api.tools import template_input, tool_plan
from server.engine.engine import template_renders_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def request(**fields) -> ChatCompletionRequest:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER, TIME],
    }
    return ChatCompletionRequest.model_validate({**body, **fields})


def read(text: str, chunk: int | None = None, **fields) -> tuple[str, list[tuple[str, dict]], list]:
    """(content, [(name, arguments)], every call delta) of ``text`` read in chunks of ``chunk``."""
    reader = ToolCallReader(tool_plan(request(**fields)))
    pieces = [text] if chunk is None else [text[i : i + chunk] for i in range(0, len(text), chunk)]
    content, deltas = "", []
    for piece in pieces:
        out = reader.push(piece)
        content, deltas = content + out.content, deltas + out.calls
    out = reader.finish()
    content, deltas = content + out.content, deltas + out.calls
    return content, [(c.function.name, json.loads(c.function.arguments)) for c in reader.calls], deltas


HERMES = (
    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)


@pytest.mark.parametrize("chunk", [None, 1, 2, 5, 11])
def test_auto_reads_hermes_tags_as_calls_and_the_rest_as_content_in_any_chunking(chunk):
    content, calls, deltas = read(HERMES, chunk)
    assert content == "Let me check. "
    assert calls == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert [d.index for d in deltas] == [0, 1] and all(d.id and d.function.name for d in deltas)


def test_auto_without_parallel_calls_keeps_the_first_call_only():
    _, calls, _ = read(HERMES, 3, parallel_tool_calls=False)
    assert calls == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize(
    "text",
    [
        "I would say <tool_ x",
        "a < b and <tool_call>not json</tool_call> c",
        '<tool_call>{"x": 1}</tool_call>',
    ],
)
def test_auto_text_that_is_no_call_is_content_as_written(text):
    for chunk in (None, 1, 4):
        content, calls, _ = read(text, chunk)
        assert (content, calls) == (text, [])


def test_auto_an_unclosed_tag_at_the_end_is_still_a_call():
    content, calls, _ = read('<tool_call>\n{"name": "get_time", "arguments": {}}', 2)
    assert (content, calls) == ("", [("get_time", {})])


@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_required_reads_each_element_of_the_list_as_a_call(chunk):
    text = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]'
    content, calls, deltas = read(text, chunk, tool_choice="required")
    assert content == "" and calls == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert len(deltas) == 2


def test_required_cut_short_is_left_as_content():
    text = '[{"name": "get_weather", "arguments": {"city": "Os'
    content, calls, _ = read(text, 4, tool_choice="required")
    assert calls == [] and content == text


def test_named_streams_the_call_first_then_its_arguments_piece_by_piece():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    content, calls, deltas = read('{"city": "Rome"}', 4, tool_choice=choice)
    assert content == "" and calls == [("get_weather", {"city": "Rome"})]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
    assert "".join(d.function.arguments for d in deltas) == '{"city": "Rome"}'
    assert all(d.index == 0 and d.id is None for d in deltas[1:])


def test_the_grammar_of_forced_calls():
    required = tool_plan(request(tool_choice="required", parallel_tool_calls=False)).grammar()
    schema = json.loads(required.schema)
    assert (schema["minItems"], schema["maxItems"], required.param) == (1, 1, "tools")
    assert [c["properties"]["name"] for c in schema["items"]["anyOf"]] == [
        {"const": "get_weather"},
        {"const": "get_time"},
    ]
    named = tool_plan(
        request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    ).grammar()
    assert json.loads(named.schema) == WEATHER["function"]["parameters"]
    assert tool_plan(request()).grammar() is None and tool_plan(request(tool_choice="none")).grammar() is None


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]  # fmt: skip


def test_a_template_without_tools_gets_them_as_a_hermes_system_prompt_and_history_as_text(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    req = request(messages=HISTORY)
    messages, tools = template_input(req, tool_plan(req), renders_tools=False)
    assert tools is None
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<tools>" in text and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "user: <tool_response>\nsunny, 21 C\n</tool_response>" in text
    none = request(messages=HISTORY, tool_choice="none")
    assert "<tools>" not in str(template_input(none, tool_plan(none), renders_tools=False)[0])


# the shape of Qwen's and Hermes' templates: tools, tool_calls (arguments as objects), tool turns
TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}{% endfor %}"
    "{% if m.tool_call_id %} (for {{ m.tool_call_id }}){% endif %}\n{% endfor %}"
)


def test_a_template_that_renders_tools_gets_them_and_the_history_it_expects(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tokenizer.chat_template = TOOLS_TEMPLATE
    req = request(messages=HISTORY)
    messages, tools = template_input(req, tool_plan(req), renders_tools=True)
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    assert text.startswith("TOOLS:get_weather;get_time;")  # (transformers trims the newlines after blocks)
    assert "assistant: CALL get_weather Paris" in text and "tool: sunny, 21 C (for call_1)" in text


def test_which_templates_render_tools(tiny_llama_dir):
    assert template_renders_tools(TOOLS_TEMPLATE)
    assert not template_renders_tools(AutoTokenizer.from_pretrained(tiny_llama_dir).chat_template)
    assert not template_renders_tools(None)
