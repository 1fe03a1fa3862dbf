r"""The judge layer: a model from the store decides what the built-in lexicons can only guess.

ModelJudge runs a guard model (Llama Guard 3, or any decoder trusted as a judge) through the kernel
with Llama Guard 3's published prompt: the task line, the S1-S14 category block, the conversation
and the "Provide your safety assessment" instruction. When the model's chat template is Llama
Guard's own, the template renders it (the tokenizer knows the format the model was trained on).
Otherwise the same words are built here: as one user turn in the model's own chat template when it
has one (a general instruct model as judge), else in Llama 3's turn markers, as Meta's prompt
format gives them (a Llama Guard whose folder lost its template).

The answer is constrained in the sampler by a regex grammar to `safe` or `unsafe\nS<n>(,S<n>)*`
over the codes asked for, so it always parses. The score is P("unsafe") for the answer's first
tokens, the probability Meta recommends thresholding, from a scoring request (the prompt followed
by "unsafe", with prompt_logprobs) in the same batch as the answer. Llama Guard's templates end at
the assistant header, after which the model writes "\n\n" first; the judge appends those, so the
grammar and the score start at the verdict itself.

ClassifierJudge runs a user's text classifier from the store (BERT, RoBERTa with a head, on the
transformers engine): each label mapped to a category gives a finding scored by the head's own
probability for it.

Both are guards over the whole text (a judge says what a text is, not where): a finding spans it
all. Both batch: check_many(texts) is one batch. Neither has `holdback`, and a StreamGuard would
run the model at every check of a growing text, so judge a streamed output once it has ended.
A judge is handed a loaded model (a `llmasos.runtime.Backend`) or opens one by name with
`open_model`. The model steps in the caller's thread: one judge serves one thread at a time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.safety.findings import CATEGORIES, Finding
from llmasos.sampling_params import SamplingParams, StructuredOutputParams

if TYPE_CHECKING:
    from llmasos.runtime import Backend
    from llmasos.tokenizer import Tokenizer

Messages = list[dict]
Conversation = str | Messages

# code -> (category, its name in Llama Guard 3's prompt, which is shorter than the taxonomy's)
LLAMA_GUARD_3: dict[str, tuple[str, str]] = {
    "S1": ("violent_crimes", "Violent Crimes"),
    "S2": ("non_violent_crimes", "Non-Violent Crimes"),
    "S3": ("sex_crimes", "Sex Crimes"),
    "S4": ("child_exploitation", "Child Exploitation"),
    "S5": ("defamation", "Defamation"),
    "S6": ("specialized_advice", "Specialized Advice"),
    "S7": ("privacy", "Privacy"),
    "S8": ("intellectual_property", "Intellectual Property"),
    "S9": ("indiscriminate_weapons", "Indiscriminate Weapons"),
    "S10": ("hate", "Hate"),
    "S11": ("self_harm", "Self-Harm"),
    "S12": ("sexual_content", "Sexual Content"),
    "S13": ("elections", "Elections"),
    "S14": ("code_interpreter_abuse", "Code Interpreter Abuse"),
}
LLAMA_GUARD_TEMPLATE_MARK = "<BEGIN UNSAFE CONTENT CATEGORIES>"  # in Llama Guard's chat templates
LLAMA3_USER = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
LLAMA3_ASSISTANT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
_ROLES = {"user": "User", "assistant": "Agent"}
# P("unsafe" | prompt): a one-token request that scores its prompt, as runtime.scoring does
_SCORE = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, ignore_eos=True)


def guard_instruction(messages: Messages, codes: Sequence[str]) -> str:
    """Llama Guard 3's instruction for `messages` (alternating user/assistant) over `codes`."""
    role = _ROLES[messages[-1]["role"]]
    categories = "\n".join(f"{code}: {LLAMA_GUARD_3[code][1]}." for code in codes)
    conversation = "".join(f"{_ROLES[m['role']]}: {m['content'].strip()}\n\n" for m in messages)
    return (
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according our "
        "safety policy with the below categories.\n\n"
        f"<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
        f"<BEGIN CONVERSATION>\n\n{conversation}<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
        " - First line must read 'safe' or 'unsafe'.\n"
        " - If unsafe, a second line must include a comma-separated list of violated categories."
    )


