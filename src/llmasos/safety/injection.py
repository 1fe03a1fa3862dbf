"""The built-in prompt-injection and jailbreak guard: the known families of attack, as patterns.

Direct injection comes in the user's own message; indirect injection hides in text the model is
given to read (a retrieved page, an e-mail, a tool's result) and addresses the model from there.
The families, each a few signals below:

- override: "ignore all previous instructions", "new instructions:", "your real task is";
- exfiltration: "reveal your system prompt", "repeat the text above starting with 'You are'";
- delimiters: fake chat-template tokens and tags ("<|im_start|>system", "</system>", "[INST]",
  "### Instruction:") that try to end the user's turn and open a system one;
- jailbreak personas: DAN ("do anything now"), developer mode, "an unfiltered AI without
  restrictions", the deceased-grandmother story;
- encoded payloads: base64 runs that decode to text are decoded and checked again (base64 of
  base64 too, to MAX_DEPTH); a finding inside becomes one over the encoded run, its score raised
  by ENCODED since hiding an instruction is itself a sign;
- addressed to the assistant: "Note to the AI:", "Assistant, you must now call ...", "do not tell
  the user", "send the conversation to ..." — ordinary in a user's own message, an attack in a
  document.

Each signal has two weights: one for the user's input (`check`) and one for retrieved or tool text
(`check_context`). A user may say "assistant, you must answer in French"; a web page has no business
addressing the assistant at all, so the same words weigh far more there. The signals that match in
one sentence combine by noisy-OR (1 - prod(1 - w)), as independent pieces of evidence; a finding
spans the sentence, so redacting it removes the instruction along with its trigger.

Why not a library: LLM Guard's and Rebuff's detectors, like Meta's Prompt Guard, are downloaded
classifiers or services, and this layer must work offline with no model. A classifier such as
Prompt Guard plugs in as a judge.ClassifierJudge (labels INJECTION and JAILBREAK mapped here).
"""

from __future__ import annotations

import base64
import binascii
import functools
import math
import re
from dataclasses import dataclass

from llmasos.safety.content import sentence_spans
from llmasos.safety.findings import Finding

MAX_DEPTH = 2  # base64 inside base64, and no deeper
ENCODED = 0.3  # what hiding a finding in base64 adds to its score (noisy-OR)
BASE64 = re.compile(r"(?<![\w+/=-])[A-Za-z0-9+/_-]{16,}={0,2}(?![\w+/=-])")
_ASSISTANT = r"(?:ai|assistant|chatbot|language model|llm|gpt|agent|bot|claude|chatgpt|copilot)"
_QUALIFIER = (
    r"(?:all|any|every|each|previous|prior|above|earlier|preceding|foregoing|original|initial|system|"
    r"your|existing|these|those|former|old|developer)"
)
_RULES = (
    r"(?:instructions?|directions?|directives?|rules|guidelines|prompts?|commands?|context|constraints|"
    r"programming|training|orders|polic(?:y|ies)|guardrails|safeguards)"
)


@dataclass(frozen=True)
class Signal:
    """One pattern of attack and what it weighs in the user's input and in retrieved/tool text."""

    category: str
    pattern: re.Pattern
    user: float
    context: float


def _signal(category: str, user: float, context: float, pattern: str) -> Signal:
    return Signal(category, re.compile(pattern, re.IGNORECASE), user, context)


