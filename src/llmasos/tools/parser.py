"""Tool calls out of a model's reply, as it streams: `ToolCallParser`.

One parser serves a stream and a whole reply (`parse` feeds the text at once), so the pieces of a
stream add up to exactly the non-streamed answer. Text that may still turn out to open a call (a
partial `<tool_call>`) is held back; once a trigger appears, the rest of the reply is calls: each
top-level JSON object in it is one call (the markup between them has no braces). A call's id and
name go out once its name has been read, then its arguments as fragments of the text the model wrote
(trailing braces are held back until the call closes, as they may close the call rather than the
arguments); an object that is not a call is dropped, and a reply whose calls all fail is content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from llmasos.outputs import ToolCall
from llmasos.tools.formats import ToolFormat


@dataclass
class CallDelta:
    """What one stream step adds to call `index`: its id and name once, then argument text."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def as_openai(self) -> dict:
        """A `delta.tool_calls[]` entry as OpenAI streams it."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


@dataclass
class ParsedDelta:
    content: str = ""
    calls: list[CallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)


@dataclass
class _Call:
    start: int  # where its object starts in the calls region
    end: int | None = None  # one past its closing brace, once closed
    index: int | None = None  # its place among the calls sent, once its name is
    call: ToolCall | None = None
    args_at: int | None = None  # where its arguments start in its text, when the name came first
    sent: int = 0  # characters of its arguments sent
    done: bool = False  # closed and sent, or not a call


class ToolCallParser:
    """Feed a reply's text as it comes; each `feed` returns what to send now, `finish` the rest."""

    def __init__(self, fmt: ToolFormat, max_calls: int | None = None):
        self.fmt = fmt
        self.max_calls = max_calls
        self.text = ""
        self.content = ""  # content sent so far
        self.calls: list[ToolCall] = []
        self._calls_at: int | None = None  # where the calls start in `text`
        self._plain = False  # the reply is text (a format whose calls must open the reply)
        self._objects: dict[int, _Call] = {}  # by where they start in the calls region
        self._scan = _Scanner()
        head = (
            re.escape(f'"{fmt.arguments_key}"')
            if fmt.arguments_key == "arguments"
            else '"(?:parameters|arguments)"'
        )
        self._head = re.compile(r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*' + head + r"\s*:\s*(?=\S)")

    def feed(self, text: str) -> ParsedDelta:
        self.text += text
        delta = ParsedDelta()
        if self._calls_at is None:
            delta.content = self._content()
        if self._calls_at is not None:
            delta.calls = self._update_calls()
        return delta

    def finish(self) -> ParsedDelta:
        """The end of the reply: held-back text is content, and a calls part without a call too."""
        delta = ParsedDelta()
        if self._calls_at is not None and not self.calls:
            delta.content, self._calls_at = self.text[len(self.content) :], None
        elif self._calls_at is None:
            delta.content = self.text[len(self.content) :]
        self.content += delta.content
        return delta

    def _content(self) -> str:
        """New content, up to a trigger or to text that may start one; notes where the calls start."""
        sent = len(self.content)
        if self._plain:
            new = self.text[sent:]
        elif self.fmt.leading_text:
            at = min((i for t in self.fmt.triggers if (i := self.text.find(t, sent)) >= 0), default=-1)
            if at >= 0:
                self._calls_at = at
                new = self.text[sent:at]
            else:
                new = self.text[sent : len(self.text) - _held(self.text, self.fmt.triggers)]
        else:
            body = self.text.lstrip()
            if any(body.startswith(t) for t in self.fmt.triggers):
                self._calls_at = len(self.text) - len(body)
                return ""
            if not body or any(t.startswith(body) for t in self.fmt.triggers):
                return ""  # undecided: hold it
            self._plain = True
            new = self.text[sent:]
        self.content += new
        return new

    def _update_calls(self) -> list[CallDelta]:
        region = self.text[self._calls_at :]
        deltas = []
        for start, end in self._scan.objects(region):
            obj = self._objects.setdefault(start, _Call(start))
            obj.end = end
            deltas.extend(self._progress(obj, region))
        return deltas

    def _progress(self, obj: _Call, region: str) -> list[CallDelta]:
        """What `obj` adds now: its name when read, argument text up to held-back closing braces."""
        if obj.done:
            return []
        text = region[obj.start : obj.end if obj.end is not None else len(region)]
        deltas = []
        if obj.index is None:
            name, args_at = self._name(text, obj.end is not None)
            full = self.max_calls is not None and len(self.calls) >= self.max_calls
            if name is None or full:
                obj.done = obj.end is not None or full
                return []
            obj.index = len(self.calls)
            obj.call = ToolCall(self.fmt.call_id(), name, "")
            obj.args_at = args_at
            self.calls.append(obj.call)
            deltas.append(CallDelta(obj.index, obj.call.id, name))
        if obj.end is not None:
            obj.done = True
            arguments = self._arguments(text, obj)
            if arguments is None:  # not a call after all: its name went out, its arguments stay as sent
                return deltas
            obj.call.arguments = arguments
        elif obj.args_at is not None:
            obj.call.arguments = text[obj.args_at :].rstrip("} \n\t\r")
        new = obj.call.arguments[obj.sent :]
        if new:
            obj.sent += len(new)
            if deltas:
                deltas[0].arguments = new
            else:
                deltas.append(CallDelta(obj.index, arguments=new))
        return deltas

    def _name(self, text: str, closed: bool) -> tuple[str | None, int | None]:
        """The call's name and where its arguments start, as soon as the text shows them."""
        head = self._head.match(text)
        if head:
            return json.loads(head.group(1)), head.end()
        if not closed:
            return None, None
        value = _loads(text)
        name = value.get("name") if isinstance(value, dict) else None
        return (name, None) if isinstance(name, str) else (None, None)

    def _arguments(self, text: str, obj: _Call) -> str | None:
        """A closed call's arguments as the model wrote them (JSON text), or None if it is no call."""
        value = _loads(text)
        if not isinstance(value, dict):
            return None
        args = value.get(self.fmt.arguments_key, value.get("arguments", {}))
        if not isinstance(args, dict):
            return None
        if obj.args_at is not None:
            raw = text[obj.args_at : -1].rstrip()
            if _loads(raw) == args:
                return raw
        return json.dumps(args, ensure_ascii=False)


def parse_tool_calls(
    fmt: ToolFormat, text: str, max_calls: int | None = None
) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's content (None when empty) and tool calls."""
    parser = ToolCallParser(fmt, max_calls)
    parser.feed(text)
    parser.finish()
    return parser.content or None, parser.calls


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _held(text: str, triggers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that is the start of a trigger."""
    return max((n for t in triggers for n in range(1, len(t)) if text.endswith(t[:n])), default=0)


class _Scanner:
    """Finds the top-level JSON objects in a growing text, reading each character once (strings and
    escapes aware, so a brace inside a string is text)."""

    def __init__(self):
        self.pos = 0
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.start: int | None = None
        self.closed: list[tuple[int, int]] = []

    def objects(self, text: str) -> list[tuple[int, int | None]]:
        """(start, end) of the objects found so far; the open one (if any) last, with end None."""
        for i in range(self.pos, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"' and self.depth:
                self.in_string = True
            elif ch == "{":
                if self.depth == 0:
                    self.start = i
                self.depth += 1
            elif ch == "}" and self.depth:
                self.depth -= 1
                if self.depth == 0:
                    self.closed.append((self.start, i + 1))
                    self.start = None
        self.pos = len(text)
        return self.closed + ([(self.start, None)] if self.start is not None else [])