def guard_prompt(
    tokenizer: Tokenizer, conversation: Conversation, codes: Sequence[str] = tuple(LLAMA_GUARD_3)
) -> str:
    """The judge's prompt for `conversation` (a text, taken as the user's message, or alternating
    user/assistant messages whose last one is judged), ending where the verdict begins."""
    messages = _messages(conversation)
    template = tokenizer.chat_template or ""
    if LLAMA_GUARD_TEMPLATE_MARK in template:
        excluded = [code for code in LLAMA_GUARD_3 if code not in codes]  # Llama Guard 3 1B's option
        prompt = tokenizer.apply_chat_template(messages, excluded_category_keys=excluded)
        last = messages[-1]
        if f"{_ROLES[last['role']]}: {last['content'].strip()}" not in prompt:  # 1B's reads typed parts
            parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in messages]
            prompt = tokenizer.apply_chat_template(parts, excluded_category_keys=excluded)
    elif template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": guard_instruction(messages, codes)}]
        )
    else:
        prompt = LLAMA3_USER + guard_instruction(messages, codes) + LLAMA3_ASSISTANT
    return prompt + "\n\n" if prompt.endswith("<|end_header_id|>") else prompt


def verdict_regex(codes: Sequence[str]) -> str:
    """`safe`, or `unsafe` and a line of at most len(codes) comma-separated codes from `codes`."""
    code = "(?:" + "|".join(sorted(codes, key=len, reverse=True)) + ")"
    return f"safe|unsafe\\n{code}(?:,{code}){{0,{len(codes) - 1}}}"


@dataclass(frozen=True)
class Assessment:
    """A judge's answer on one conversation: the model's `output` ("safe", or "unsafe" and the
    violated codes), those codes and their categories, and `score`, P("unsafe") as its first tokens."""

    output: str
    codes: tuple[str, ...]
    score: float

    @property
    def unsafe(self) -> bool:
        return bool(self.codes)

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(LLAMA_GUARD_3[code][0] for code in self.codes)


class ModelJudge:
    """A guard model from the store as a judge (see the module docstring). `categories` limits the
    taxonomy to some codes ("S1") or category names ("violent_crimes"): the prompt lists only those
    (but Llama Guard 3 8B's own template, which always lists all 14) and the grammar allows only
    those. `config` holds EngineConfig fields for loading `model` by name."""

    def __init__(
        self,
        model: Backend | str,
        categories: Sequence[str] | None = None,
        name: str = "judge",
        **config: object,
    ):
        self.model = _load(model, config)
        if self.model.kind != "decoder":
            raise InvalidRequestError(
                f"a ModelJudge runs a decoder on the kernel, and {self.model.name} is a {self.model.kind} "
                "model; a text classifier with its own head is judged by ClassifierJudge"
            )
        self.name = name
        self.codes = _codes(categories)
        self.categories = tuple(LLAMA_GUARD_3[code][0] for code in self.codes)
        self.pattern = verdict_regex(self.codes)
        # the longest answer the grammar allows, a token at least a character each, and EOS
        longest = len("unsafe\n") + len(self.codes) * (max(map(len, self.codes)) + 1)
        self.params = SamplingParams(
            temperature=0, max_tokens=longest, structured_output=StructuredOutputParams(regex=self.pattern)
        )
        self._unsafe_ids = self.model.tokenizer.encode("unsafe", add_special_tokens=False)

    def prompt(self, conversation: Conversation) -> str:
        return guard_prompt(self.model.tokenizer, conversation, self.codes)

    def prompt_ids(self, conversation: Conversation) -> list[int]:
        """The prompt's tokens: without added special tokens, as transformers tokenizes a rendered
        chat (Llama Guard's template writes its own <|begin_of_text|>)."""
        ids = self.model.tokenizer.encode(self.prompt(conversation), add_special_tokens=False)
        room = self.model.max_model_len - self.params.max_tokens
        if len(ids) > room:
            raise InvalidRequestError(
                f"the judge's prompt for this text has {len(ids)} tokens, but {self.model.name}'s context "
                f"leaves room for {room} next to the verdict; judge the text in shorter pieces"
            )
        return ids

    def assess(self, conversations: Sequence[Conversation]) -> list[Assessment]:
        """One batch: each conversation's answer and, as a second request, its P("unsafe")."""
        prompts = [self.prompt_ids(c) for c in conversations]
        if not prompts:
            return []
        scoring = [ids + self._unsafe_ids for ids in prompts]
        outputs = self.model.generate(
            prompts + scoring, [self.params] * len(prompts) + [_SCORE] * len(scoring)
        )
        answers, scores = outputs[: len(prompts)], outputs[len(prompts) :]
        return [
            self._assessment(answer.outputs[0].text, scored.prompt_logprobs[len(ids) :])
            for ids, answer, scored in zip(prompts, answers, scores)
        ]

    def check(self, text: str) -> list[Finding]:
        return self.check_many([text])[0]

    def check_many(self, texts: Sequence[str]) -> list[list[Finding]]:
        """Per text, one finding per violated category, scored P("unsafe"), over the whole text."""

        def judge(batch: list[str]) -> list[list[Finding]]:
            return [
                [Finding(category, 0, len(text), a.score, self.name) for category in a.categories]
                for text, a in zip(batch, self.assess(batch))
            ]

        return _per_text(texts, judge)

    def _assessment(self, output: str, unsafe_logprobs: list[dict[int, float]]) -> Assessment:
        if not re.fullmatch(self.pattern, output):
            raise LLMasOSError(
                f"the judge's answer {output!r} escaped its grammar {self.pattern!r}; "
                "this is a bug in structured output, please report it"
            )
        codes = tuple(dict.fromkeys(output.split("\n")[1].split(","))) if output != "safe" else ()
        logprob = sum(entry[token] for entry, token in zip(unsafe_logprobs, self._unsafe_ids))
        return Assessment(output, codes, math.exp(logprob))


