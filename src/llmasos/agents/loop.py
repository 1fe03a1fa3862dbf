"""The agent loop: turns through the kernel under the agent's id, tools as checked system calls.

Each turn is a request named by the agent, so the kernel's agent features apply to it: its
KV-block quota, its priority class, and its context kept (pinned or swapped) while its tools run.
A turn's prompt is the previous turn's token ids, its output's token ids, then only the new
messages' tokens, so the next turn starts with exactly the tokens whose KV the kernel kept and
prefills only what is new (a re-rendered, re-tokenized conversation could differ at a boundary).

A tool call is a system call: it is checked against the allowed tools, run, written to the audit log
(the tool's name, the sha256 of its arguments, its duration and outcome; never the arguments or the
result), and its result passes the injection guard (`GuardPipeline.check_context`) before it joins
the prompt: a blocked result is replaced by a notice, a redacted one is passed on redacted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import pydantic

from llmasos.agents.functions import FunctionTool, ToolCall
from llmasos.errors import InvalidRequestError
from llmasos.outputs import RequestOutput, RequestOutputKind
from llmasos.safety import GuardPipeline, InjectionGuard, Policy
from llmasos.sampling_params import SamplingParams

audit_logger = logging.getLogger("llmasos.audit")
_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
WITHHELD = "[the tool's result was withheld: it reads as an instruction to the assistant]"


def hermes_tool_calls(text: str) -> list[ToolCall]:
    """Calls written as Hermes/Qwen do, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; the
    default until the per-family parsers of llmasos.tools are wired here (pass `parse=`)."""
    calls = []
    for i, match in enumerate(_CALL.finditer(text)):
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            arguments = obj.get("arguments")
            calls.append(ToolCall(obj["name"], arguments if isinstance(arguments, dict) else {}, f"call_{i}"))
    return calls


def tools_instructions(tools: Iterable[FunctionTool]) -> str:
    """The tools, for a system message (Hermes's wording), when the chat template takes none."""
    schemas = "\n".join(json.dumps(t.schema()["function"]) for t in tools)
    return (
        "You may call functions. Their signatures, one JSON object a line, are within <tools></tools>:\n"
        f"<tools>\n{schemas}\n</tools>\n"
        'To call one, write <tool_call>{"name": NAME, "arguments": {...}}</tool_call>.'
    )


class Generate(Protocol):
    """What runs a turn: AsyncLLM.generate's shape (prompt ids in, RequestOutputs out)."""

    def __call__(
        self, prompt: list[int], params: SamplingParams, *, request_id: str, agent: str
    ) -> AsyncIterator[RequestOutput]: ...


@dataclass
class TurnRecord:
    """One turn through the kernel: its prompt, how much of it the prefix cache served, its reply."""

    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    text: str
    calls: list[ToolCall]


@dataclass
class AgentRun:
    """A run's answer (the last turn's text), the conversation and the turns as the kernel ran them."""

    answer: str
    messages: list[dict]
    turns: list[TurnRecord] = field(default_factory=list)


class Agent:
    """`Agent(llm, tools=[get_weather], instructions="...")`, then `agent.run("question")` (or
    `await agent.arun(...)` on an AsyncLLM). `llm`: an LLM (its engine), an LLMEngine, or an AsyncLLM;
    `name`: the agent id the kernel knows it by (a fresh one if not given). `allowed_tools`: the names
    it may call (None: all its tools; a server passes the caller key's). `parse`: completion text ->
    tool calls. `audit`: takes each tool call's record (default: the "llmasos.audit" logger; a server
    passes `AuditLog.log_guard`). `guard`: the pipeline tool results pass (default: the injection guard).
    """

    def __init__(
        self,
        llm: Any,
        tools: Iterable[Callable[..., Any]] = (),
        instructions: str = "",
        *,
        name: str | None = None,
        allowed_tools: Iterable[str] | None = None,
        params: SamplingParams | None = None,
        max_turns: int = 8,
        parse: Callable[[str], list[ToolCall]] = hermes_tool_calls,
        audit: Callable[[dict], None] | None = None,
        guard: GuardPipeline | None = None,
    ):
        self.llm = llm
        self.engine = getattr(llm, "engine", llm)
        self.tools = {t.name: t for t in map(FunctionTool.from_function, tools)}
        self.instructions = instructions
        self.name = name or f"agent-{uuid.uuid4().hex[:8]}"
        self.allowed = set(self.tools if allowed_tools is None else allowed_tools)
        self.params = params or SamplingParams(temperature=0, max_tokens=256)
        self.max_turns = max_turns
        self.parse = parse
        self.audit = audit or (lambda record: audit_logger.info(json.dumps(record)))
        self.guard = guard or GuardPipeline([InjectionGuard()], Policy(default_action="block"))

    # -- running ----------------------------------------------------------------------------------
    def run(self, message: str) -> AgentRun:
        """Run on an LLM or LLMEngine, stepping its engine here (nothing else may step it meanwhile)."""
        return asyncio.run(self.arun(message, self._step_engine))

    async def arun(self, message: str, generate: Generate | None = None) -> AgentRun:
        """Run until a turn calls no tool (or max_turns), each tool in a thread so other agents'
        turns go on meanwhile. `generate`: default the AsyncLLM's."""
        generate = generate or self.llm.generate
        tokenizer = self.engine.tokenizer
        messages = [{"role": "system", "content": self._system()}] if self.tools or self.instructions else []
        messages.append({"role": "user", "content": message})
        run = AgentRun("", messages)
        text = tokenizer.apply_chat_template(messages)  # the prompt, whose tokens `prompt` are
        prompt = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(self.max_turns):
            out = await self._turn(generate, prompt)
            completion = out.outputs[0]
            calls = self.parse(completion.text)
            run.turns.append(
                TurnRecord(
                    len(prompt), out.num_cached_tokens, len(completion.token_ids), completion.text, calls
                )
            )
            messages.append({"role": "assistant", "content": completion.text})
            run.answer = completion.text
            if not calls:
                break
            for call in calls:
                messages.append({"role": "tool", "content": await asyncio.to_thread(self.call_tool, call)})
            written = text + tokenizer.decode(completion.token_ids, skip_special_tokens=False)
            text = tokenizer.apply_chat_template(messages)
            prompt = (  # the tokens whose KV the kernel kept, then only the new ones
                prompt
                + completion.token_ids
                + tokenizer.encode(text[len(written) :], add_special_tokens=False)
                if text.startswith(written)
                else tokenizer.encode(text, add_special_tokens=False)  # the template rewrote the reply
            )
        return run

    def _system(self) -> str:
        parts = [self.instructions] if self.instructions else []
        allowed = [t for name, t in self.tools.items() if name in self.allowed]
        return "\n\n".join(parts + ([tools_instructions(allowed)] if allowed else []))

    async def _turn(self, generate: Generate, prompt: list[int]) -> RequestOutput:
        request_id = f"{self.name}-{uuid.uuid4().hex[:8]}"
        params = dataclasses.replace(self.params, output_kind=RequestOutputKind.FINAL_ONLY)
        outputs = [out async for out in generate(prompt, params, request_id=request_id, agent=self.name)]
        if not outputs or not outputs[-1].finished:
            raise InvalidRequestError(f"the turn {request_id} of agent {self.name} ended without an output")
        return outputs[-1]

    async def _step_engine(
        self, prompt: list[int], params: SamplingParams, *, request_id: str, agent: str
    ) -> AsyncIterator[RequestOutput]:
        engine = self.engine
        engine.enqueue(engine.make_request(prompt, params, request_id, agent=agent))
        while True:
            for out in engine.step():
                if out.request_id == request_id and out.finished:
                    yield out
                    return

    # -- tool calls as system calls ---------------------------------------------------------------
    def call_tool(self, call: ToolCall) -> str:
        """Check, run, audit and guard one call; the text that joins the prompt as its result."""
        digest = hashlib.sha256(json.dumps(call.arguments, sort_keys=True).encode()).hexdigest()
        started = time.monotonic()
        tool = self.tools.get(call.name)
        if tool is None or call.name not in self.allowed:
            outcome, result = "denied", f"error: the tool {call.name!r} is not allowed here"
        else:
            try:
                result, outcome = tool.call(call.arguments), "ok"
            except pydantic.ValidationError as error:
                outcome, result = (
                    "invalid_arguments",
                    f"error: {error.error_count()} invalid arguments: {error}",
                )
            except Exception as error:  # a tool's failure is the model's to handle, not the loop's
                outcome, result = "error", f"error: {type(error).__name__}: {error}"
        verdict = self.guard.check_context(result)
        if verdict.action == "block":
            outcome, result = "blocked", WITHHELD
        elif verdict.action == "redact":
            result = verdict.text
        self.audit(
            {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "event": "tool",
                "agent": self.name,
                "tool": call.name,
                "arguments_sha256": digest,
                "duration_s": round(time.monotonic() - started, 6),
                "outcome": outcome,
            }
        )
        return result
