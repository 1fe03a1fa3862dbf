"""The agent loop: turns through the kernel under the agent's id, tools as checked system calls.

Function calling is llmasos.tools', as for `LLM.chat` and the server: the tools reach the chat
template's `tools` variable (or a system message, for a template without one), the reply is read by
the model family's call parser, and a "required", named or `strict` choice decodes under the tools'
grammar. Each turn is a request named by the agent, so the kernel's agent features apply to it: its
KV-block quota, its priority class, and its context kept (pinned or swapped) while its tools run.

A turn's prompt is the previous turn's token ids, its output's token ids, then only the new
messages' tokens, so the next turn starts with exactly the tokens whose KV the kernel kept and
prefills only what is new (a re-rendered, re-tokenized conversation could differ at a boundary). So
the prompt is rendered from the conversation as the kernel holds it, each reply as the model wrote it
(its calls in its own markup and spacing); `AgentRun.messages` holds the conversation in OpenAI's
shape, each reply's calls as `tool_calls`.

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
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from typing import Any, Protocol

import pydantic

from llmasos.agents.functions import FunctionTool
from llmasos.errors import InvalidRequestError
from llmasos.outputs import CompletionOutput, RequestOutput, RequestOutputKind, ToolCall
from llmasos.safety import GuardPipeline, InjectionGuard, Policy
from llmasos.sampling_params import SamplingParams
from llmasos.tools import ToolPlan, ToolRequest, render_chat, tool_format

audit_logger = logging.getLogger("llmasos.audit")
WITHHELD = "[the tool's result was withheld: it reads as an instruction to the assistant]"


class Generate(Protocol):
    """What runs a turn: AsyncLLM.generate's shape (prompt ids in, RequestOutputs out)."""

    def __call__(
        self, prompt: list[int], params: SamplingParams, *, request_id: str, agent: str
    ) -> AsyncIterator[RequestOutput]: ...


@dataclass
class TurnRecord:
    """One turn through the kernel: its prompt, how much of it the prefix cache served, its reply
    (`text`: the content, without the calls)."""

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
    or shell patterns of the tools it may call, the only ones the model is shown (None: all its
    tools; a server passes the caller key's `ApiKey.tools`). `tool_choice`, `parallel_tool_calls`:
    OpenAI's ("required" or a named function decode under the tools' grammar, every turn); `strict`:
    constrain the calls' arguments to their schemas under "auto" too. `tool_call_parser`: the call
    format (llmasos.tools.FORMATS) where the chat template's own is not the one wanted. `parse`:
    completion text -> tool calls, in place of the format's parser (a script, for tests and
    benchmarks whose model does not call tools). `audit`: takes each tool call's record (default:
    the "llmasos.audit" logger; a server passes `AuditLog.log_guard`). `guard`: the pipeline tool
    results pass (default: the injection guard).
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
        tool_choice: str | dict = "auto",
        parallel_tool_calls: bool = True,
        strict: bool = False,
        tool_call_parser: str | None = None,
        parse: Callable[[str], list[ToolCall]] | None = None,
        audit: Callable[[dict], None] | None = None,
        guard: GuardPipeline | None = None,
    ):
        self.llm = llm
        self.engine = getattr(llm, "engine", llm)
        self.tools = {t.name: t for t in map(FunctionTool.from_function, tools)}
        self.instructions = instructions
        self.name = name or f"agent-{uuid.uuid4().hex[:8]}"
        self.allowed = list(self.tools if allowed_tools is None else allowed_tools)
        offered = [tool.schema(strict) for name, tool in self.tools.items() if self.allows(name)]
        self.request = ToolRequest.from_openai(offered, tool_choice, parallel_tool_calls)
        self.tool_call_parser = tool_call_parser
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
        fmt = tool_format(tokenizer, self.tool_call_parser)
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages.append({"role": "user", "content": message})
        held = list(messages)  # the conversation as the kernel holds it: each reply as written
        run = AgentRun("", messages)
        text, plan = render_chat(tokenizer, held, self.request, fmt)  # the prompt, whose tokens `prompt` are
        params = plan.sampling_params(self.params) if plan else self.params
        prompt = tokenizer.encode(text, add_special_tokens=False)
        for _ in range(self.max_turns):
            out = await self._turn(generate, prompt, params)
            written = out.outputs[0]
            reply = self._read(written, plan)
            calls = reply.tool_calls or []
            run.turns.append(
                TurnRecord(len(prompt), out.num_cached_tokens, len(written.token_ids), reply.text, calls)
            )
            messages.append(_assistant(reply.text, calls))
            held.append({"role": "assistant", "content": written.text})
            run.answer = reply.text
            if not calls:
                break
            for call in calls:
                result = await asyncio.to_thread(self.call_tool, call)
                for conversation in (messages, held):
                    conversation.append(
                        {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result}
                    )
            kept = text + tokenizer.decode(written.token_ids, skip_special_tokens=False)
            text, _ = render_chat(tokenizer, held, self.request, fmt)
            prompt = (  # the tokens whose KV the kernel kept, then only the new ones
                prompt + written.token_ids + tokenizer.encode(text[len(kept) :], add_special_tokens=False)
                if text.startswith(kept)
                else tokenizer.encode(text, add_special_tokens=False)  # the template rewrote the reply
            )
        return run

    def _read(self, completion: CompletionOutput, plan: ToolPlan | None) -> CompletionOutput:
        """The reply with its calls parsed out (by `parse` if given, else the format's parser)."""
        if self.parse is not None:
            return dataclasses.replace(completion, tool_calls=self.parse(completion.text) or None)
        return plan.read(completion) if plan else completion

    async def _turn(self, generate: Generate, prompt: list[int], params: SamplingParams) -> RequestOutput:
        request_id = f"{self.name}-{uuid.uuid4().hex[:8]}"
        params = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
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
    def allows(self, tool: str) -> bool:
        """Whether the agent may call `tool`: a name or shell pattern of `allowed_tools` matches it."""
        return any(fnmatchcase(tool, pattern) for pattern in self.allowed)

    def call_tool(self, call: ToolCall) -> str:
        """Check, run, audit and guard one call; the text that joins the prompt as its result."""
        digest = hashlib.sha256(_canonical(call.arguments).encode()).hexdigest()
        started = time.monotonic()
        tool = self.tools.get(call.name)
        if tool is None or not self.allows(call.name):
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


def _assistant(content: str, calls: list[ToolCall]) -> dict:
    """A reply as OpenAI's history holds it: its content, and its calls as `tool_calls`."""
    if not calls:
        return {"role": "assistant", "content": content}
    return {
        "role": "assistant",
        "content": content or None,
        "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls
        ],
    }


def _canonical(arguments: str) -> str:
    """The arguments' JSON with sorted keys, so one call digests alike however it was spaced; the text
    itself when it is not JSON."""
    try:
        return json.dumps(json.loads(arguments), sort_keys=True)
    except ValueError:
        return arguments
