"""Text <-> token ids at runtime, from a Hugging Face-format folder, without importing transformers.

transformers takes seconds to import, more than the CLI's whole budget to the first token, while the
`tokenizers` library it wraps imports in a tenth of a second. So we load `tokenizer.json` with
`tokenizers` directly and re-create the few things transformers' `TokenizersBackend` adds on top:
special tokens and BOS/EOS from `tokenizer_config.json`, the stop ids from `generation_config.json`,
and chat templates rendered in the same jinja2 sandbox with the same helpers. The tests check ids
and rendered chats against `AutoTokenizer` on the same folders.
"""

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend
from tokenizers.decoders import DecodeStream

from llmasos.errors import InvalidRequestError, LLMasOSError

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or a serialized AddedToken."""
    return value.get("content") if isinstance(value, dict) else value


def _ids(value) -> list[int]:
    """`eos_token_id` may be one id, a list of them, or absent."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


class ChatPrompt(str):
    """A prompt a chat template rendered. It writes its own special tokens (a Llama 3 template starts
    with <|begin_of_text|>), so the engine encodes it without adding any, as transformers'
    `apply_chat_template(tokenize=True)` and vLLM's chat endpoint do: no doubled BOS."""


class Tokenizer:
    """A model's tokenizer: encode, decode, chat template, streaming detokenization."""

    def __init__(self, backend: Backend, tokenizer_config: dict, generation_config: dict, model_config: dict):
        self._backend = backend
        self._clean_up_spaces = bool(tokenizer_config.get("clean_up_tokenization_spaces", False))
        self.special_tokens = {
            name: text for name in _SPECIAL_TOKEN_NAMES if (text := _token_text(tokenizer_config.get(name)))
        }
        # transformers registers each named special token as an added token, so it is matched whole in
        # any text and skipped when decoding, even where tokenizer.json has it only as a vocabulary entry.
        added = {token.content for token in backend.get_added_tokens_decoder().values()}
        missing = [text for text in dict.fromkeys(self.special_tokens.values()) if text not in added]
        if missing:
            backend.add_special_tokens([AddedToken(text, special=True, normalized=False) for text in missing])

        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos else model_config.get("bos_token_id")
        tokenizer_eos = [backend.token_to_id(eos)] if eos else []
        # generation_config.json names every id that ends a turn (Llama 3 has several); without one,
        # transformers derives it from config.json.
        stop_source = generation_config if generation_config else model_config
        self.eos_token_ids: list[int] = list(
            dict.fromkeys(tokenizer_eos + _ids(stop_source.get("eos_token_id")))
        )
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

        # tokenizer.json's post-processor decides what encode adds, as in transformers 5. A folder whose
        # tokenizer_config.json asks for BOS/EOS that the post-processor does not add (sentencepiece
        # Llama folders) gets them added here, as llama.cpp and transformers' Llama tokenizer class do.
        plain = backend.encode("a", add_special_tokens=False).ids
        processed = backend.encode("a", add_special_tokens=True).ids
        eos_id = tokenizer_eos[0] if tokenizer_eos else None
        self._prepend_bos = (
            bool(tokenizer_config.get("add_bos_token"))
            and self.bos_token_id is not None
            and (processed[:1] != [self.bos_token_id] or plain[:1] == [self.bos_token_id])
        )
        self._append_eos = (
            bool(tokenizer_config.get("add_eos_token"))
            and eos_id is not None
            and (processed[-1:] != [eos_id] or plain[-1:] == [eos_id])
        )

        template = tokenizer_config.get("chat_template")
        if isinstance(template, list):  # the older form of several named templates
            template = {entry["name"]: entry["template"] for entry in template}.get("default")
        self.chat_template: str | None = template
        self.has_chat_template: bool = bool(template)

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        """Load from a model folder: tokenizer.json, plus the config files next to it when present."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise LLMasOSError(
                f"{path} has no tokenizer.json. "
                "Re-import the model from its Hugging Face folder or GGUF file."
            )
        tokenizer_config = _read_json(path / "tokenizer_config.json")
        if (path / "chat_template.jinja").is_file():  # where transformers 5 saves the template by default
            tokenizer_config["chat_template"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        backend = Backend.from_file(str(path / "tokenizer.json"))
        # some tokenizer.json files pad or truncate every text to a fixed length; transformers turns
        # both off, and so do we (the context check, not the tokenizer, decides what is too long)
        backend.no_padding()
        backend.no_truncation()
        return cls(
            backend,
            tokenizer_config,
            _read_json(path / "generation_config.json"),
            _read_json(path / "config.json"),
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens:
            ids = [self.bos_token_id] * self._prepend_bos + ids + self.eos_token_ids[:1] * self._append_eos
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        **kwargs,
    ) -> ChatPrompt:
        """The prompt for `messages`, as transformers' `apply_chat_template(..., tokenize=False)` renders it.

        `tools` are OpenAI-style function dicts (`{"type": "function", "function": {...}}`), the
        template's `tools` variable; `kwargs` reach the template as further variables (`documents`,
        `enable_thinking`, ...).
        """
        if not self.chat_template:
            raise LLMasOSError(
                "This model has no chat template, so it cannot take chat messages. "
                "Send it a plain prompt (a completion request) instead."
            )
        import jinja2

        # transformers drops keys set to None: a template's `message.tool_calls is defined` sees them absent.
        messages = [
            {key: value for key, value in message.items() if value is not None} for message in messages
        ]
        variables = {"tools": tools, "documents": None, **self.special_tokens, **kwargs}
        try:
            return ChatPrompt(
                _compile(self.chat_template).render(
                    messages=messages, add_generation_prompt=add_generation_prompt, **variables
                )
            )
        except jinja2.TemplateError as error:  # includes the template's own raise_exception(...)
            raise InvalidRequestError(
                f"The model's chat template rejected these messages: {error}"
            ) from error

    def detokenizer(
        self, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ) -> "IncrementalDetokenizer":
        """A streaming decoder for one sequence; `prompt_ids` give its first token context."""
        return IncrementalDetokenizer(self, prompt_ids, skip_special_tokens)


class IncrementalDetokenizer:
    """Turns generated ids into text one token at a time, for streaming.

    Decoding a single id is wrong in two ways: a character can span several byte-level tokens, and
    sentencepiece decoders drop the leading space of the first token they see. tokenizers' Rust
    `DecodeStream` handles both, as vLLM's and TGI's detokenizers do: it decodes a short window that
    starts with already-emitted tokens, emits only what the newest token adds, and holds text back
    while it ends in U+FFFD (a character whose remaining bytes are still to come). It is primed with
    the last prompt tokens, so the first generated token gets its context. Without `prompt_ids` the
    pieces concatenate to `tokenizer.decode(ids)`; with them, to the text the ids add after the prompt.
    """

    _CONTEXT = 5  # prompt tokens kept as context: enough for any multi-token character

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True
    ):
        self._backend = tokenizer._backend
        self._skip_special_tokens = skip_special_tokens
        self._clean_up = tokenizer._clean_up_spaces
        self._held = ""  # clean-up only: text that the next piece may still change (" ." -> ".")
        self._stream = self._primed(list(prompt_ids or [])[-self._CONTEXT :])
        self._pending: list[int] = []  # ids since the last emitted piece: their text is still held back

    def _primed(self, context: list[int]) -> DecodeStream:
        # keyword only: tokenizers 0.22 put a prefill of ids before skip_special_tokens, 0.21 lacks it
        stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
        try:
            for token_id in context:
                stream.step(self._backend, token_id)
        except Exception as error:
            if not _invalid_prefix(error):
                raise
            return self._primed([])  # a context the stream cannot take: start without one
        self._window = context  # the ids the stream decodes before the pending ones
        return stream

    def step(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", never half a character)."""
        self._pending.append(token_id)
        try:
            piece = self._stream.step(self._backend, token_id) if self._stream else self._python_piece()
        except Exception as error:
            if not _invalid_prefix(error):
                raise
            # a decoder whose output is not append-only broke the stream's state (tokenizers#1705):
            # a new stream after the emitted context takes the pending ids, or, as in vLLM, one
            # without context if that breaks too
            piece = self._restart(self._window) if len(self._window) else None
            if piece is None:
                piece = self._restart([])
        if not piece:
            return ""
        self._window, self._pending = self._pending, []
        return self._clean(piece, final=False)

    def _restart(self, context: list[int]) -> str | None:
        """A new stream after `context`, fed the pending ids: their text ("" while incomplete), or
        None if it breaks as well."""
        self._stream = self._primed(context)
        try:
            return "".join(self._stream.step(self._backend, t) or "" for t in self._pending)
        except Exception as error:
            if not _invalid_prefix(error):
                raise
            if context:
                return None
            self._stream = None  # even a fresh stream breaks on these ids: decode in Python from now on
            return self._python_piece()

    def _python_piece(self) -> str:
        """The pending ids' text after the window once it ends in a whole character ("" until then)."""
        skip = self._skip_special_tokens
        before = self._backend.decode(self._window, skip_special_tokens=skip)
        text = self._backend.decode(self._window + self._pending, skip_special_tokens=skip)[len(before) :]
        return "" if text.endswith("\ufffd") else text

    def flush(self) -> str:
        """At the end of the sequence: whatever was held back, even an incomplete character."""
        pending, self._pending = self._pending, []
        return self._clean(self._window_text(pending) if pending else "", final=True)

    def _window_text(self, pending: list[int]) -> str:
        """The text `pending` adds after the window, decoded in Python (once, not per token)."""
        skip = self._skip_special_tokens
        before = self._backend.decode(self._window, skip_special_tokens=skip)
        self._window = self._window + pending
        return self._backend.decode(self._window, skip_special_tokens=skip)[len(before) :]

    def _clean(self, piece: str, final: bool) -> str:
        """transformers' clean-up of spaces, for the older folders that ask for it, applied to the
        stream: text where a pattern may still be completed or reach across is held back."""
        if not self._clean_up:
            return piece
        text = self._held + piece
        cut = len(text) if final else _unsettled(text)
        self._held = text[cut:]
        return _clean_up_spaces(text[:cut])


