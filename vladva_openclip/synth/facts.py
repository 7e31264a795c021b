"""Caption -> facts -> truth: a small parser and checker for the world's short-caption language.

It reads any caption the generator writes (positives, paraphrases, every negative type, Winoground captions) and
decides whether it is true of a scene: there must be a one-to-one assignment of its noun phrases to distinct
scene objects that matches every mentioned attribute and every relation. Words outside the vocabulary
(articles, openers such as "there is") carry no facts and are skipped.

:func:`caption_fact_set` reads short captions and long descriptions alike into atomic facts grounded on shapes
(objects of a scene never share a shape): objects, colours, sizes, positions in the frame, pairwise relations,
the object count and the background. :func:`scene_fact_set` lists the same facts for a scene, so "caption A says
no more than caption B" and "the caption is true of the scene" are set inclusions.
"""
from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass

from .captions import _COL_WORDS, _COUNT_WORDS, _ROW_WORDS, REL_PHRASES, CaptionSpec, NounPhrase, spec_facts
from .config import CONVERSE, RELATIONS, WorldConfig
from .scene import Scene, SceneObject, relation_holds

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


# ---------------------------------------------------------------------------------------------- atomic facts

#: ``("object", shape)``, ``("colour", shape, colour)``, ``("size", shape, size)``, ``("position", shape, phrase)``,
#: ``("relation", shape, "left of" | "above", shape)``, ``("count", n)``, ``("background", name)``
Fact = tuple
_RELATION_SENTENCE = re.compile(r"^the (?P<a>.+?) is (?P<rels>.+) the (?P<b>.+?)$")
_PHRASE_TO_REL = {p: rel for rel, phrases in REL_PHRASES.items() for p in phrases}
_COUNTS = {word.split()[-2]: n for n, words in _COUNT_WORDS.items() for word in words}  # "two" -> 2, "single" -> 1


def _positions() -> list[str]:
    """Every phrase :func:`~vladva_openclip.synth.captions.position_phrase` writes, longest first."""
    out = {"in the center"}
    out |= {f"on the {c} side" for c in _COL_WORDS if c != "center"}
    out |= {f"at the {r}" for r in _ROW_WORDS if r != "middle"}
    out |= {f"in the {r} {c} corner" for r in _ROW_WORDS if r != "middle" for c in _COL_WORDS if c != "center"}
    return sorted(out, key=len, reverse=True)


_POSITION_PHRASES = _positions()


def _normalised(a: str, rel: str, b: str) -> Fact:
    """``A right of B`` is ``B left of A``; ``A below B`` is ``B above A``."""
    return ("relation", b, CONVERSE[rel], a) if rel in ("right of", "below") else ("relation", a, rel, b)


def _np_facts(np_: NounPhrase) -> set[Fact]:
    out: set[Fact] = {("object", np_.shape)}
    if np_.colour:
        out.add(("colour", np_.shape, np_.colour))
    if np_.size:
        out.add(("size", np_.shape, np_.size))
    return out


def parsed_fact_set(parsed: ParsedCaption) -> set[Fact]:
    """The atomic facts of one parsed caption (noun phrases and relations)."""
    out: set[Fact] = set()
    for np_ in parsed.nps:
        out |= _np_facts(np_)
    for i, rel, j in parsed.relations:
        out.add(_normalised(parsed.nps[i].shape, rel, parsed.nps[j].shape))
    return out


def _sentence_facts(sentence: str, config: WorldConfig) -> set[Fact]:
    words = sentence.split()
    out: set[Fact] = set()
    if "background" in words:  # "on a light gray background", "The background is beige with ... small dots"
        out |= {("background", b) for b in config.backgrounds if f"{b} background" in sentence
                or f"background is {b}" in sentence}
        out |= {("count", n) for w, n in _COUNTS.items() if f"{w} object" in sentence or f"{w} shape" in sentence}
        return out
    m = _RELATION_SENTENCE.match(sentence)
    phrases = [p.strip() for p in m["rels"].split(" and ")] if m else []
    if m and phrases and all(p in _PHRASE_TO_REL for p in phrases):
        clauses = [f"{m['a']} {p} {m['b']}" for p in phrases]  # "the A is above and to the left of the B"
    else:
        clauses = [sentence]
    position = next((p for p in _POSITION_PHRASES if p in sentence), None)
    for clause in clauses:
        parsed = parse_caption(clause, config)
        out |= parsed_fact_set(parsed)
        if position is not None and len(parsed.nps) == 1:
            out.add(("position", parsed.nps[0].shape, position))
    return out


def caption_fact_set(text: str, config: WorldConfig) -> frozenset[Fact]:
    """Every atomic fact a short caption or a long description states (see the module docstring).

    Sentences that name nothing of the vocabulary ("Nothing else appears in the picture.") state nothing.

    Raises:
        CaptionParseError: a sentence names vocabulary words but is not in the world's language.
    """
    vocab = {*config.shapes, *config.colours, *config.sizes}
    out: set[Fact] = set()
    for raw in re.split(r"[.!?]+", text.lower()):
        sentence = " ".join(re.findall(r"[a-z0-9]+", raw))
        if sentence and (vocab & set(sentence.split()) or "background" in sentence):
            out |= _sentence_facts(sentence, config)
    return frozenset(out)


def scene_fact_set(scene: Scene, config: WorldConfig) -> frozenset[Fact]:
    """Everything true of ``scene`` in :func:`caption_fact_set`'s terms."""
    from .captions import position_phrase

    objs: tuple[SceneObject, ...] = scene.objects
    out: set[Fact] = {("count", len(objs)), ("background", scene.background)}
    for o in objs:
        out |= _np_facts(NounPhrase(o.shape, o.colour, o.size))
        out.add(("position", o.shape, position_phrase(o, config.grid)))
    for a, oa in enumerate(objs):
        for b, ob in enumerate(objs):
            if a != b:
                out |= {_normalised(oa.shape, r, ob.shape) for r in RELATIONS if relation_holds(oa, r, ob)}
    return frozenset(out)
