"""Quality flags of generated captions. Rows are flagged, never dropped, and the raw text is kept beside the
cleaned one, so a user can choose thresholds after the (expensive) generation.

Flags (strings in the sidecar's ``flags`` list, prefixed by the caption kind, e.g. ``long:cut``):

- ``empty``: nothing but whitespace and punctuation;
- ``cut``: generation stopped at the token budget; the caption is trimmed to its last full sentence;
- ``too_short`` / ``too_long``: length in the target tokenizer outside the kind's range (short: under
  ``short_max_tokens``; long: ``long_min_tokens``..``long_max_tokens``);
- ``repeated_ngrams``: a large share of word n-grams repeats earlier ones (greedy decoding loops);
- ``repeated_sentence``: the same sentence twice;
- ``low_compression``: zlib compresses the text unusually well (another sign of loops);
- ``refusal``: the model declined ("I'm sorry, ...", "As an AI ...");
- ``boilerplate``: an opener such as "The image shows" that carries no content (kept in the text; flagged so
  the trainer's user can strip or keep it);
- ``low_clip_score``: below ``min_clip_score`` when a CLIP model scored the caption.
"""
from __future__ import annotations

import re
import zlib
from collections.abc import Callable

from .config import QualitySettings

__all__ = [
    "BOILERPLATE_OPENERS",
    "REFUSAL_PATTERNS",
    "caption_flags",
    "clean_generated",
    "finish_caption",
    "repeated_ngram_ratio",
    "sentences",
    "trim_to_sentence",
]

REFUSAL_PATTERNS = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i am unable|i'?m unable|as an ai|unfortunately,? i)",
    re.IGNORECASE)
BOILERPLATE_OPENERS = re.compile(
    r"^\s*(the|this) (image|picture|photo|photograph) (shows|depicts|features|displays|is of|presents|captures)\b",
    re.IGNORECASE)
# a sentence ends at . ! ? (optionally followed by a closing quote or bracket) before whitespace or the end
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
_WORD = re.compile(r"\w+", re.UNICODE)


def clean_generated(text: str) -> str:
    """Whitespace runs to one space, no leading/trailing space (the text the trainer reads)."""
    return " ".join(text.split())


def trim_to_sentence(text: str) -> str:
    """``text`` up to its last complete sentence; unchanged when it has none (one long unfinished clause)."""
    ends = list(_SENTENCE_END.finditer(text))
    return text[:ends[-1].end()].rstrip() if ends else text


def sentences(text: str) -> list[str]:
    """The sentences of ``text`` (a trailing unfinished one included)."""
    out, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        piece = text[start:m.end()].strip()
        if piece:
            out.append(piece)
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def repeated_ngram_ratio(text: str, n: int = 4) -> float:
    """Share of the word ``n``-grams of ``text`` that already occurred earlier in it (0 for fewer than n words)."""
    words = [w.lower() for w in _WORD.findall(text)]
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def _compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw)


def caption_flags(kind: str, text: str, finish_reason: str | None, n_tokens: int | None,
                  settings: QualitySettings, clip_score: float | None = None) -> list[str]:
    """The flags (without the kind prefix) of one caption; ``text`` is the cleaned, possibly trimmed caption,
    ``n_tokens`` its length in the target tokenizer."""
    flags = []
    if not _WORD.search(text or ""):
        return ["empty"] + (["cut"] if finish_reason == "length" else [])
    if finish_reason == "length":
        flags.append("cut")
    if n_tokens is not None:
        if kind == "short" and n_tokens >= settings.short_max_tokens:
            flags.append("too_long")
        if kind == "long" and n_tokens < settings.long_min_tokens:
            flags.append("too_short")
        if kind == "long" and n_tokens > settings.long_max_tokens:
            flags.append("too_long")
    if repeated_ngram_ratio(text, settings.ngram) > settings.max_repeated_ngram_ratio:
        flags.append("repeated_ngrams")
    normalised = [re.sub(r"\W+", " ", s.lower()).strip() for s in sentences(text)]
    normalised = [s for s in normalised if s]
    if len(set(normalised)) < len(normalised):
        flags.append("repeated_sentence")
    # short strings compress badly whatever they say: judge only texts long enough for zlib to find loops
    if len(text) >= 200 and _compression_ratio(text) < settings.min_compression_ratio:
        flags.append("low_compression")
    if REFUSAL_PATTERNS.search(text):
        flags.append("refusal")
    if BOILERPLATE_OPENERS.search(text):
        flags.append("boilerplate")
    if clip_score is not None and settings.min_clip_score is not None and clip_score < settings.min_clip_score:
        flags.append("low_clip_score")
    return flags


def finish_caption(kind: str, raw: str, finish_reason: str | None, count: Callable[[str], int],
                   settings: QualitySettings) -> tuple[str, int, list[str]]:
    """Raw generated text -> (caption the trainer reads, its length in the target tokenizer, flags). A caption
    cut at the token budget is trimmed to its last full sentence."""
    text = clean_generated(raw)
    if finish_reason == "length":
        text = trim_to_sentence(text)
    n = count(text) if text else 0
    return text, n, caption_flags(kind, text, finish_reason, n, settings)
