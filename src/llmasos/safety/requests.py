"""Guards around one request: its prompts checked before they run, each output choice guarded as
it grows, every verdict handed to the audit log. Shared by the server and by `LLM(guards=...)`,
so the two agree to the character; nothing here knows HTTP (the gateway turns a blocked prompt
into the 400 the API documents).

    guards = Guards.load("policy.yaml")  # once: the detectors, the policies, the vault
    request = guards.request(model, key, request_id, tokenizer, audit=audit_log.log_guard)
    prompts = request.check_prompts(prompts)  # ContentFilterError when the policy blocks one
    out = request.rewrite(prompt_index, out)  # per engine output: text shown so far, finish_reason
    out = request.rewrite(prompt_index, out, delta=True)  # or, for DELTA outputs: text newly shown

Outputs are guarded incrementally, streamed or not, with one `StreamGuard` per choice: a blocked
choice ends at once with finish_reason "content_filter" (the text before the blocked span shown),
and a request whose choices are all blocked can be stopped in the engine. Under a `reversible`
policy the placeholders that this request's own prompt values became are turned back into those
values in its output: the caller gets back what it sent, never what another key sent and never
what the model produced and the policy redacted.

Prompts are checked in a thread by the server (a long prompt is milliseconds of pure Python);
output guarding stays on the event loop: a step feeds a few characters, which costs microseconds
at the median and a few milliseconds at the 99th percentile on long lines (`llmasos bench
guards`), and a thread would not give that time back to the loop, the work being pure Python
under the GIL.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.outputs import CompletionOutput, RequestOutput
from llmasos.safety import Guard, GuardPipeline, PolicySet, StreamGuard, Vault, Verdict, default_guards
from llmasos.sampling_params import SamplingParams
from llmasos.tokenizer import Tokenizer

Prompt = str | list[int] | list[dict]  # text, token ids, or a conversation (chat messages)
ANONYMOUS = "(no key)"  # the vault owner of requests without a key: no key name has parentheses
CONTENT_FILTER = "content_filter"
log = logging.getLogger("llmasos.guards")


def log_record(record: dict) -> None:
    """The audit of `LLM(guards=...)`, which has no audit file: one record per verdict on the
    "llmasos.guards" logger, the record itself in `extra={"audit": record}` for handlers."""
    log.info("guard verdict %s", json.dumps(record), extra={"audit": record})


def is_conversation(prompt: Prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict)


def _content(message: dict) -> str:
    content = message.get("content")
    if not isinstance(content, str):
        raise InvalidRequestError(
            f"the guards read a message's content as text, and a {message.get('role')!r} message has "
            f"{type(content).__name__}: give its content as a string"
        )
    return content


class ContentFilterError(InvalidRequestError):
    """A prompt that the guard policy blocks; the message names the categories, never the text."""

    def __init__(self, categories: Sequence[str], prompt_index: int | None = None):
        self.categories = tuple(categories)
        where = "this input" if prompt_index is None else f"prompt {prompt_index}"
        super().__init__(
            f"the guard policy blocks {where}: it contains {', '.join(self.categories)}; "
            "remove that and send it again"
        )


class Guards:
    """The detectors (shared by every request: they keep no per-request state), the policies and
    the vault of reversible placeholders, for the life of a server or an `LLM`."""

    def __init__(
        self, policies: PolicySet, detectors: Sequence[Guard] | None = None, vault: Vault | None = None
    ):
        self.policies = policies
        self.detectors = tuple(default_guards() if detectors is None else detectors)
        self.vault = vault or Vault()

    @classmethod
    def load(cls, policy: PolicySet | Path | str | None) -> Guards | None:
        """Guards under a PolicySet or a policy file (YAML, or JSON); None for None: no guards."""
        if policy is None:
            return None
        if isinstance(policy, str | Path):
            policy = PolicySet.load(policy)
        if not isinstance(policy, PolicySet):
            raise LLMasOSError(
                f"guards must be a PolicySet or the path of a policy file, got {type(policy).__name__}"
            )
        return cls(policy)

    def request(
        self,
        model: str,
        key: str | None,
        request_id: str,
        tokenizer: Tokenizer,
        audit: Callable[[dict], None] = log_record,
    ) -> RequestGuard:
        """The guards of one request: the policy of its key (name), else of its model."""
        owner = ANONYMOUS if key is None else key
        policy = self.policies.policy_for(model=model, key=key)
        pipeline = GuardPipeline(self.detectors, policy, vault=self.vault, owner=owner)
        return RequestGuard(
            pipeline,
            tokenizer,
            lambda verdict: audit(verdict.audit_record(key, request_id)),
            self.vault,
            owner,
        )


@dataclasses.dataclass
class _Choice:
    """One output choice: its stream guard, how much engine text it was fed, what it shows."""

    stream: StreamGuard
    fed: int = 0
    shown: str = ""
    held: str = ""  # guarded text ending in what may be the start of a placeholder to restore
    done: bool = False
    token_ids: list[int] | None = None  # of `shown`, once done, when it differs from the output


class RequestGuard:
    """One request's guards: its pipeline (the policy of its key or model), its choices' streams,
    the placeholders of its prompt values, and where its verdicts go."""

    def __init__(
        self,
        pipeline: GuardPipeline,
        tokenizer: Tokenizer,
        audit: Callable[[Verdict], None],
        vault: Vault,
        owner: str,
    ):
        self.pipeline, self.tokenizer, self.audit = pipeline, tokenizer, audit
        self.vault, self.owner = vault, owner
        policy = pipeline.policy
        # a policy that allows everything only audits: its outputs pass unchanged, as they stream
        self.acts_on_output = any(a != "allow" for a in (policy.default_action, *policy.actions.values()))
        self.choices: dict[tuple[int, int], _Choice] = {}
        self.originals: dict[str, str] = {}  # reversible placeholder -> the prompt value it hides
        self._placeholders: re.Pattern | None = None

    def check_params(self, params: SamplingParams | Sequence[SamplingParams] | None) -> None:
        """Logprobs name the generated tokens, the redacted and held-back ones too: refused when
        the policy may change an output."""
        wanted = [params] if isinstance(params, SamplingParams) else list(params or [])
        if self.acts_on_output and any(p.logprobs is not None for p in wanted):
            raise InvalidRequestError(
                "logprobs are not available under this guard policy: they would show the output "
                "tokens the guards redact or hold back; ask without logprobs"
            )

    def check_prompts(self, prompts: Sequence[Prompt]) -> list[Prompt]:
        """The prompts as the model may see them, redacted where the policy says so. Token ids are
        checked as the text they decode to; a conversation message by message, before its chat
        template is applied (whose delimiters would read as injected ones), a tool's result as
        context (`GuardPipeline.check_context`). Every verdict is audited; ContentFilterError if
        one blocks."""
        checked, blocked = [], []
        for index, prompt in enumerate(prompts):
            guarded, verdicts = self._check_prompt(prompt)
            checked.append(guarded)
            categories = sorted({c for v in verdicts for c, a in v.actions.items() if a == "block"})
            if categories:
                blocked.append((index, categories))
        if blocked:
            categories = sorted({c for _, cs in blocked for c in cs})
            raise ContentFilterError(categories, blocked[0][0] if len(prompts) > 1 else None)
        return checked

    def rewrite(self, prompt_index: int, out: RequestOutput, delta: bool = False) -> RequestOutput:
        """`out` as the caller may see it: each choice's text guarded so far, "content_filter" as
        the finish_reason of a blocked choice; finished once every choice is finished or blocked.

        With `delta`, `out` is a DELTA output (each choice's new text) and so is the result: the
        text newly safe to show. Where the policy may change outputs, its token ids are then those
        of that text (never those of a held-back or redacted value), and it has no logprobs."""
        rewrite = self._rewrite_delta if delta else self._rewrite
        completions = [rewrite(prompt_index, c) for c in out.outputs]
        finished = all(c.finish_reason is not None for c in completions)
        return dataclasses.replace(out, outputs=completions, finished=finished)

    def close(self) -> None:
        """Audit the choices that never finished (client gone, timeout): what was fed so far."""
        for choice in self.choices.values():
            if not choice.done:
                choice.done = True
                self.audit(choice.stream.verdict())

    def _choice(self, prompt_index: int, completion: CompletionOutput) -> _Choice:
        key = (prompt_index, completion.index)
        if key not in self.choices:
            self.choices[key] = _Choice(StreamGuard(self.pipeline))
        return self.choices[key]

    def _rewrite_delta(self, prompt_index: int, completion: CompletionOutput) -> CompletionOutput:
        choice = self._choice(prompt_index, completion)
        shown = ""
        if not choice.done:
            shown = self._feed(choice, completion.text, final=completion.finish_reason is not None)
        if not self.acts_on_output:
            return completion
        finish = CONTENT_FILTER if choice.stream.blocked else completion.finish_reason
        if shown == completion.text:  # nothing held back or redacted: the delta's own tokens stand
            return dataclasses.replace(completion, finish_reason=finish)
        return dataclasses.replace(
            completion,
            text=shown,
            token_ids=self.tokenizer.encode(shown, add_special_tokens=False) if shown else [],
            finish_reason=finish,
            logprobs=None,
            cumulative_logprob=None,
        )

    def _rewrite(self, prompt_index: int, completion: CompletionOutput) -> CompletionOutput:
        choice = self._choice(prompt_index, completion)
        if not choice.done:
            delta, choice.fed = completion.text[choice.fed :], len(completion.text)
            choice.shown += self._feed(choice, delta, final=completion.finish_reason is not None)
            if choice.done and choice.shown != completion.text:
                # the generated tokens spell what was redacted: give those of the text shown
                choice.token_ids = self.tokenizer.encode(choice.shown, add_special_tokens=False)
        if not self.acts_on_output:
            return completion
        finish = CONTENT_FILTER if choice.stream.blocked else completion.finish_reason
        if choice.shown == completion.text:
            return dataclasses.replace(completion, finish_reason=finish)
        return dataclasses.replace(
            completion,
            text=choice.shown,
            token_ids=completion.token_ids if choice.token_ids is None else choice.token_ids,
            finish_reason=finish,
            logprobs=None,
            cumulative_logprob=None,
        )

    def _feed(self, choice: _Choice, delta: str, final: bool) -> str:
        """Feed the choice's new text to its stream guard; the text now safe to show."""
        safe = choice.stream.feed(delta) if delta else ""
        final = final or choice.stream.blocked
        if final:
            safe += choice.stream.finish()
        shown = self._restore(choice, safe, final)
        if final:
            choice.done = True
            self.audit(choice.stream.verdict())
        return shown

    def _check_prompt(self, prompt: Prompt) -> tuple[Prompt, list[Verdict]]:
        if is_conversation(prompt):
            verdicts = [self._check(_content(m), context=m.get("role") == "tool") for m in prompt]
            messages = [
                {**m, "content": v.text} if v.action == "redact" else m for m, v in zip(prompt, verdicts)
            ]
            return messages, verdicts
        text = prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt, skip_special_tokens=False)
        verdict = self._check(text)
        return (verdict.text if verdict.action == "redact" else prompt), [verdict]

    def _check(self, text: str, context: bool = False) -> Verdict:
        verdict = self.pipeline.check_context(text) if context else self.pipeline.check_input(text)
        self.audit(verdict)
        if verdict.action == "redact" and self.pipeline.policy.redaction == "reversible":
            self._remember(text, verdict)
        return verdict

    def _remember(self, text: str, verdict: Verdict) -> None:
        """The placeholders this prompt's values became (the vault gives a value the same one
        again), so that they, and only they, are restored in this request's output."""
        for span in self.pipeline.spans(verdict.findings):
            if span.action != "allow":
                value = text[span.start : span.end]
                self.originals[self.vault.placeholder(self.owner, span.category, value)] = value
        self._placeholders = re.compile("|".join(map(re.escape, self.originals)))

    def _restore(self, choice: _Choice, safe: str, final: bool) -> str:
        """`safe` with this request's placeholders restored; the start of one that the next text
        may complete is held back, so a streamed placeholder is never shown half restored."""
        if self._placeholders is None:
            return safe
        text = choice.held + safe
        cut = len(text)
        start = text.rfind("<")
        if not final and start >= 0:
            tail = text[start:]
            if any(len(tail) < len(p) and p.startswith(tail) for p in self.originals):
                cut = start
        choice.held = text[cut:]
        return self._placeholders.sub(lambda m: self.originals[m.group()], text[:cut])
