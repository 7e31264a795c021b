"""Facts stated by a long (generated) caption of the synthetic world, checked against the scene.

The world's own parser (:func:`vladva_openclip.synth.parse_caption`) reads its short-caption language; a long
description is a sequence of such sentences plus position phrases and background sentences, which carry no
object facts (background sentences are skipped: "a faint pattern of small dots" is not a small object).
Each sentence is parsed on its own; a relation sentence with several relations ("The yellow square is above and
to the left of the red circle.") is split into one clause per relation first. Facts are grounded on the scene by
shape (no two objects of a scene share a shape):

- objects: the shapes named;
- attributes: (shape, colour) and (shape, size) as stated;
- relations: (object, relation, object), normalised to ``left of`` / ``above``; true when both noun phrases
  match scene objects (shape, and colour/size where stated) and the relation holds on the grid.

Precision = true stated facts / stated facts; recall = scene facts stated / scene facts (every object, its colour
and size, every pairwise relation: what the world's reference descriptions always state).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..synth import CaptionParseError, NounPhrase, Scene, WorldConfig, parse_caption, relation_holds
from ..synth.captions import REL_PHRASES
from ..synth.config import CONVERSE

__all__ = ["FACT_KINDS", "StatedFacts", "caption_facts", "fact_scores", "scene_facts"]

FACT_KINDS = ("object", "attribute", "relation")
_PHRASE_TO_REL = {p: rel for rel, phrases in REL_PHRASES.items() for p in phrases}
_RELATION_SENTENCE = re.compile(r"^the (?P<a>.+?) is (?P<rels>.+) the (?P<b>.+?)$")


@dataclass
class StatedFacts:
    """Facts of one caption (or of a scene): sets of hashable tuples per kind, plus bookkeeping.

    ``unparsed`` counts sentences that name vocabulary words but are not in the world's language (a garbled
    generation); they state nothing, so they lower recall, not precision.
    """

    objects: set[str] = field(default_factory=set)
    attributes: set[tuple[str, str, str]] = field(default_factory=set)
    relations: set[tuple[tuple[str, str | None, str | None], str, tuple[str, str | None, str | None]]] = \
        field(default_factory=set)
    sentences: int = 0
    unparsed: int = 0

    def by_kind(self) -> dict[str, set]:
        return {"object": self.objects, "attribute": self.attributes, "relation": self.relations}


def _normalise(a: NounPhrase, rel: str, b: NounPhrase) -> tuple:
    """``A right of B`` is ``B left of A``; ``A below B`` is ``B above A``."""
    if rel in ("right of", "below"):
        a, b, rel = b, a, CONVERSE[rel]
    return (a.key(), rel, b.key())


def _add_nps(facts: StatedFacts, nps: Iterable[NounPhrase]) -> None:
    for np_ in nps:
        facts.objects.add(np_.shape)
        if np_.colour:
            facts.attributes.add((np_.shape, "colour", np_.colour))
        if np_.size:
            facts.attributes.add((np_.shape, "size", np_.size))


def _relation_clauses(sentence: str) -> list[str] | None:
    """``"the A is R1 and R2 the B"`` -> ``["A R1 B", "A R2 B"]``; None if the sentence is not of that form."""
    m = _RELATION_SENTENCE.match(sentence)
    if m is None:
        return None
    phrases = [p.strip() for p in m["rels"].split(" and ")]
    if not phrases or any(p not in _PHRASE_TO_REL for p in phrases):
        return None
    return [f"{m['a']} {p} {m['b']}" for p in phrases]


def caption_facts(text: str, config: WorldConfig) -> StatedFacts:
    """The facts a long caption states (see the module docstring)."""
    facts = StatedFacts()
    vocab = {*config.shapes, *config.colours, *config.sizes}
    for raw in re.split(r"[.!?]+", text.lower()):
        sentence = " ".join(re.findall(r"[a-z0-9]+", raw))
        if not sentence:
            continue
        facts.sentences += 1
        if "background" in sentence.split():  # background colour and texture: no object facts ("small dots")
            continue
        clauses = _relation_clauses(sentence) or [sentence]
        try:
            parsed = [parse_caption(c, config) for c in clauses]
        except CaptionParseError:
            if vocab & set(sentence.split()):
                facts.unparsed += 1
            continue
        for p in parsed:
            _add_nps(facts, p.nps)
            for i, rel, j in p.relations:
                facts.relations.add(_normalise(p.nps[i], rel, p.nps[j]))
    return facts


def scene_facts(scene: Scene) -> StatedFacts:
    """Everything true of the scene that a complete description states."""
    facts = StatedFacts()
    nps = [NounPhrase(o.shape, o.colour, o.size) for o in scene.objects]
    _add_nps(facts, nps)
    for a in range(len(nps)):
        for b in range(len(nps)):
            if a != b:
                for rel in scene.relations(a, b):
                    facts.relations.add(_normalise(nps[a], rel, nps[b]))
    return facts


def _grounded(key: tuple[str, str | None, str | None], scene: Scene):
    shape, colour, size = key
    for o in scene.objects:
        if o.shape == shape and (colour is None or o.colour == colour) and (size is None or o.size == size):
            return o
    return None


def _true(kind: str, fact, scene: Scene) -> bool:
    if kind == "object":
        return any(o.shape == fact for o in scene.objects)
    if kind == "attribute":
        shape, attr, value = fact
        return any(o.shape == shape and getattr(o, attr) == value for o in scene.objects)
    a, rel, b = fact
    oa, ob = _grounded(a, scene), _grounded(b, scene)
    return oa is not None and ob is not None and oa is not ob and relation_holds(oa, rel, ob)


def _relation_key(fact, scene: Scene):
    """A true relation fact as (object index, rel, object index), to compare with the scene's own."""
    a, rel, b = fact
    objs = list(scene.objects)
    return (objs.index(_grounded(a, scene)), rel, objs.index(_grounded(b, scene)))


def fact_scores(stated: StatedFacts, scene: Scene) -> dict[str, dict[str, float | int]]:
    """Per kind (and ``all``): counts of stated / true / scene facts, precision and recall (%, NaN when a
    denominator is 0)."""
    truth = scene_facts(scene)
    out: dict[str, dict[str, float | int]] = {}
    totals = {"stated": 0, "true": 0, "scene": 0, "recalled": 0}
    for kind in FACT_KINDS:
        said = stated.by_kind()[kind]
        true = [f for f in said if _true(kind, f, scene)]
        if kind == "relation":
            recalled = len({_relation_key(f, scene) for f in true}
                           & {_relation_key(f, scene) for f in truth.relations})
        else:
            recalled = len(set(true) & truth.by_kind()[kind])
        n_scene = len(truth.by_kind()[kind])
        out[kind] = {"stated": len(said), "true": len(true), "scene": n_scene, "recalled": recalled,
                     "precision": 100.0 * len(true) / len(said) if said else float("nan"),
                     "recall": 100.0 * recalled / n_scene if n_scene else float("nan")}
        for k, v in (("stated", len(said)), ("true", len(true)), ("scene", n_scene), ("recalled", recalled)):
            totals[k] += v
    out["all"] = {**totals, "precision": 100.0 * totals["true"] / totals["stated"] if totals["stated"] else
                  float("nan"), "recall": 100.0 * totals["recalled"] / totals["scene"] if totals["scene"] else
                  float("nan")}
    return out
