"""Short captions (as structured specs), paraphrases and long descriptions of synthetic scenes.

A short caption is first a :class:`CaptionSpec` (noun phrases, at most one spatial relation, phrasing choices)
and only then text, via :func:`realise`. Negatives and paraphrases edit the spec, so what changed between two
captions is known structurally; :mod:`vladva_openclip.synth.facts` parses the text back to check it.

Caption styles are registries (``WorldConfig.short_captions`` / ``long_captions`` pick one by name):

- short: ``detailed`` (every object with its colour, sizes at random, one relation: already compositional) or
  ``coarse`` (a few words naming only part of the scene: some of its objects, by shape and maybe colour, no size,
  no relation), the paper's premise for its short, contrastive captions;
- long: ``full`` (count, background and its texture, every object with size, colour and position, a sentence
  about each shape, every pairwise relation, a closing sentence; ~90 tokens) or ``compact`` (the same facts
  without the filler sentences: count, background, objects, relations; ~50 tokens).
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from .config import CONVERSE, LONG_STYLE_NAMES, SHORT_STYLE_NAMES, WorldConfig
from .scene import Scene, SceneObject

# Relation word -> surface phrasings (index = CaptionSpec.rel_variant). The parser accepts all of them.
REL_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
# Caption openers; words here carry no facts (the parser skips them).
PREFIXES: tuple[str, ...] = ("", "there is", "a picture of", "an image showing", "a drawing of")


@dataclass(frozen=True)
class NounPhrase:
    """``[article] [size] [colour] shape``; None means "not mentioned"."""

    shape: str
    colour: str | None = None
    size: str | None = None

    def key(self) -> tuple[str, str | None, str | None]:
        return (self.shape, self.colour, self.size)


@dataclass(frozen=True)
class CaptionSpec:
    """A short caption before it becomes text.

    Attributes:
        nps: the noun phrases, each naming one distinct object.
        relation: ``(i, rel, j)`` read "nps[i] rel nps[j]", or None.
        prefix: an opener from :data:`PREFIXES`.
        rel_variant: index into :data:`REL_PHRASES` ``[rel]``.
        extras_first: put the noun phrases outside the relation clause before it instead of after it.
    """

    nps: tuple[NounPhrase, ...]
    relation: tuple[int, str, int] | None = None
    prefix: str = ""
    rel_variant: int = 0
    extras_first: bool = False

    def __post_init__(self):
        if not self.nps:
            raise ValueError("a caption needs at least one noun phrase")
        if self.relation is not None:
            i, rel, j = self.relation
            if rel not in REL_PHRASES or i == j or not (0 <= i < len(self.nps) and 0 <= j < len(self.nps)):
                raise ValueError(f"bad relation {self.relation} for {len(self.nps)} noun phrases")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def np_text(np_: NounPhrase) -> str:
    words = [w for w in (np_.size, np_.colour, np_.shape) if w]
    return f"{article(words[0])} {' '.join(words)}"


def realise(spec: CaptionSpec) -> str:
    """The caption text of ``spec`` (lowercase, no final period)."""
    if spec.relation is not None:
        i, rel, j = spec.relation
        phrases = REL_PHRASES[rel]
        clause = f"{np_text(spec.nps[i])} {phrases[spec.rel_variant % len(phrases)]} {np_text(spec.nps[j])}"
        in_clause = {i, j}
    else:
        clause, in_clause = np_text(spec.nps[0]), {0}
    extras = [np_text(n) for k, n in enumerate(spec.nps) if k not in in_clause]
    parts = [*extras, clause] if spec.extras_first else [clause, *extras]
    body = " and ".join(parts)
    return f"{spec.prefix} {body}" if spec.prefix else body


def spec_facts(spec: CaptionSpec) -> tuple[Counter, frozenset]:
    """What ``spec`` claims, independent of wording: (multiset of noun phrases, set of normalised relations).

    Relations are normalised to ``left of`` / ``above`` (``A right of B`` is ``B left of A``).
    """
    nps = Counter(n.key() for n in spec.nps)
    rels = set()
    if spec.relation is not None:
        i, rel, j = spec.relation
        a, b = spec.nps[i].key(), spec.nps[j].key()
        rels.add((b, CONVERSE[rel], a) if rel in ("right of", "below") else (a, rel, b))
    return nps, frozenset(rels)


def np_of(obj: SceneObject, with_size: bool) -> NounPhrase:
    return NounPhrase(shape=obj.shape, colour=obj.colour, size=obj.size if with_size else None)


def sample_short_spec(scene: Scene, config: WorldConfig, rng: random.Random) -> tuple[CaptionSpec, tuple[int, ...]]:
    """A true short caption of ``scene`` and, for each noun phrase, the index of the scene object it names.

    Every object is mentioned with its colour; sizes are mentioned at random (so ``add_att`` has room); two
    objects, when there are two or more, are linked by a relation that holds for them.
    """
    n = len(scene.objects)
    order = list(range(n))
    rng.shuffle(order)
    relation = None
    if n >= 2:
        pairs = [(a, b) for a in range(n) for b in range(n) if a != b]
        rng.shuffle(pairs)
        for a, b in pairs:
            holding = [r for r in scene.relations(a, b) if r in config.relations]
            if holding:
                rest = [k for k in order if k not in (a, b)]
                order = [a, b, *rest]
                relation = (0, rng.choice(holding), 1)
                break
    nps = tuple(np_of(scene.objects[k], with_size=rng.random() < 0.5) for k in order)
    prefix = PREFIXES[0] if rng.random() < 0.6 else rng.choice(PREFIXES[1:])
    spec = CaptionSpec(
        nps=nps, relation=relation, prefix=prefix, rel_variant=rng.randrange(2),
        extras_first=n > 2 and rng.random() < 0.25,
    )
    return spec, tuple(order)


def sample_coarse_spec(scene: Scene, config: WorldConfig,
                       rng: random.Random) -> tuple[CaptionSpec, tuple[int, ...]]:
    """A coarse true caption: only part of the scene, in a few words.

    A scene of ``n >= 2`` objects gets ``1 .. n-1`` of them named, never all; a single object is named by its shape,
    with its colour half of the time. No sizes, no relations: what the scene's objects look like next to each
    other is left to the long caption.
    """
    n = len(scene.objects)
    k = 1 if n == 1 else rng.randint(1, n - 1)
    order = rng.sample(range(n), k)
    nps = tuple(NounPhrase(shape=scene.objects[i].shape,
                           colour=scene.objects[i].colour if rng.random() < 0.5 else None) for i in order)
    prefix = PREFIXES[0] if rng.random() < 0.6 else rng.choice(PREFIXES[1:])
    return CaptionSpec(nps=nps, prefix=prefix), tuple(order)


ShortStyle = Callable[[Scene, WorldConfig, random.Random], tuple[CaptionSpec, tuple[int, ...]]]
#: short-caption style name -> spec sampler (``WorldConfig.short_captions``)
SHORT_STYLES: dict[str, ShortStyle] = {"detailed": sample_short_spec, "coarse": sample_coarse_spec}


def paraphrase_spec(spec: CaptionSpec, rng: random.Random) -> CaptionSpec:
    """Same facts, different words: the converse relation with its arguments swapped, and another opener."""
    new = spec
    if spec.relation is not None:
        i, rel, j = spec.relation
        new = replace(new, relation=(j, CONVERSE[rel], i), rel_variant=1 - spec.rel_variant % 2)
    elif len(spec.nps) > 1:
        new = replace(new, nps=tuple(reversed(spec.nps)))
    other = [p for p in PREFIXES if p != spec.prefix and p]
    return replace(new, prefix=rng.choice(other))


# ---------------------------------------------------------------------------------------------- long captions

_ROW_WORDS = ("top", "middle", "bottom")
_COL_WORDS = ("left", "center", "right")
_SHAPE_DETAIL = {
    "circle": "is perfectly round",
    "square": "has four equal sides",
    "triangle": "has three sharp corners",
    "star": "has five pointed tips",
    "diamond": "stands on one of its corners",
    "hexagon": "has six straight sides",
}
_TEXTURE_DETAIL = {
    "plain": "and completely plain",
    "striped": "with faint diagonal stripes",
    "dotted": "with a faint pattern of small dots",
    "checkered": "with a faint checkerboard pattern",
    "grainy": "with a slightly grainy, speckled texture",
}
_COUNT_WORDS = {1: ("a single object", "one shape"), 2: ("two objects", "two shapes"),
                3: ("three objects", "three shapes"), 4: ("four objects", "four shapes")}


def _third(k: int, grid: int) -> int:
    return min(2, (3 * k) // grid)


def position_phrase(obj: SceneObject, grid: int) -> str:
    """Where ``obj`` is in the frame, e.g. ``"in the top left corner"`` or ``"in the center"``."""
    row, col = _ROW_WORDS[_third(obj.row, grid)], _COL_WORDS[_third(obj.col, grid)]
    if row == "middle" and col == "center":
        return "in the center"
    if row == "middle":
        return f"on the {col} side"
    if col == "center":
        return f"at the {row}"
    return f"in the {row} {col} corner"


def _relation_words(rels: tuple[str, ...]) -> str:
    words = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
    # vertical first reads more naturally: "above and to the left of"
    ordered = sorted(rels, key=lambda r: r not in ("above", "below"))
    return " and ".join(words[r] for r in ordered)


def _count_sentence(scene: Scene, rng: random.Random) -> str:
    n = len(scene.objects)
    count = rng.choice(_COUNT_WORDS.get(n, (f"{n} objects",)))
    bg = scene.background
    return rng.choice((
        f"The image shows {count} on a {bg} background.",
        f"This picture contains {count} drawn on a {bg} background.",
        f"In this image there are {count} on a {bg} background." if n > 1 else
        f"In this image there is {count} on a {bg} background.",
    ))


def _object_sentence(obj: SceneObject, config: WorldConfig, rng: random.Random) -> str:
    what = f"{obj.size} {obj.colour} {obj.shape}"
    where = position_phrase(obj, config.grid)
    return rng.choice((
        f"{where.capitalize()}, there is {article(what)} {what}.",
        f"{article(what).capitalize()} {what} is located {where} of the frame."
        if "corner" in where else f"{article(what).capitalize()} {what} is placed {where}.",
        f"{where.capitalize()} we can see {article(what)} {what}.",
    ))


def _relation_sentences(scene: Scene, rng: random.Random) -> list[str]:
    """One sentence per pair of objects with every relation between them, in a random direction."""
    out = []
    n = len(scene.objects)
    for a in range(n):
        for b in range(a + 1, n):
            oa, ob = scene.objects[a], scene.objects[b]
            if rng.random() < 0.5:
                oa, ob, rels = ob, oa, scene.relations(b, a)
            else:
                rels = scene.relations(a, b)
            out.append(f"The {oa.name} is {_relation_words(rels)} the {ob.name}.")
    return out


def long_caption(scene: Scene, config: WorldConfig, rng: random.Random, max_words: int = 120) -> str:
    """A detailed description (about 30-120 words): count, background, each object with size, colour and
    position in the frame, and every pairwise spatial relation. Optional detail sentences are dropped to stay
    within ``max_words`` where possible."""
    n = len(scene.objects)
    sentences = [_count_sentence(scene, rng)]
    optional: list[int] = []  # shape-detail sentences, dropped (last first) if the text runs past max_words
    sentences.append(f"The background is {scene.background} "
                     f"{_TEXTURE_DETAIL.get(scene.texture, 'with a light texture')}.")
    for obj in scene.objects:
        sentences.append(_object_sentence(obj, config, rng))
        if n < 3 or rng.random() < 0.5:
            detail = _SHAPE_DETAIL.get(obj.shape, "has a simple outline")
            sentences.append(f"The {obj.shape} {detail}.")
            optional.append(len(sentences) - 1)
    sentences.extend(_relation_sentences(scene, rng))
    sentences.append(rng.choice(
        ("It is the only object in the picture.", "Nothing else appears in the picture.") if n == 1 else
        ("There is nothing else in the image.", "No other objects are visible.",
         "Apart from these, the picture is empty.")
    ))
    while optional and sum(len(x.split()) for x in sentences) > max_words:
        sentences[optional.pop()] = ""
    return " ".join(x for x in sentences if x)


def compact_long_caption(scene: Scene, config: WorldConfig, rng: random.Random) -> str:
    """Every fact of :func:`long_caption` (count, background, each object's size, colour and position, every
    pairwise relation) without its filler sentences (texture, what each shape looks like, the closing line)."""
    sentences = [_count_sentence(scene, rng)]
    sentences.extend(_object_sentence(obj, config, rng) for obj in scene.objects)
    sentences.extend(_relation_sentences(scene, rng))
    return " ".join(sentences)


LongStyle = Callable[[Scene, WorldConfig, random.Random], str]
#: long-caption style name -> writer (``WorldConfig.long_captions``)
LONG_STYLES: dict[str, LongStyle] = {"full": long_caption, "compact": compact_long_caption}
if tuple(SHORT_STYLES) != SHORT_STYLE_NAMES or tuple(LONG_STYLES) != LONG_STYLE_NAMES:  # pragma: no cover
    raise ImportError("synth/config.py's SHORT_STYLE_NAMES / LONG_STYLE_NAMES must name the styles captions.py "
                      f"implements: {tuple(SHORT_STYLES)} / {tuple(LONG_STYLES)}")
