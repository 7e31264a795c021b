"""Vocabulary and knobs of the synthetic compositional world.

Everything a scene can contain is named here, so a test or a user can shrink or grow the world without touching
the generator. Names are single words (shapes, colours, sizes) so captions stay parseable by
:mod:`vladva_openclip.synth.facts`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

# Object colours: saturated, so they stay distinguishable from every background and from each other at 64 px.
DEFAULT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
    "pink": (240, 110, 190),
    "cyan": (20, 200, 210),
}

# Backgrounds: light or dark neutrals that no object colour is close to.
DEFAULT_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light gray": (205, 205, 205),
    "beige": (235, 225, 200),
    "dark gray": (70, 70, 70),
}

DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
DEFAULT_TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "grainy")
# Size word -> object radius as a fraction of half a grid cell.
DEFAULT_SIZES: dict[str, float] = {"small": 0.5, "large": 0.92}
# Spatial relations, always read as "<subject> <relation> <object>" on the image plane (y grows downwards).
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CONVERSE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# (colour, shape) pairs that never occur in the train split and occur in every test scene.
DEFAULT_HELDOUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "star"),
    ("green", "hexagon"),
    ("yellow", "square"),
    ("purple", "circle"),
    ("orange", "diamond"),
)

SPLITS: tuple[str, ...] = ("train", "test")


#: the caption styles captions.py implements (it checks at import that its SHORT_STYLES / LONG_STYLES have exactly
#: these keys); named here so that validating a config does not import the caption generators
SHORT_STYLE_NAMES = ("detailed", "coarse")
LONG_STYLE_NAMES = ("full", "compact")


@dataclass(frozen=True)
class WorldConfig:
    """Vocabulary, image size and layout of the synthetic world.

    Attributes:
        shapes: shape names; each must have a drawer in :mod:`vladva_openclip.synth.render`.
        colours: object colour name -> RGB.
        backgrounds: background colour name -> RGB.
        textures: background textures (``plain``, ``striped``, ``dotted``, ``checkered``, ``grainy``).
        sizes: size word -> radius as a fraction of half a grid cell (in (0, 1]).
        relations: spatial relations captions may use; a subset of :data:`RELATIONS` closed under converse
            (paraphrases swap "A left of B" into "B right of A").
        image_size: side of the square output image in pixels.
        supersample: render at ``image_size * supersample`` and downscale, for anti-aliased edges.
        grid: objects sit in distinct cells of a ``grid x grid`` layout, so every spatial relation is unambiguous.
        min_objects, max_objects: objects per scene (objects in one scene never share a shape nor a colour, so
            "the red one" and "the circle" always name exactly one object).
        heldout: (colour, shape) pairs absent from the train split; every test scene has at least one.
        captions_per_image: distinct short captions per test image in the retrieval set (Karpathy ``sentences``).
        short_captions: style of the TRAIN split's short captions (``detailed`` or ``coarse``, see
            :mod:`vladva_openclip.synth.captions`). Evaluation items (the test split, its negatives, paraphrases
            and retrieval captions, Winoground) are always detailed, as benchmark captions are.
        long_captions: style of the long descriptions (``full`` or ``compact``), both splits.
        seed: base seed; every scene is a pure function of (seed, split, index).
    """

    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colours: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(DEFAULT_COLOURS))
    backgrounds: dict[str, tuple[int, int, int]] = field(default_factory=lambda: dict(DEFAULT_BACKGROUNDS))
    textures: tuple[str, ...] = DEFAULT_TEXTURES
    sizes: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SIZES))
    relations: tuple[str, ...] = RELATIONS
    image_size: int = 64
    supersample: int = 2
    grid: int = 3
    min_objects: int = 1
    max_objects: int = 3
    heldout: tuple[tuple[str, str], ...] = DEFAULT_HELDOUT
    captions_per_image: int = 2
    short_captions: str = "detailed"
    long_captions: str = "full"
    seed: int = 0

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.max_objects > min(len(self.shapes), len(self.colours), self.grid * self.grid):
            raise ValueError(
                f"max_objects={self.max_objects} exceeds what the vocabulary allows (objects in a scene need "
                f"distinct shapes, colours and grid cells: {len(self.shapes)} shapes, {len(self.colours)} colours, "
                f"{self.grid * self.grid} cells)"
            )
        if self.grid < 2:
            raise ValueError(f"grid must be >= 2 so that spatial relations exist, got {self.grid}")
        if len(self.sizes) < 1 or any(not 0 < r <= 1 for r in self.sizes.values()):
            raise ValueError(f"sizes must map words to radii in (0, 1], got {self.sizes}")
        bad = [r for r in self.relations if r not in RELATIONS or CONVERSE[r] not in self.relations]
        if bad or not self.relations:
            raise ValueError(
                f"relations must be a non-empty subset of {RELATIONS} closed under converse, got {self.relations}"
            )
        for name in (*self.shapes, *self.colours, *self.sizes):
            if not name.isalpha() or not name.islower():
                raise ValueError(f"shape, colour and size names must be single lowercase words, got {name!r}")
        if len({*self.shapes, *self.colours, *self.sizes}) != len(self.shapes) + len(self.colours) + len(self.sizes):
            raise ValueError("shape, colour and size words must all be distinct")
        for colour, shape in self.heldout:
            if colour not in self.colours or shape not in self.shapes:
                raise ValueError(f"held-out pair ({colour!r}, {shape!r}) is not in the vocabulary")
        # Each shape must keep at least one colour in train, or the train split could not show it at all.
        for shape in self.shapes:
            if all((c, shape) in self.heldout_set for c in self.colours):
                raise ValueError(f"every colour of {shape!r} is held out; the train split could not contain it")
        if self.captions_per_image < 1:
            raise ValueError(f"captions_per_image must be >= 1, got {self.captions_per_image}")
        for what, value, known in (("short_captions", self.short_captions, SHORT_STYLE_NAMES),
                                   ("long_captions", self.long_captions, LONG_STYLE_NAMES)):
            if value not in known:
                raise ValueError(f"{what}={value!r} is not a caption style; known: {', '.join(known)}")

    @property
    def heldout_set(self) -> frozenset[tuple[str, str]]:
        return frozenset(tuple(p) for p in self.heldout)

    def with_(self, **changes) -> WorldConfig:
        """A copy with some fields changed."""
        return replace(self, **changes)