def _invalid_prefix(error: Exception) -> bool:
    """DecodeStream's error for ids it cannot continue from (tokenizers#1705), which we recover from."""
    return "prefix" in str(error).lower()


_CLEAN_UPS = (
    *((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't")),
    *((f" '{suffix}", f"'{suffix}") for suffix in ("m", "s", "ve", "re")),
)


def _clean_up_spaces(text: str) -> str:
    """transformers' `clean_up_tokenization`, for the older folders whose config asks for it."""
    for before, after in _CLEAN_UPS:
        text = text.replace(before, after)
    return text


_CLEAN_UP_PATTERNS = tuple(before for before, _ in _CLEAN_UPS)


def _unsettled(text: str) -> int:
    """Where the clean-up of `text` may still change once more text follows: the start of a pattern
    the next text could complete (they are at most 4 characters), or of a whole one reaching over it."""
    patterns = _CLEAN_UP_PATTERNS
    cut = next(
        (
            i
            for i in range(max(0, len(text) - 3), len(text))
            if any(len(p) > len(text) - i and p.startswith(text[i:]) for p in patterns)
        ),
        len(text),
    )
    moved = True
    while moved:
        moved = False
        for p in patterns:
            at = text.find(p, max(0, cut - len(p) + 1), cut + len(p) - 1)
            if 0 <= at < cut:
                cut, moved = at, True
    return cut


@lru_cache(maxsize=8)
def _compile(template: str):
    """The template in the sandbox transformers uses, with the helpers chat templates expect."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks: a no-op here."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