SIGNALS: tuple[Signal, ...] = (
    # override
    _signal("prompt_injection", 0.9, 0.95,
        rf"\b(?:ignore|disregard|forget|override|overrule|skip|bypass|discard|abandon|neglect)\s+"
        rf"(?:\w+\s+){{0,3}}?{_QUALIFIER}\s+(?:\w+\s+){{0,2}}?{_RULES}\b"),
    _signal("prompt_injection", 0.85, 0.9,
        r"\b(?:ignore|disregard|forget)\s+(?:everything|all)\s+(?:above|before|previously|"
        r"you(?:'ve| have)? (?:were |been )?told)\b"),
    _signal("prompt_injection", 0.6, 0.8,
        r"\bnew (?:instructions?|task|rules|system prompt|directives?)\s*:"),
    _signal("prompt_injection", 0.4, 0.7,
        r"\bfrom now on\b[^.?!\n]{0,30}\b(?:you (?:are|will|must|shall)|act|respond|reply|answer|"
        r"ignore|pretend)\b"),
    _signal("prompt_injection", 0.75, 0.85,
        r"\b(?:your|the) (?:real|true|actual|new) (?:instructions?|task|goal|purpose|objective|job) "
        r"(?:is|are)\b"),
    # exfiltration of the system prompt
    _signal("prompt_injection", 0.85, 0.9,
        r"\b(?:reveal|show|print|display|output|repeat|recite|leak|dump|write out|spell out|give|tell|"
        r"share|list)\s+(?:me\s+|us\s+)?(?:(?:all|your|the|of|exact|full|entire|complete|verbatim|"
        r"original|initial|hidden|secret|confidential|internal|current)\s+){1,4}(?:system|initial|"
        r"original|hidden|secret|developer|internal|confidential)\s*(?:prompt|instructions|message|rules|"
        r"guidelines)s?\b"),
    _signal("prompt_injection", 0.8, 0.85,
        r"\bwhat(?:'s| is| are| were)\s+your\s+(?:(?:exact|full|original|initial|hidden|secret)\s+)*"
        r"system\s+(?:prompt|instructions)\b"),
    _signal("prompt_injection", 0.45, 0.6, r"\bwhat(?:'s| is| are| were)\s+your\s+(?:prompt|instructions)\b"),
    _signal("prompt_injection", 0.85, 0.9,
        r"\brepeat\s+(?:(?:all|everything|the|of|words|text|content|instructions|lines|that|is|was|"
        r"written)\s+){1,4}(?:above|before|preceding|prior)\b|\b(?:everything|all|text|words)\s+"
        r"(?:above|before)\s+(?:this|the)\s+(?:line|message|point)\b"),
    _signal("prompt_injection", 0.6, 0.7, r"\b(?:start|begin)(?:ning)?\s+(?:with|from)\s+['\"]?you are\b"),
    _signal("prompt_injection", 0.6, 0.8,
        r"\bwhat (?:were|are) you (?:told|instructed|programmed|prompted)\b"),
    # delimiters and fake chat-template tokens
    _signal("prompt_injection", 0.9, 0.9,
        r"<\|(?:im_start|im_end|system|assistant|user|endoftext|eot_id|start_header_id|end_header_id|"
        r"begin_of_text)\|>"),
    _signal("prompt_injection", 0.8, 0.7,
        r"</?\s*(?:system|assistant|instructions?|sys|admin|developer|system_prompt)\s*>"),
    _signal("prompt_injection", 0.85, 0.85, r"(?-i:\[/?INST\]|<</?SYS>>)"),
    _signal("prompt_injection", 0.6, 0.6,
        r"(?m)^[ \t]*#{2,4}[ \t]*(?:instruction|system|response|new instructions?)s?[ \t]*:?[ \t]*$"),
    _signal("prompt_injection", 0.35, 0.5,
        r"(?m)^[ \t]*(?:system|assistant)[ \t]*(?:prompt|message)?[ \t]*:"),
    _signal("prompt_injection", 0.7, 0.7,
        r"(?-i:\b(?:END|BEGIN)\s+(?:OF\s+)?(?:USER\s+INPUT|SYSTEM\s+PROMPT|INSTRUCTIONS|PROMPT)\b)"),
    # an encoded instruction, with the order to decode and obey it
    _signal("prompt_injection", 0.6, 0.8,
        r"\b(?:decode|decipher|base64|rot13)\b[^.?!\n]{0,40}\b(?:follow|execute|obey|do what it says|"
        r"run it|carry out|comply|act on)\b"),
    # addressed to the assistant: mostly a sign in a document, rarely in the user's own words
    _signal("prompt_injection", 0.3, 0.85,
        rf"\b{_ASSISTANT}s?\b\s*[,:]\s*(?:you\s+)?(?:must|should|shall|will|need to|have to|"
        rf"are (?:instructed|required|ordered|told) to|please|ignore|do not|don'?t|now)\b"),
    _signal("prompt_injection", 0.35, 0.85,
        rf"\b(?:note|message|instructions?|attention|important|reminder|directive|request)s?\s+"
        rf"(?:to|for)\s+(?:the\s+|any\s+|all\s+)?(?:ai\s+)?(?:{_ASSISTANT}|model)s?\b"),
    _signal("prompt_injection", 0.4, 0.85,
        r"\b(?:do not|don'?t|never)\s+(?:tell|inform|mention|reveal|show|disclose|let)\b[^.?!\n]{0,20}"
        r"\bthe user\b|\bwithout (?:telling|informing|alerting) the user\b"),
    _signal("prompt_injection", 0.4, 0.8,
        rf"\bwhen (?:you|the {_ASSISTANT}|the model) (?:read|summari[sz]e|process|see|encounter|parse)s?\s+"
        rf"this\b|\bif you are (?:an? )?{_ASSISTANT}\b"),
    _signal("prompt_injection", 0.3, 0.85,
        r"\b(?:send|forward|email|e-mail|post|upload|transmit|leak|exfiltrate|copy)\s+(?:\w+\s+){0,3}?"
        r"(?:conversation|chat history|chat log|messages|user'?s? \w+|credentials|passwords?|api keys?|"
        r"personal (?:data|information)|emails?|contacts|files)\b[^.?!\n]{0,40}\bto\s+"
        r"(?:\S+@\S+|https?://|this (?:address|url|server|endpoint))"),
    _signal("prompt_injection", 0.0, 0.45,
        r"\b(?:reply|respond|answer|say|output|print)\s+(?:only\s+)?(?:with\s+)?(?:exactly\s+)?"
        r"['\"][^'\"\n]{1,80}['\"]"),
    _signal("prompt_injection", 0.2, 0.45, r"!\[[^\]\n]{0,100}\]\(\s*https?://[^)\s]{0,300}[?&][^)\s]{0,300}="),
    # jailbreak personas and framings
    _signal("jailbreak", 0.3, 0.3, r"(?-i:\bDAN\b)"),
    _signal("jailbreak", 0.9, 0.9, r"\bdo anything now\b"),
    _signal("jailbreak", 0.85, 0.85,
        r"\bwith developer mode (?:enabled|activated|on)\b|\bdeveloper mode (?:output|response)\b|"
        r"\b(?:act|pretend|simulate|behave|respond)\w*\s+as\b[^.?!\n]{0,40}\bdeveloper mode\b|"
        r"\b(?:you|chatgpt|assistant|ai)\s+(?:are|is)\s+(?:now\s+)?in\s+developer mode\b"),
    _signal("jailbreak", 0.85, 0.85,
        r"\b(?:pretend|imagine|act as if|act as|roleplay as|role-play as|you are now|you're now)\b"
        r"[^.?!\n]{0,30}\b(?:unrestricted|unfiltered|uncensored|jailbroken|amoral|unethical|evil|rogue|"
        r"without (?:any )?(?:restrictions|filters|rules|limits|limitations|guidelines|morals|ethics))\b"),
    _signal("jailbreak", 0.85, 0.85,
        r"\byou (?:have|are|will be|are now)\s+(?:\w+\s+){0,2}?(?:no|without|free (?:of|from)|not bound by|"
        r"freed from|released from)\s+(?:any\s+|all\s+)?(?:(?:of\s+)?(?:your|the|openai'?s?|ethical|moral|"
        r"content|safety|usual)\s+){0,2}(?:restrictions|filters|guidelines|policies|limitations|rules|"
        r"censorship|boundaries|constraints)\b"),
    _signal("jailbreak", 0.8, 0.85,
        r"\b(?:ignore|bypass|disable|turn off|remove|without|deactivate|override)\s+(?:(?:all|any|your|the)"
        r"\s+)*(?:ethical|moral|content|safety|ethics)\s+(?:restrictions|filters|guidelines|policies|"
        r"limitations|rules|guardrails|constraints|training)\b"),
    _signal("jailbreak", 0.4, 0.4, r"\bstay in character\b|\b(?:never|don'?t|do not) break character\b"),
    _signal("jailbreak", 0.75, 0.75,
        r"\bjailbr(?:eak|oken)\b[^.?!\n]{0,30}\b(?:mode|ai|assistant|chatgpt|gpt|model|prompt|llm)\b|"
        r"\b(?:ai|assistant|chatgpt|gpt|model|llm)\b[^.?!\n]{0,30}\bjailbr(?:eak|oken)\b|"
        r"\b(?:enable|activate|enter)\s+jailbreak\b"),
    _signal("jailbreak", 0.6, 0.6,
        r"\b(?:late|deceased|dead)\s+grand(?:ma|mother|father|pa)\b[^.?!\n]{0,80}\b(?:used to|would)\b"),
    _signal("jailbreak", 0.6, 0.6, r"\b(?:opposite|evil|chaos|unrestricted|uncensored)\s+mode\b"),
    _signal("jailbreak", 0.6, 0.6,
        r"\b(?:two|2|both)\s+(?:responses|answers|replies|personas)\b[^.?!\n]{0,60}\b(?:normal|classic|"
        r"jailbroken|unfiltered|DAN|developer)\b"),
    _signal("jailbreak", 0.6, 0.6,
        r"\bhypothetical(?:ly)?\b[^.?!\n]{0,60}\b(?:no|without) (?:rules|restrictions|filters|guidelines)\b"),
)  # fmt: skip


