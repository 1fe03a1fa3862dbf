"""A streamed response as OpenAI's typed events, from the engine's per-step text.

The events nest as OpenAI sends them: the response is created and in progress; each output item is
added, filled and done before the next one starts (a message: its text part added, text deltas, the
text done, the part done; a function call: its arguments as deltas, then done); the response then
completes (or is incomplete) with its whole output and usage. With tools, the tool call parser of
`llmasos.tools` splits the text into the message's content and the calls as they stream, so the items
add up to exactly what the same request gives unstreamed. A message item opens with its first text,
so a reply that is only calls has no message, as OpenAI's has none.
"""

from __future__ import annotations

from llmasos.outputs import CompletionOutput, ToolCall
from llmasos.serve.responses_format import (
    INCOMPLETE,
    ResponseObject,
    function_call_item,
    message_item,
    new_id,
)
from llmasos.serve.sse import TypedEvents
from llmasos.tools import CallDelta, ToolPlan


class ResponseStream:
    def __init__(self, draft: ResponseObject, plan: ToolPlan | None):
        self.draft = draft
        self.events = TypedEvents()
        self.parser = plan.parser() if plan is not None else None
        self.output: list[dict] = []  # the items done
        self.message: dict | None = None  # the message item being written
        self.call: ToolCall | None = None  # the function call being written
        self.status = "in_progress"  # of the items: "incomplete" if the reply is cut short

    def start(self) -> list[str]:
        in_progress = self.draft.to_dict("in_progress", [])
        return [
            self.events.event("response.created", response=in_progress),
            self.events.event("response.in_progress", response=in_progress),
        ]

    def feed(self, text: str) -> list[str]:
        """The events for one step's new text."""
        if self.parser is None:
            return self._content(text)
        parsed = self.parser.feed(text)
        return self._content(parsed.content) + self._calls(parsed.calls)

    def finish(self, completion: CompletionOutput, job_usage: dict) -> tuple[list[str], dict]:
        """The last events (the terminal one not yet) and the finished response; `completion` is the
        whole reply (its finish reason says whether it was cut short)."""
        events = self._content(self.parser.finish().content) if self.parser is not None else []
        self.status = "incomplete" if completion.finish_reason in INCOMPLETE else "completed"
        if self.message is None and self.call is None and not self.output:
            events += self._open_message()  # an empty reply is still a message
        events += self._close()
        return events, self.draft.finished(completion, self.output, job_usage)

    def terminal(self, response: dict) -> str:
        """`response.completed`, or `response.incomplete` when it was cut short."""
        return self.events.event(f"response.{response['status']}", response=response)

    def _at(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": len(self.output)}

    def _content(self, text: str) -> list[str]:
        if not text:
            return []
        events = self._open_message() if self.message is None else []
        part = self.message["content"][0]
        part["text"] += text
        return events + [
            self.events.event(
                "response.output_text.delta",
                **self._at(self.message),
                content_index=0,
                delta=text,
                logprobs=[],
            )
        ]

    def _open_message(self) -> list[str]:
        events = self._close()
        self.message = message_item(new_id("msg"), "", "in_progress")
        part = self.message["content"][0]
        added = {**self.message, "content": []}
        return events + [
            self.events.event("response.output_item.added", output_index=len(self.output), item=added),
            self.events.event(
                "response.content_part.added", **self._at(self.message), content_index=0, part=part
            ),
        ]

    def _calls(self, deltas: list[CallDelta]) -> list[str]:
        events = []
        for delta in deltas:
            if delta.id is not None:  # a new call: the item before it is done
                events += self._close()
                self.call = ToolCall(delta.id, delta.name, "")
                item = function_call_item(self.call, "in_progress")
                events.append(
                    self.events.event("response.output_item.added", output_index=len(self.output), item=item)
                )
            if delta.arguments:
                self.call.arguments += delta.arguments
                events.append(
                    self.events.event(
                        "response.function_call_arguments.delta",
                        **self._at(function_call_item(self.call)),
                        delta=delta.arguments,
                    )
                )
        return events

    def _close(self) -> list[str]:
        """The done events of the item being written, if any."""
        if self.message is not None:
            item, self.message = self.message, None
            item["status"] = self._item_status()
            at, part = self._at(item), item["content"][0]
            events = [
                self.events.event(
                    "response.output_text.done", **at, content_index=0, text=part["text"], logprobs=[]
                ),
                self.events.event("response.content_part.done", **at, content_index=0, part=part),
            ]
        elif self.call is not None:
            item, self.call = function_call_item(self.call, self._item_status()), None
            events = [
                self.events.event(
                    "response.function_call_arguments.done", **self._at(item), arguments=item["arguments"]
                )
            ]
        else:
            return []
        events.append(
            self.events.event("response.output_item.done", output_index=len(self.output), item=item)
        )
        self.output.append(item)
        return events

    def _item_status(self) -> str:
        """An item closed before the end is complete; the last one shares the reply's fate."""
        return "completed" if self.status == "in_progress" else self.status
