"""Tools on the way out: the model's reply text → content and ``tool_calls``, whole or streamed.

One ``ToolCallReader`` per choice reads the reply as it comes (``push`` each text delta, then
``finish``) and says what the client gets: content text and tool-call deltas in OpenAI's shape.
The whole response reads the same way in one go, so a stream adds up to the whole body.

- named function: the reply is the arguments; the call (id, name) goes out first, then the
  arguments piece by piece as they are generated.
- required: the reply is a JSON list of ``{"name", "arguments"}``; each call goes out whole as soon
  as its element is complete.
- auto (Hermes-style, as vLLM's hermes parser reads it): text outside ``<tool_call>...</tool_call>``
  is content; each tag's JSON ``{"name", "arguments"}`` is a call, sent whole when its closing tag
  (or the end of the reply) arrives. Text that may be the start of a tag is held back until it is
  known not to be one. A tag whose JSON is not a call is content, as written. Without
  ``parallel_tool_calls`` only the first call is kept.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from server.api.schemas import FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta
from server.api.tools import ToolPlan

OPEN_TAG, CLOSE_TAG = "<tool_call>", "</tool_call>"


@dataclass
class ReadOut:
    """What one step of reading gives the client."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def add(self, other: ReadOut) -> ReadOut:
        return ReadOut(self.content + other.content, self.calls + other.calls)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallReader:
    """Reads one choice's reply under ``plan`` (whose mode is not none)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.calls: list[ToolCall] = []  # complete calls so far, in order
        self._buffer = ""  # text not handed out yet
        self._named_started = False

    def push(self, text: str) -> ReadOut:
        self._buffer += text
        return self._read(final=False)

    def finish(self) -> ReadOut:
        """The end of the reply: whatever is held back goes out (as calls, or as content)."""
        return self._read(final=True)

    def _read(self, final: bool) -> ReadOut:
        if self.plan.named is not None:
            return self._push_named()
        if self.plan.mode == "required":
            return self._read_list(final=final)
        return self._read_tags(final=final)

    # ---- named ----
    def _push_named(self) -> ReadOut:
        assert self.plan.named is not None
        out = ReadOut()
        if not self._named_started:
            self._named_started = True
            call = ToolCall(
                id=new_call_id(), function=FunctionCall(name=self.plan.named.function.name, arguments="")
            )
            self.calls.append(call)
            first = FunctionCallDelta(name=call.function.name, arguments="")
            out.calls.append(ToolCallDelta(index=0, id=call.id, type="function", function=first))
        if self._buffer:
            self.calls[0].function.arguments += self._buffer
            out.calls.append(ToolCallDelta(index=0, function=FunctionCallDelta(arguments=self._buffer)))
            self._buffer = ""
        return out

    # ---- required: [{"name": ..., "arguments": ...}, ...] ----
    def _read_list(self, final: bool) -> ReadOut:
        out = ReadOut()
        decoder = json.JSONDecoder()
        while True:
            start = len(self._buffer) - len(self._buffer.lstrip(" \n\t\r[,"))
            rest = self._buffer[start:]
            if not rest or rest.startswith("]"):
                break
            try:
                item, end = decoder.raw_decode(rest)
            except ValueError:
                break  # the element is not complete yet
            self._buffer = rest[end:]
            out.calls += self._call_deltas(item)
        if final and self._buffer.strip(" \n\t\r]"):
            out.content, self._buffer = self._buffer, ""  # cut short (max_tokens): left as text
        return out

    # ---- auto: Hermes-style tags ----
    def _read_tags(self, final: bool) -> ReadOut:
        out = ReadOut()
        while True:
            opened = self._buffer.find(OPEN_TAG)
            if opened < 0:
                keep = 0 if final else _partial_tag_length(self._buffer)
                out.content += self._content(self._buffer[: len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep :]
                return out
            out.content += self._content(self._buffer[:opened])
            closed = self._buffer.find(CLOSE_TAG, opened)
            if closed < 0 and not final:
                self._buffer = self._buffer[opened:]
                return out
            end = len(self._buffer) if closed < 0 else closed + len(CLOSE_TAG)
            body = self._buffer[opened + len(OPEN_TAG) : closed if closed >= 0 else end]
            tag, self._buffer = self._buffer[opened:end], self._buffer[end:]
            calls = self._call_deltas(_json_or_none(body))
            if calls or (self.calls and not self.plan.parallel):
                out.calls += calls
            else:
                out.content += tag  # not a call: the text as the model wrote it

    def _content(self, text: str) -> str:
        """Text between calls; after a call only what is not blank (the newlines between tags)."""
        return text if not self.calls or text.strip() else ""

    def _call_deltas(self, item: object) -> list[ToolCallDelta]:
        """A complete call (``{"name": str, "arguments": object}``) as one delta; [] when ``item`` is
        not one, or when it is one call too many without parallel_tool_calls."""
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and "arguments" in item):
            return []
        if self.calls and not self.plan.parallel:
            return []
        arguments = item["arguments"]
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call = ToolCall(id=new_call_id(), function=FunctionCall(name=item["name"], arguments=text))
        self.calls.append(call)
        delta = FunctionCallDelta(name=call.function.name, arguments=text)
        return [ToolCallDelta(index=len(self.calls) - 1, id=call.id, type="function", function=delta)]


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _partial_tag_length(text: str) -> int:
    """How many trailing characters of ``text`` could be the start of an opening tag."""
    for size in range(min(len(OPEN_TAG) - 1, len(text)), 0, -1):
        if OPEN_TAG.startswith(text[-size:]):
            return size
    return 0
