"""Winoground-style pairs: two captions with the same words in a different order, and an image for each.

Every pair has two objects linked by one relation. Each kind swaps something different between caption 0 and
caption 1 and renders image k to match caption k (and not the other caption):

- ``colour``: the two colour adjectives ("a red circle left of a blue square" / "a blue circle left of a red
  square"); tag ``Adjective-Color``, collapsed ``Relation`` (Winoground files adjective swaps under Relation).
- ``size``: the two size adjectives; tag ``Adjective-Size``, collapsed ``Relation``.
- ``shape``: the two nouns; tag ``Noun``, collapsed ``Object``.
- ``argument``: the two whole noun phrases around the relation; tag ``Noun Phrase``, collapsed ``Object``.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from .captions import CaptionSpec, NounPhrase, realise
from .config import WorldConfig
from .scene import Scene, SceneObject, relation_holds, scene_rng


@dataclass(frozen=True)
class WinogroundExample:
    """One example in the shape of a row of Winoground's ``examples.jsonl`` (plus the scenes)."""

    id: int
    scenes: tuple[Scene, Scene]
    captions: tuple[str, str]
    tag: str
    collapsed_tag: str
    secondary_tag: str = ""
    num_main_preds: int = 1

    def image_name(self, k: int) -> str:
        return f"ex_{self.id}_img_{k}"

    def record(self) -> dict:
        return {
            "id": self.id, "image_0": self.image_name(0), "image_1": self.image_name(1),
            "caption_0": self.captions[0], "caption_1": self.captions[1], "tag": self.tag,
            "secondary_tag": self.secondary_tag, "num_main_preds": self.num_main_preds,
            "collapsed_tag": self.collapsed_tag,
        }


@dataclass(frozen=True)
class _Base:
    """The two objects of caption 0 / image 0: (shape, colour, size) each, their cells and the relation."""

    a: tuple[str, str, str]
    b: tuple[str, str, str]
    cell_a: tuple[int, int]
    cell_b: tuple[int, int]
    rel: str


# kind -> (tag, collapsed_tag, swap). swap(base) returns the objects of image 1 as
# ((shape, colour, size), cell) for the subject and the object of caption 1, in caption order.
Placed = tuple[tuple[str, str, str], tuple[int, int]]  # ((shape, colour, size), cell)
Swap = Callable[[_Base], tuple[Placed, Placed]]
WINOGROUND_KINDS: dict[str, tuple[str, str, Swap]] = {
    "colour": ("Adjective-Color", "Relation",
               lambda p: (((p.a[0], p.b[1], p.a[2]), p.cell_a), ((p.b[0], p.a[1], p.b[2]), p.cell_b))),
    "size": ("Adjective-Size", "Relation",
             lambda p: (((p.a[0], p.a[1], p.b[2]), p.cell_a), ((p.b[0], p.b[1], p.a[2]), p.cell_b))),
    "shape": ("Noun", "Object",
              lambda p: (((p.b[0], p.a[1], p.a[2]), p.cell_a), ((p.a[0], p.b[1], p.b[2]), p.cell_b))),
    # caption 1 reads "b rel a", so in image 1 b sits where a was.
    "argument": ("Noun Phrase", "Object", lambda p: ((p.b, p.cell_a), (p.a, p.cell_b))),
}


def _cells_for(rel: str, grid: int, rng: random.Random) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two cells where ``rel`` is the only relation between them (same row or same column)."""
    line = rng.randrange(grid)
    lo, hi = sorted(rng.sample(range(grid), 2))
    first, second = {
        "left of": ((line, lo), (line, hi)), "right of": ((line, hi), (line, lo)),
        "above": ((lo, line), (hi, line)), "below": ((hi, line), (lo, line)),
    }[rel]
    return first, second


def _obj(attrs: tuple[str, str, str], cell: tuple[int, int], rng: random.Random) -> SceneObject:
    shape, colour, size = attrs
    return SceneObject(shape=shape, colour=colour, size=size, row=cell[0], col=cell[1],
                       dx=rng.uniform(-1, 1), dy=rng.uniform(-1, 1), rotation=rng.uniform(-12, 12))


def _caption(x: tuple[str, str, str], rel: str, y: tuple[str, str, str], variant: int, with_size: bool) -> str:
    def np_(t):
        return NounPhrase(shape=t[0], colour=t[1], size=t[2] if with_size else None)
    return realise(CaptionSpec(nps=(np_(x), np_(y)), relation=(0, rel, 1), rel_variant=variant))


def make_winoground_example(config: WorldConfig, index: int, kind: str | None = None) -> WinogroundExample:
    """Example ``index`` (deterministic in ``config.seed``); ``kind`` is drawn at random unless given."""
    rng = scene_rng(config.seed, "winoground", index, "pair")
    kinds = sorted(k for k in WINOGROUND_KINDS if k != "size" or len(config.sizes) > 1)
    kind = kind or rng.choice(kinds)
    if kind not in WINOGROUND_KINDS:
        raise ValueError(f"unknown Winoground kind {kind!r}; registered: {sorted(WINOGROUND_KINDS)}")
    tag, collapsed, swap = WINOGROUND_KINDS[kind]
    shapes = rng.sample(list(config.shapes), 2)
    colours = rng.sample(sorted(config.colours), 2)
    sizes = rng.sample(sorted(config.sizes), 2) if kind == "size" else [rng.choice(sorted(config.sizes))] * 2
    rel = rng.choice(config.relations)
    cell_a, cell_b = _cells_for(rel, config.grid, rng)
    base = _Base(a=(shapes[0], colours[0], sizes[0]), b=(shapes[1], colours[1], sizes[1]),
                 cell_a=cell_a, cell_b=cell_b, rel=rel)
    (x1, c1), (y1, d1) = swap(base)
    variant = rng.randrange(2)
    with_size = kind == "size"
    captions = (_caption(base.a, rel, base.b, variant, with_size), _caption(x1, rel, y1, variant, with_size))
    background, texture = rng.choice(sorted(config.backgrounds)), rng.choice(config.textures)
    scenes = (
        Scene(objects=(_obj(base.a, cell_a, rng), _obj(base.b, cell_b, rng)), background=background,
              texture=texture, texture_seed=rng.getrandbits(31)),
        Scene(objects=(_obj(x1, c1, rng), _obj(y1, d1, rng)), background=background, texture=texture,
              texture_seed=rng.getrandbits(31)),
    )
    assert relation_holds(scenes[1].objects[0], rel, scenes[1].objects[1]), "swap broke the relation"
    return WinogroundExample(id=index, scenes=scenes, captions=captions, tag=tag, collapsed_tag=collapsed)
