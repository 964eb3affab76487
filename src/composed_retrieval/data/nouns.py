"""Pick one noun of a caption and replace it by the pseudo-word slot "$" (masked captions).

The masked zero-shot objective (arXiv 2406.18836) masks *one noun* per caption. Where nouns
come from:

* a list of words: any caption set with a known noun vocabulary. The synthetic benchmark hands
  over its own (``synth.world.NOUNS``, the shape words: the head noun of every object phrase, "a
  large red *circle* at the top left"; colours and sizes are adjectives); the method resolves
  the name ``"synthetic"`` to it, so this data module knows no benchmark.
* ``"pos"``: real captions (CC3M-like) need a part-of-speech tagger. Used when importable,
  in this order, and never a dependency of this package:

  - spaCy (``pip install spacy``, on PyPI) with its ``en_core_web_sm`` pipeline. The pipeline
    is *not* on PyPI under its own name (only third-party mirrors are); it comes from spaCy's
    model releases (``python -m spacy download en_core_web_sm``) or a wheel copied offline.
  - NLTK (``pip install nltk``, on PyPI) with its ``averaged_perceptron_tagger_eng`` data
    (``python -m nltk.downloader averaged_perceptron_tagger_eng``; older NLTK: ``..._tagger``);
    the data is not inside the wheel.

  Neither wheel ships tagger weights (checked with ``pip download`` on the registry here), so
  without one installed ``"pos"`` is a one-line ConfigError saying what to install.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Callable, Mapping, Sequence

from ..errors import ConfigError

SLOT = "$"
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def vocabulary_finder(words: Sequence[str]) -> Callable[[str], list[tuple[int, int]]]:
    """Character spans of whole-word, case-insensitive occurrences of ``words``."""
    if not words:
        raise ConfigError("noun vocabulary is empty")
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)
    return lambda text: [m.span() for m in pattern.finditer(text)]


@lru_cache(maxsize=1)
def _tagger() -> Callable[[str], list[tuple[int, int]]]:
    try:
        import spacy  # type: ignore[import-not-found]
        nlp = spacy.load("en_core_web_sm", disable=["ner", "parser", "lemmatizer"])
        return lambda text: [(t.idx, t.idx + len(t.text)) for t in nlp(text) if t.pos_ in ("NOUN", "PROPN")]
    except Exception:  # not installed, or no pipeline: try NLTK
        pass
    try:
        import nltk  # type: ignore[import-not-found]
        nltk.pos_tag(["a", "test"])   # raises LookupError when the tagger data is missing
    except Exception:
        raise ConfigError("noun detection 'pos' needs a part-of-speech tagger: install spaCy with its "
                          "en_core_web_sm pipeline, or NLTK with averaged_perceptron_tagger_eng data "
                          "(or give the nouns as a word list / use 'synthetic')") from None

    def find(text: str) -> list[tuple[int, int]]:
        spans = [m.span() for m in _WORD.finditer(text)]
        tags = nltk.pos_tag([text[a:b] for a, b in spans])
        return [s for s, (_, tag) in zip(spans, tags) if tag.startswith("NN")]
    return find


def noun_finder(spec: str | Sequence[str],
                named: Mapping[str, Sequence[str]] | None = None) -> Callable[[str], list[tuple[int, int]]]:
    """``"pos"``, a list of noun words, or a name in ``named`` (vocabularies the caller hands
    over, e.g. a benchmark's) -> caption -> noun character spans."""
    named = dict(named or {})
    if isinstance(spec, str):
        if spec in named:
            return vocabulary_finder(list(named[spec]))
        if spec == "pos":
            return _tagger()
        choices = ", ".join(repr(k) for k in [*named, "pos"])
        raise ConfigError(f"noun source must be {choices} or a list of words, got {spec!r}")
    return vocabulary_finder(list(spec))


def mask_noun(caption: str, spans: list[tuple[int, int]], choice: int) -> tuple[str, str]:
    """Replace the ``choice``-th noun span by "$"; returns (masked caption, the noun)."""
    a, b = spans[choice % len(spans)]
    return caption[:a] + SLOT + caption[b:], caption[a:b]
