"""Caption -> facts -> truth: a small parser and checker for the world's short-caption language.

It reads any caption the generator writes (positives, paraphrases, every negative type, Winoground captions) and
decides whether it is true of a scene: there must be a one-to-one assignment of its noun phrases to distinct
scene objects that matches every mentioned attribute and every relation. Words outside the vocabulary
(articles, openers such as "there is") carry no facts and are skipped.
"""
from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

from .captions import REL_PHRASES, CaptionSpec, NounPhrase, spec_facts
from .config import WorldConfig
from .scene import Scene, relation_holds

_REL_TOKENS: list[tuple[tuple[str, ...], str]] = sorted(
    ((tuple(p.split()), rel) for rel, phrases in REL_PHRASES.items() for p in phrases),
    key=lambda t: -len(t[0]),  # longest first: "to the left of" before "left of"
)


class CaptionParseError(ValueError):
    """The caption is not in the synthetic world's language."""


@dataclass(frozen=True)
class ParsedCaption:
    """Noun phrases in order and relations ``(i, rel, j)`` between them."""

    nps: tuple[NounPhrase, ...]
    relations: tuple[tuple[int, str, int], ...]

    def facts(self) -> tuple[Counter, frozenset]:
        """Wording-independent facts, comparable with :func:`~vladva_openclip.synth.captions.spec_facts`."""
        if len(self.relations) > 1:
            raise CaptionParseError("facts() supports at most one relation")
        return spec_facts(CaptionSpec(nps=self.nps, relation=self.relations[0] if self.relations else None))


def tokens(text: str) -> list[str]:
    """Lowercase words and punctuation marks (the word-count proxy used for caption lengths too)."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def parse_caption(text: str, config: WorldConfig) -> ParsedCaption:
    """Parse a short caption of the synthetic world.

    Raises:
        CaptionParseError: a size or colour without a shape after it, a relation without two noun phrases.
    """
    toks = [t for t in tokens(text) if t.isalnum()]
    sizes, colours, shapes = set(config.sizes), set(config.colours), set(config.shapes)
    nps: list[NounPhrase] = []
    relations: list[tuple[int, str, int]] = []
    pending_rel: str | None = None
    size = colour = None
    i = 0
    while i < len(toks):
        tok = toks[i]
        matched = next((rel_toks for rel_toks in _REL_TOKENS if tuple(toks[i:i + len(rel_toks[0])]) == rel_toks[0]),
                       None)
        if matched is not None:
            if size or colour:
                raise CaptionParseError(f"attribute without a shape before {' '.join(matched[0])!r} in {text!r}")
            if not nps or pending_rel is not None:
                raise CaptionParseError(f"relation {matched[1]!r} has no subject in {text!r}")
            pending_rel = matched[1]
            i += len(matched[0])
            continue
        if tok in sizes:
            if size:
                raise CaptionParseError(f"two sizes for one object in {text!r}")
            size = tok
        elif tok in colours:
            if colour:
                raise CaptionParseError(f"two colours for one object in {text!r}")
            colour = tok
        elif tok in shapes:
            nps.append(NounPhrase(shape=tok, colour=colour, size=size))
            size = colour = None
            if pending_rel is not None:
                relations.append((len(nps) - 2, pending_rel, len(nps) - 1))
                pending_rel = None
        elif size or colour:
            raise CaptionParseError(f"attribute {size or colour!r} is not followed by a shape in {text!r}")
        i += 1
    if size or colour or pending_rel:
        raise CaptionParseError(f"caption ends in the middle of a phrase: {text!r}")
    if not nps:
        raise CaptionParseError(f"no object named in {text!r}")
    return ParsedCaption(nps=tuple(nps), relations=tuple(relations))


def holds(caption: str | ParsedCaption, scene: Scene, config: WorldConfig) -> bool:
    """Whether the caption is true of the scene (see the module docstring for the semantics)."""
    parsed = parse_caption(caption, config) if isinstance(caption, str) else caption
    objs = scene.objects
    if len(parsed.nps) > len(objs):
        return False

    def matches(np_: NounPhrase, k: int) -> bool:
        o = objs[k]
        return (np_.shape == o.shape and (np_.colour is None or np_.colour == o.colour)
                and (np_.size is None or np_.size == o.size))

    candidates = [[k for k in range(len(objs)) if matches(np_, k)] for np_ in parsed.nps]
    for assign in itertools.product(*candidates):
        if len(set(assign)) != len(assign):
            continue
        if all(relation_holds(objs[assign[i]], rel, objs[assign[j]]) for i, rel, j in parsed.relations):
            return True
    return False
