"""Tools on the way in: ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` → what the model sees
and, for forced calls, the grammar its reply must follow.

- ``tool_choice`` ``none``: the model sees no tools and answers in text; ``auto`` (the default with
  tools): it sees them and may call some in its template's format (Hermes-style
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, parsed by
  ``server.api.tool_calls``); ``required``: its reply is a JSON list of calls
  ``[{"name": ..., "arguments": {...}}]``, one or more (one without ``parallel_tool_calls``), each
  one's arguments valid for its function's schema; a named function: its reply is that function's
  arguments object. Forced calls are grammar-constrained (``server.engine.grammar``).
- A template that renders tools itself (it reads a ``tools`` variable: Qwen, Llama 3.1, Hermes...)
  gets them with ``apply_chat_template(tools=...)``, and earlier calls and results as the messages
  it expects (arguments as objects). A template that does not (SmolLM2's) gets the tools as a
  Hermes-style system prompt, earlier calls as ``<tool_call>`` text in the assistant turns and
  results as ``<tool_response>`` user turns, the format the model is then asked to answer in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from server.api.errors import ApiError
from server.api.schemas import ChatCompletionRequest, ChatMessage, Tool
from server.engine.grammar import GrammarSpec

ToolMode = Literal["none", "auto", "required", "named"]
TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ToolPlan:
    """How one chat request uses its tools."""

    mode: ToolMode
    tools: list[Tool] = field(default_factory=list)
    parallel: bool = True  # more than one call allowed
    named: Tool | None = None  # mode "named": the function the reply calls

    @property
    def parses_calls(self) -> bool:
        """The reply may hold calls (every mode but none)."""
        return self.mode != "none"

    def grammar(self) -> GrammarSpec | None:
        """The grammar of a forced reply (required, named); None when the model chooses."""
        if self.named is not None:
            fn = self.named.function
            return GrammarSpec.json_schema(fn.parameters or ANY_OBJECT, bool(fn.strict), param="tools")
        if self.mode != "required":
            return None
        calls = [_call_schema(tool) for tool in self.tools]
        schema = {
            "type": "array",
            "items": {"anyOf": calls},
            "minItems": 1,
            **({} if self.parallel else {"maxItems": 1}),
        }
        strict = all(tool.function.strict for tool in self.tools)
        return GrammarSpec.json_schema(schema, strict, param="tools")


def tool_plan(req: ChatCompletionRequest) -> ToolPlan:
    """The request's plan (ApiError naming the field at fault): tool_choice without tools, a named
    function that is not among them, two tools of one name, a ``parameters`` that is not an object
    schema."""
    tools, choice = req.tools or [], req.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    _check_tools(tools)
    parallel = req.parallel_tool_calls is not False
    if not tools or choice == "none":
        return ToolPlan("none", tools, parallel)
    if choice is None or isinstance(choice, str):
        return ToolPlan(choice or "auto", tools, parallel)
    named = next((tool for tool in tools if tool.function.name == choice.function.name), None)
    if named is None:
        raise ApiError(400, f"tool_choice names the function {choice.function.name!r}, which is not in tools",
                       param="tool_choice")  # fmt: skip
    return ToolPlan("named", tools, parallel, named)


def _check_tools(tools: list[Tool]) -> None:
    names = [tool.function.name for tool in tools]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ApiError(400, f"tools: function names must be unique, repeated: {repeated}", param="tools")
    for i, tool in enumerate(tools):
        kind = (tool.function.parameters or ANY_OBJECT).get("type", "object")
        if kind != "object":
            raise ApiError(400, f"tools[{i}].function.parameters must be an object schema (type "
                           f"\"object\"), got type {kind!r}", param="tools")  # fmt: skip


def _call_schema(tool: Tool) -> dict[str, Any]:
    """One element of a required reply: this function's name and its arguments."""
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": tool.function.parameters or ANY_OBJECT,
        },
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def template_input(
    req: ChatCompletionRequest, plan: ToolPlan, renders_tools: bool
) -> tuple[list[dict], list[dict] | None]:
    """The messages (and tools, for a template that renders them) to give the chat template."""
    shown = plan.tools if plan.mode != "none" else []
    if renders_tools:
        tools = [tool.model_dump(exclude_none=True) for tool in shown] or None
        return [_native_message(m) for m in req.messages], tools
    messages = [_hermes_message(m) for m in req.messages]
    if shown:
        prompt = TOOLS_PROMPT.format(
            tools="\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in shown)
        )
        if messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": f"{messages[0]['content']}\n\n{prompt}"}
        else:
            messages.insert(0, {"role": "system", "content": prompt})
    return messages, None


def _role(message: ChatMessage) -> str:
    return "system" if message.role == "developer" else message.role


def _arguments(text: str) -> Any:
    """An earlier call's arguments as the object templates expect (left as text if not JSON)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _native_message(message: ChatMessage) -> dict:
    out: dict[str, Any] = {"role": _role(message), "content": message.text}
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)}}
            for call in message.tool_calls
        ]  # fmt: skip
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def _hermes_message(message: ChatMessage) -> dict:
    if message.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.text}\n</tool_response>"}
    calls = [
        "<tool_call>\n"
        + json.dumps({"name": call.function.name, "arguments": _arguments(call.function.arguments)})
        + "\n</tool_call>"
        for call in message.tool_calls or []
    ]
    return {"role": _role(message), "content": "\n".join([message.text, *calls] if message.text else calls)}