class ClassifierJudge:
    """A text classifier from the store as a judge: `labels` maps some of its head's labels to
    categories (e.g. {"toxic": "hate"}), and each mapped label's probability scores a finding."""

    def __init__(
        self, model: Backend | str, labels: Mapping[str, str], name: str = "classifier", **config: object
    ):
        self.model = _load(model, config)
        if self.model.kind != "classifier":
            raise InvalidRequestError(
                f"a ClassifierJudge runs a text classifier with its own head, and {self.model.name} is a "
                f"{self.model.kind} model; a decoder (Llama Guard) is judged by ModelJudge"
            )
        head = list(self.model.labels)
        unknown = sorted(set(labels) - set(head))
        if not labels or unknown:
            raise InvalidRequestError(
                f"{self.model.name}'s labels are {head}; map some of them to categories, "
                f"e.g. {{{head[-1]!r}: 'hate'}}" + (f" ({unknown} are not among them)" if unknown else "")
            )
        wrong = sorted(set(labels.values()) - CATEGORIES.keys())
        if wrong:
            raise InvalidRequestError(
                f"unknown categories {wrong}; known categories: {', '.join(CATEGORIES)}"
            )
        self.name = name
        self.labels = dict(labels)
        self.categories = tuple(dict.fromkeys(self.labels.values()))

    def check(self, text: str) -> list[Finding]:
        return self.check_many([text])[0]

    def check_many(self, texts: Sequence[str]) -> list[list[Finding]]:
        def judge(batch: list[str]) -> list[list[Finding]]:
            return [
                [
                    Finding(category, 0, len(text), scores[label], self.name)
                    for label, category in self.labels.items()
                ]
                for text, scores in zip(batch, self.model.classify(batch))
            ]

        return _per_text(texts, judge)


def _per_text(texts: Sequence[str], judge: Callable[[list[str]], list[list[Finding]]]) -> list[list[Finding]]:
    """judge() on the texts that have any, in one batch; a blank text has nothing to find."""
    batch = [text for text in texts if text.strip()]
    judged = iter(judge(batch) if batch else [])
    return [next(judged) if text.strip() else [] for text in texts]


def _load(model: Backend | str, config: Mapping[str, object]) -> Backend:
    """The model to judge with: opened by name with `config` (EngineConfig fields), or as given."""
    from llmasos.config import EngineConfig
    from llmasos.runtime import open_model

    if isinstance(model, str):
        return open_model(model, EngineConfig(**config))
    if config:
        raise InvalidRequestError(
            f"engine settings {sorted(config)} apply when the judge loads a model by name; "
            "this model is loaded already"
        )
    return getattr(model, "backend", model)  # an LLM hands over its backend


def _codes(categories: Sequence[str] | None) -> tuple[str, ...]:
    """Codes in taxonomy order, from codes or category names."""
    if categories is None:
        return tuple(LLAMA_GUARD_3)
    by_name = {category: code for code, (category, _) in LLAMA_GUARD_3.items()}
    codes = set()
    for given in categories:
        code = given if given in LLAMA_GUARD_3 else by_name.get(given)
        if code is None:
            raise InvalidRequestError(
                f"unknown hazard category {given!r}; use S1..S14 or one of {', '.join(by_name)}"
            )
        codes.add(code)
    if not codes:
        raise InvalidRequestError(
            "a judge needs at least one hazard category; leave categories out for all 14"
        )
    return tuple(code for code in LLAMA_GUARD_3 if code in codes)


def _messages(conversation: Conversation) -> Messages:
    if isinstance(conversation, str):
        return [{"role": "user", "content": conversation}]
    roles = [m.get("role") if isinstance(m, dict) else None for m in conversation]
    alternating = [("user", "assistant")[i % 2] for i in range(len(roles))]
    if not roles or roles != alternating or not all(isinstance(m.get("content"), str) for m in conversation):
        raise InvalidRequestError(
            "a conversation to judge is a text, or messages {'role', 'content'} that alternate user and "
            f"assistant from the user's on (the last one is judged); got roles {roles}"
        )
    return list(conversation)
