"""The English word tokenizer given to datatrove's Gopher and FineWeb filters: spaCy's tokens, exactly,
at several times the speed.

datatrove splits words with `spacy.blank("en")` inside a memory zone (so that its string store does
not grow without end), which also throws away spaCy's own cache: every word of every document goes
through the prefix, suffix and infix rules again, ~0.2-0.4 MB/s on one core. spaCy's tokenizer works
on each run of non-space characters alone (the rules never look across a space), so the tokens of
a document are the tokens of its chunks (`str.split()`) one after the other. This tokenizer keeps
them in a bounded cache of chunks (the oldest go first), runs spaCy (in a memory zone, as datatrove
does) only on the chunks it has not seen, and skips it for chunks of letters only that are no
special case of the tokenizer ("cannot" is one), which spaCy never splits. The lists are equal to datatrove's
SpaCyTokenizer's (tests/data/test_data_word_tokens.py compares them on real and generated text).

datatrove's filters take a WordTokenizer in place of a language code (`load_word_tokenizer`); its
other offline choices are no faster (WhitespaceTokenizer runs spaCy's "xx"), and NLTK's needs the
punkt data, which is a download.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from functools import lru_cache

_LETTERS = re.compile(r"[^\W\d_]+")  # letters only: spaCy splits such a chunk only by a special case
CACHE_CHUNKS = 1 << 16  # ~10-20 MiB of token lists per process


@lru_cache(maxsize=1)
def english():
    """One tokenizer a process, shared by the filters that split English words (the caller has
    checked that datatrove is installed: steps.quality_filter)."""
    from datatrove.utils import word_tokenizers

    class ChunkCachedSpaCyTokenizer(word_tokenizers.SpaCyTokenizer):
        """datatrove's SpaCyTokenizer, whose word_tokenize caches the tokens of each chunk."""

        def __init__(self):
            super().__init__("en")
            self._chunks: OrderedDict[str, list[str]] = OrderedDict()

        def word_tokenize(self, text: str) -> list[str]:
            chunks = text.split()
            special = self.tokenizer.tokenizer.rules
            unseen = {
                c for c in chunks if c not in self._chunks and (c in special or not _LETTERS.fullmatch(c))
            }
            if unseen:
                self._tokenize(unseen)
            tokens: list[str] = []
            for chunk in chunks:
                known = self._chunks.get(chunk)
                if known is None:
                    tokens.append(chunk)
                else:
                    tokens.extend(known)
            while len(self._chunks) > CACHE_CHUNKS:  # after the lookups: this document's chunks stay
                self._chunks.popitem(last=False)
            return tokens

        def _tokenize(self, chunks: set[str]) -> None:
            nlp, strip = self.tokenizer, word_tokenizers.strip_strings
            with nlp.memory_zone():
                for chunk in chunks:
                    self._chunks[chunk] = strip([token.text for token in nlp.tokenizer(chunk)])

    return ChunkCachedSpaCyTokenizer()
