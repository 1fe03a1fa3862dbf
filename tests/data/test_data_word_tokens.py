"""The chunk-cached English word tokenizer given to datatrove's filters yields exactly datatrove's
spaCy tokens, on tricky strings, real prose (the standard library's docstrings) and the bench's
generated corpus, with a cache small enough to evict; the Gopher filters decide the same."""

import ast
import json
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.utils.word_tokenizers import SpaCyTokenizer

from llmasos.bench.data_corpus import write_corpus
from llmasos.data.pipeline import steps, word_tokens

TRICKY = [
    "I can't believe it's not butter, they'd said -- cannot, gonna, wanna; Im ok.",
    "Visit https://example.org/a?b=1, or mail jane.roe@example.org (before 12:30 p.m.).",
    "The U.S. and e.g. the U.K. spent $4.5bn (3,000,000 EUR) in 2020-2021... really!!!",
    "well-known state-of-the-art 'quoted' \"double\" [brackets] {braces} <angle> 50% #tag @user",
    "Naïve café déjà-vu — über straße; emoji 🙂 and CJK 漢字 and tabs\tand\nnew\n\nlines",
    "sys.path.insert(0, x) >>> print('hi') ~~~ === --flag -v a/b\\c ..and.. etc.",
]


def stdlib_docstrings():
    folder = Path(ast.__file__).parent
    for path in sorted(folder.glob("*.py"))[:120]:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
        if doc:
            yield doc


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    write_corpus(corpus, 150_000)
    generated = [json.loads(line)["text"] for line in corpus.open()]
    return TRICKY + list(stdlib_docstrings()) + generated


def test_same_tokens_as_datatrove_spacy_even_when_the_cache_evicts(texts, monkeypatch):
    reference = SpaCyTokenizer("en")
    assert len(texts) > 80 and sum(map(len, texts)) > 200_000
    expected = [reference.word_tokenize(t) for t in texts]
    word_tokens.english.cache_clear()
    monkeypatch.setattr(word_tokens, "CACHE_CHUNKS", 50)  # evicts within most documents
    cached = word_tokens.english()
    assert [cached.word_tokenize(t) for t in texts] == expected
    assert [cached.word_tokenize(t) for t in texts] == expected  # from the cache this time
    word_tokens.english.cache_clear()


@pytest.mark.parametrize("filter_class", [GopherQualityFilter, GopherRepetitionFilter])
def test_gopher_filters_decide_the_same(texts, filter_class):
    name = {GopherQualityFilter: "gopher_quality", GopherRepetitionFilter: "gopher_repetition"}[filter_class]
    ours = steps.quality_filter(name, "text", {}).filter
    assert isinstance(ours.language, type(word_tokens.english()))
    stock = filter_class()
    decisions = [(stock.filter(Document(text=t, id="")), ours.filter(Document(text=t, id=""))) for t in texts]
    assert all(a == b for a, b in decisions)
    assert len({str(a) for a, _ in decisions}) > 1  # the texts are not all kept: the check has teeth


def test_other_languages_keep_datatrove_tokenizer():
    made = steps.quality_filter("gopher_quality", "text", {"language": "fra"}).filter
    assert made.language == "fra"