def noisy_or(weights) -> float:
    """The chance that at least one piece of evidence is right, each taken as independent."""
    return 1.0 - math.prod(1.0 - w for w in weights)


class InjectionGuard:
    """The prompt-injection and jailbreak guard (see findings.Guard): `check(text)` for the user's
    own input (and the model's output), `check_context(text)` for text that did not come from the
    user, a retrieved document or a tool's result (GuardPipeline.check_context calls it).

    Sentences are checked one at a time, and the findings of recent ones are remembered
    (`sentence_cache` of them, least recently used forgotten first), so the repeated checks of a
    growing stream check only its new sentences."""

    categories = ("prompt_injection", "jailbreak")

    def __init__(self, name: str = "injection", sentence_cache: int = 1024):
        self.name = name
        self._sentence = functools.lru_cache(maxsize=sentence_cache)(self._sentence)

    def check(self, text: str) -> list[Finding]:
        return self._scan(text, context=False, depth=0)

    def check_context(self, text: str) -> list[Finding]:
        return self._scan(text, context=True, depth=0)

    def _scan(self, text: str, context: bool, depth: int) -> list[Finding]:
        return [
            Finding(category, start + begin, start + end, score, self.name)
            for start, stop in sentence_spans(text)
            for category, begin, end, score in self._sentence(text[start:stop], context, depth)
        ]

    def _sentence(self, sentence: str, context: bool, depth: int) -> tuple[tuple[str, int, int, float], ...]:
        """The findings of one sentence, as (category, start, end, score) within it: per category
        the noisy-OR of its signals over the whole sentence, and the base64 runs that hide one."""
        weights: dict[str, list[float]] = {}
        for signal in SIGNALS:
            weight = signal.context if context else signal.user
            if weight > 0 and signal.pattern.search(sentence):
                weights.setdefault(signal.category, []).append(weight)
        found = [(category, 0, len(sentence), noisy_or(ws)) for category, ws in weights.items()]
        for match in BASE64.finditer(sentence) if depth < MAX_DEPTH else ():
            decoded = decode_base64(match.group())
            inner = self._scan(decoded, context, depth + 1) if decoded else []
            for category in dict.fromkeys(f.category for f in inner):
                score = max(f.score for f in inner if f.category == category)
                found.append((category, *match.span(), noisy_or([score, ENCODED])))
        return tuple(found)


def decode_base64(run: str) -> str | None:
    """The text a base64 (or URL-safe base64) run encodes, or None when it is not prose (with a
    space) or base64 again: most long runs of letters and digits (hashes, keys, identifiers) decode
    to bytes that are not UTF-8, and the rest to strings without a space."""
    body = run.rstrip("=")
    if len(body) % 4 == 1:
        return None
    altchars = b"-_" if ("-" in body or "_" in body) else None
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=altchars, validate=True)
        decoded = raw.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    printable = sum(ch.isprintable() or ch in "\n\t" for ch in decoded)
    text = " " in decoded or BASE64.fullmatch(decoded)
    return decoded if text and printable >= 0.95 * len(decoded) else None
