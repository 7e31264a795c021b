"""Scene graphs: what a synthetic image contains, sampled deterministically from (seed, split, index).

Objects sit in distinct cells of a ``grid x grid`` layout. Spatial relations are read from the cells, never from
pixel coordinates, so "left of" is true exactly when the subject's column is smaller: there is no borderline case
for a caption, a negative or a checker to disagree about.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .config import RELATIONS, SPLITS, WorldConfig


@dataclass(frozen=True)
class SceneObject:
    """One object of a scene.

    Attributes:
        shape, colour, size: vocabulary words.
        row, col: grid cell, ``(0, 0)`` is the top-left cell.
        dx, dy: centre offset inside the cell as a fraction of the free margin, in [-1, 1].
        rotation: drawing rotation in degrees (small, so a square never reads as a diamond).
    """

    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: float = 0.0
    dy: float = 0.0
    rotation: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Objects plus background. ``objects`` order is the caption order (the first is the short caption's subject)."""

    objects: tuple[SceneObject, ...]
    background: str
    texture: str
    texture_seed: int = 0

    def relations(self, a: int, b: int) -> tuple[str, ...]:
        """Every relation in :data:`RELATIONS` that holds for ``objects[a] <rel> objects[b]``."""
        return tuple(r for r in RELATIONS if relation_holds(self.objects[a], r, self.objects[b]))


def relation_holds(a: SceneObject, rel: str, b: SceneObject) -> bool:
    """Whether ``a <rel> b`` holds on the grid."""
    if rel == "left of":
        return a.col < b.col
    if rel == "right of":
        return a.col > b.col
    if rel == "above":
        return a.row < b.row
    if rel == "below":
        return a.row > b.row
    raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}")


def scene_rng(seed: int, split: str, index: int, stream: str) -> random.Random:
    """Independent deterministic random stream per (seed, split, index, purpose).

    String seeds go through SHA-512 inside :class:`random.Random`, so they do not depend on PYTHONHASHSEED.
    """
    return random.Random(f"vladva-synth/{seed}/{split}/{index}/{stream}")


def sample_scene(config: WorldConfig, split: str, index: int) -> Scene:
    """The scene number ``index`` of ``split`` (``"train"`` or ``"test"``).

    Train scenes never contain a held-out (colour, shape) pair; test scenes always contain at least one.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0:
        raise ValueError(f"scene index must be >= 0, got {index}")
    rng = scene_rng(config.seed, split, index, "scene")
    n = rng.randint(config.min_objects, config.max_objects)
    heldout = config.heldout_set
    colours = list(config.colours)
    pairs: list[tuple[str, str]] = []
    if split == "test" and heldout:
        pairs.append(rng.choice(sorted(heldout)))
    while len(pairs) < n:
        used_shapes = {s for _, s in pairs}
        used_colours = {c for c, _ in pairs}
        free = [
            (c, s) for s in config.shapes for c in colours
            if s not in used_shapes and c not in used_colours and (split == "test" or (c, s) not in heldout)
        ]
        if not free:  # a tiny vocabulary can run out; fewer objects is still a valid scene
            break
        pairs.append(rng.choice(free))
    rng.shuffle(pairs)
    cells = rng.sample([(r, c) for r in range(config.grid) for c in range(config.grid)], len(pairs))
    objects = tuple(
        SceneObject(
            shape=s, colour=c, size=rng.choice(sorted(config.sizes)), row=cell[0], col=cell[1],
            dx=rng.uniform(-1, 1), dy=rng.uniform(-1, 1), rotation=rng.uniform(-12, 12),
        )
        for (c, s), cell in zip(pairs, cells)
    )
    return Scene(
        objects=objects,
        background=rng.choice(sorted(config.backgrounds)),
        texture=rng.choice(config.textures),
        texture_seed=rng.getrandbits(31),
    )
