"""Offline word tokenizer for the tiny text tower: no vocabulary file, stable hashed buckets.

Words are hashed with zlib.crc32 (not Python's ``hash``, which is salted per process) so a
trained tiny model reads the same ids in every process and on every machine.
"""
from __future__ import annotations

import re
import zlib

import torch

PAD_ID, BOS_ID, EOS_ID, SLOT_ID = 0, 1, 2, 3
N_SPECIAL = 4
SLOT_WORD = "$"
_WORD_RE = re.compile(r"\w+|[^\w\s]")


def split_words(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks ("$" is punctuation, so it stands alone)."""
    return _WORD_RE.findall(text.lower())


class HashTokenizer:
    """Text -> ``[B, context_length]`` ids: BOS, hashed words, EOS, then PAD (0).

    Over-long texts are truncated and keep their EOS, because the text tower pools at EOS.
    """

    def __init__(self, n_buckets: int = 4096, context_length: int = 32) -> None:
        if n_buckets < 1 or context_length < 3:
            raise ValueError("n_buckets must be >= 1 and context_length >= 3")
        self.n_buckets = int(n_buckets)
        self.context_length = int(context_length)

    @property
    def vocab_size(self) -> int:
        return self.n_buckets + N_SPECIAL

    def word_id(self, word: str) -> int:
        if word == SLOT_WORD:
            return SLOT_ID
        # surrogatepass: a lone surrogate (JSON "\\udce9", undecodable argv bytes) hashes instead of crashing
        return N_SPECIAL + zlib.crc32(word.encode("utf-8", "surrogatepass")) % self.n_buckets

    def encode(self, text: str) -> list[int]:
        ids = [self.word_id(w) for w in split_words(text)][: self.context_length - 2]
        return [BOS_ID, *ids, EOS_ID]

    def __call__(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), self.context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
