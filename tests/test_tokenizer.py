"""The runtime tokenizer must give the ids, text and chat prompts transformers gives, without importing it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmasos.errors import InvalidRequestError, LLMasOSError
from llmasos.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "naïve café – ünïcödé ß",
    "emoji 🦙🚀👩‍👩‍👧 and 中文字符 and 日本語",
    "<|im_start|>user\nhi<|im_end|>",  # special tokens inside text are matched whole
    "",
]
STREAM_TEXT = "Streaming 🦙🚀 emoji, 中文字符, naïve café and 👩‍👩‍👧 families."
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# exercises what transformers provides to templates: bos_token, tojson, raise_exception, loop controls
RICH_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['user', 'assistant', 'system'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "  {% if loop.index > 3 %}{% break %}{% endif %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there <b>&</b> 🦙"},
    {"role": "assistant", "content": "Hello!", "tool_calls": None},
    {"role": "user", "content": "Bye"},
]


def _train_bpe(byte_level: bool = True):
    """A tiny BPE tokenizer trained here: GPT-2 style byte-level, or sentencepiece-style Metaspace."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    if byte_level:
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        backend = Backend(models.BPE(unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        specials = ["<unk>", *specials]
        alphabet = []
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet)
    # ASCII only, so that emoji and CJK stay split over several byte-level tokens
    corpus = [text for text in TEXTS if text.isascii()] + ["Hello world. Hello there, world!"]
    backend.train_from_iterator(corpus * 10, trainer)
    return backend


def save_tiny(path: Path, byte_level: bool = True, generation_config: dict | None = None, **kwargs) -> Path:
    """Save the tiny tokenizer the way a Hugging Face model folder holds it."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML, **kwargs}
    save_jinja = kwargs.pop("save_jinja_files", False)
    PreTrainedTokenizerFast(tokenizer_object=_train_bpe(byte_level), **kwargs).save_pretrained(
        path, save_jinja_files=save_jinja
    )
    if generation_config is not None:
        (path / "generation_config.json").write_text(json.dumps(generation_config))
    return path


def assert_same_as_transformers(folder: Path, texts=TEXTS):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(folder))
    tokenizer = Tokenizer.from_dir(folder)
    for text in texts:
        for add_special_tokens in (True, False):
            ids = reference(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert tokenizer.encode(text, add_special_tokens=add_special_tokens) == ids, text
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            )
    assert tokenizer.vocab_size == len(reference)
    assert tokenizer.bos_token_id == reference.bos_token_id
    assert reference.eos_token_id in tokenizer.eos_token_ids
    if reference.chat_template:
        for add_generation_prompt in (True, False):
            assert tokenizer.apply_chat_template(
                MESSAGES, add_generation_prompt=add_generation_prompt
            ) == reference.apply_chat_template(
                MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False
            )
    return tokenizer


def assert_streams_like_decode(tokenizer: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None):
    detokenizer = tokenizer.detokenizer(prompt_ids)
    pieces = [detokenizer.step(token_id) for token_id in ids]
    pieces.append(detokenizer.flush())
    assert not any("\ufffd" in piece for piece in pieces), pieces
    if prompt_ids:
        expected = tokenizer.decode(prompt_ids + ids)[len(tokenizer.decode(prompt_ids)) :]
    else:
        expected = tokenizer.decode(ids)
    assert "".join(pieces) == expected
    assert sum(1 for piece in pieces if piece) > len(ids) // 3  # it streams, rather than waiting for the end
    return pieces


# --- tiny tokenizers built here --------------------------------------------------------------------


def test_byte_level_bpe_matches_transformers(tmp_path):
    assert_same_as_transformers(save_tiny(tmp_path))


def test_add_bos_token_in_tokenizer_config_is_honoured(tmp_path):
    tokenizer = assert_same_as_transformers(save_tiny(tmp_path, add_bos_token=True, add_eos_token=True))
    ids = tokenizer.encode("Hello")
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_ids[0]
    assert tokenizer.encode("Hello", add_special_tokens=False) == ids[1:-1]


@pytest.mark.parametrize(
    ("post_processor_adds_bos", "add_bos_token"), [(False, True), (True, False), (None, None)]
)
def test_add_bos_token_is_honoured_where_the_post_processor_does_not_add_it(
    tmp_path, post_processor_adds_bos, add_bos_token
):
    """transformers 5 bakes the flag into tokenizer.json when saving, so other writers' folders are made here.

    tokenizer.json decides, except that a requested BOS it lacks is added: transformers 5.23's generic
    class ignores the flag there (its Llama class and llama.cpp add it), so that case is BOS + its ids.
    """
    from transformers import AutoTokenizer

    folder = save_tiny(tmp_path, add_bos_token=bool(post_processor_adds_bos))
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    if post_processor_adds_bos is None:
        tokenizer_json["post_processor"] = None
    elif not post_processor_adds_bos:  # GPT-2's: adds nothing
        tokenizer_json["post_processor"] = {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
        }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))

    tokenizer, reference = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(str(folder))
    extra = [tokenizer.bos_token_id] if add_bos_token and not post_processor_adds_bos else []
    for text in TEXTS:
        assert tokenizer.encode(text) == extra + reference(text)["input_ids"], text
        assert (
            tokenizer.encode(text, add_special_tokens=False)
            == reference(text, add_special_tokens=False)["input_ids"]
        )
    assert (tokenizer.encode("Hello")[0] == tokenizer.bos_token_id) == bool(
        post_processor_adds_bos or add_bos_token
    )


def test_sentencepiece_style_bpe_and_chat_template_file_match_transformers(tmp_path):
    folder = save_tiny(tmp_path, byte_level=False, save_jinja_files=True, unk_token="<unk>")
    assert (folder / "chat_template.jinja").is_file()
    assert Tokenizer.from_dir(folder).has_chat_template
    assert_same_as_transformers(folder, texts=[text for text in TEXTS if text.isascii()])


def test_chat_template_helpers_render_like_transformers(tmp_path):
    from transformers import AutoTokenizer

    folder = save_tiny(tmp_path, chat_template=RICH_TEMPLATE)
    tokenizer, reference = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(str(folder))
    tools = [
        {"type": "function", "function": {"name": "get_weather", "description": "Wetter für <Orte> & 🌧"}}
    ]
    rendered = tokenizer.apply_chat_template(MESSAGES, tools=tools)
    assert rendered == reference.apply_chat_template(
        MESSAGES, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert rendered.startswith("<|im_start|>") and '"Wetter für <Orte> & 🌧"' in rendered
    with pytest.raises(InvalidRequestError, match="Unknown role: robot"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_no_chat_template_says_to_use_plain_prompts(tmp_path):
    tokenizer = Tokenizer.from_dir(save_tiny(tmp_path, chat_template=None))
    assert not tokenizer.has_chat_template
    with pytest.raises(LLMasOSError, match="no chat template.*plain prompt"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_eos_ids_are_the_union_with_generation_config(tmp_path):
    folder = save_tiny(tmp_path, generation_config={"eos_token_id": [0, 2]})
    tokenizer = Tokenizer.from_dir(folder)
    im_end = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    assert im_end == [2] and tokenizer.eos_token_ids == [2, 0]


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    with pytest.raises(LLMasOSError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_streaming_byte_level_never_splits_a_character(tmp_path):
    tokenizer = Tokenizer.from_dir(save_tiny(tmp_path))
    ids = tokenizer.encode(STREAM_TEXT, add_special_tokens=False)
    assert len(ids) > len(STREAM_TEXT) // 2  # emoji and CJK are split over several byte tokens here
    assert_streams_like_decode(tokenizer, ids)
    prompt = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    assert_streams_like_decode(tokenizer, ids, prompt_ids=prompt)


def test_streaming_sentencepiece_keeps_the_leading_space_after_a_prompt(tmp_path):
    tokenizer = Tokenizer.from_dir(save_tiny(tmp_path, byte_level=False, unk_token="<unk>"))
    ids = tokenizer.encode("Hello world there", add_special_tokens=False)
    assert_streams_like_decode(tokenizer, ids)
    prompt, answer = ids[:1], ids[1:]
    pieces = assert_streams_like_decode(tokenizer, answer, prompt_ids=prompt)
    assert "".join(pieces) == " world there"


def test_streaming_cleans_up_spaces_as_decode_does(tmp_path):
    """Folders that ask for transformers' clean-up (" ." -> ".") get it in the stream too, also where
    the pattern spans tokens: text that the next token may still change is held back."""
    folder = save_tiny(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "clean_up_tokenization_spaces": True})
    )
    tokenizer = Tokenizer.from_dir(folder)
    text = "Hello , world . It 's here ' s , isn 't it ? I 'm sure ! ' '"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == "Hello, world. It's here's, isn 't it? I'm sure!''"
    assert_streams_like_decode(tokenizer, ids)


def test_streaming_recovers_when_decode_stream_finds_an_invalid_prefix(tmp_path):
    """tokenizers' DecodeStream raises "Invalid prefix" on decoders whose output is not append-only
    (tokenizers#1705): the detokenizer decodes that step itself and goes on with a new stream."""
    tokenizer = Tokenizer.from_dir(save_tiny(tmp_path))
    ids = tokenizer.encode(STREAM_TEXT, add_special_tokens=False)
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.step(token_id) for token_id in ids[:9]]

    class Broken:
        def step(self, backend, token_id):
            raise Exception("Invalid prefix encountered")

    detokenizer._stream = Broken()
    pieces += [detokenizer.step(token_id) for token_id in ids[9:]] + [detokenizer.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == STREAM_TEXT


def test_a_decoder_that_breaks_every_decode_stream_is_decoded_in_python(tmp_path, monkeypatch):
    """Byte-fallback tokenizers can break even a fresh DecodeStream (stray byte tokens in a token-id
    prompt): the detokenizer never raises for it, and still emits no half character."""
    import llmasos.tokenizer as module

    class Broken:
        def __init__(self, **kwargs):
            pass

        def step(self, backend, token_id):
            raise Exception("Invalid prefix encountered")

    tokenizer = Tokenizer.from_dir(save_tiny(tmp_path))
    ids = tokenizer.encode(STREAM_TEXT, add_special_tokens=False)
    llama = tokenizer.encode("🦙", add_special_tokens=False)
    monkeypatch.setattr(module, "DecodeStream", Broken)
    detokenizer = tokenizer.detokenizer(ids[:4])  # the prompt's context breaks it too
    pieces = [detokenizer.step(token_id) for token_id in [*ids[4:], *llama]]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + detokenizer.flush() == tokenizer.decode(ids[4:] + llama)


def test_streaming_holds_back_an_incomplete_character_until_flush(tmp_path):
    tokenizer = Tokenizer.from_dir(save_tiny(tmp_path))
    first_byte = tokenizer.encode("🦙", add_special_tokens=False)[:1]  # a lone lead byte never completes
    detokenizer = tokenizer.detokenizer()
    assert detokenizer.step(first_byte[0]) == ""
    assert detokenizer.flush() == tokenizer.decode(first_byte) == "\ufffd"


def test_importing_the_tokenizer_does_not_import_transformers():
    code = "import sys, llmasos.tokenizer; sys.exit('transformers' in sys.modules or 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- the real model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer as transformers builds it from the GGUF, saved as a model folder holds it."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("smollm2-tokenizer")
    reference = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    reference.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_tokenizer_dir):
    tokenizer = assert_same_as_transformers(smollm2_tokenizer_dir)
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_ids == [2] and tokenizer.vocab_size == 49152
    assert tokenizer.encode("Hello world") == [19556, 905]  # SmolLM2 adds no BOS


@pytest.mark.slow
def test_smollm2_streams_emoji_and_cjk(smollm2_tokenizer_dir):
    tokenizer = Tokenizer.from_dir(smollm2_tokenizer_dir)
    ids = tokenizer.encode(STREAM_TEXT, add_special_tokens=False)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Say it"}])
    assert_streams_like_decode(tokenizer, ids)
    assert_streams_like_decode(tokenizer, ids, prompt_ids=tokenizer.encode(prompt))
