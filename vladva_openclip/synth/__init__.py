"""A synthetic compositional world for training and testing VladVA models without downloads.

Procedurally rendered scenes of 1-3 coloured shapes on plain or lightly textured backgrounds, each with a short
caption (contrastive target), a long description (next-token target), SugarCrepe-style hard negatives, a
SugarCrepe++-style paraphrase, Winoground-style pairs, and a held-out split of unseen (colour, shape) pairs.
Everything is a pure function of (seed, split, index).

    from vladva_openclip.synth import World, WorldConfig, build_world
    paths = build_world("/tmp/world", n_train=2000, n_test=200, seed=0)

or ``python -m vladva_openclip.synth --out /tmp/world --n-train 2000 --n-test 200``.
"""
from .build import DEFAULT_COLUMNS, PAIR_COLUMNS, WorldPaths, build_world
from .captions import (
    LONG_STYLES,
    SHORT_STYLES,
    CaptionSpec,
    NounPhrase,
    compact_long_caption,
    long_caption,
    paraphrase_spec,
    realise,
    sample_coarse_spec,
    sample_short_spec,
    spec_facts,
)
from .config import RELATIONS, WorldConfig
from .facts import CaptionParseError, ParsedCaption, holds, parse_caption, tokens
from .negatives import NEGATIVE_TYPES, SUGARCREPE_PP_SUBSETS, SUGARCREPE_SUBSETS, make_negative, make_negatives
from .render import SHAPES, TEXTURES, png_bytes, register_shape, register_texture, render_scene
from .scene import Scene, SceneObject, relation_holds, sample_scene
from .winoground import WINOGROUND_KINDS, WinogroundExample, make_winoground_example
from .world import Sample, World
from .writers import (
    ShardWriter,
    write_karpathy_json,
    write_sugarcrepe,
    write_sugarcrepe_pp,
    write_table,
    write_winoground_jsonl,
)

__all__ = [
    "DEFAULT_COLUMNS", "LONG_STYLES", "NEGATIVE_TYPES", "PAIR_COLUMNS", "RELATIONS", "SHAPES", "SHORT_STYLES",
    "SUGARCREPE_PP_SUBSETS", "SUGARCREPE_SUBSETS", "TEXTURES", "WINOGROUND_KINDS", "CaptionParseError", "CaptionSpec",
    "NounPhrase", "ParsedCaption", "Sample", "Scene", "SceneObject", "ShardWriter", "WinogroundExample", "World",
    "WorldConfig", "WorldPaths", "build_world", "compact_long_caption", "holds", "long_caption", "make_negative",
    "make_negatives", "make_winoground_example", "paraphrase_spec", "parse_caption", "png_bytes", "realise",
    "register_shape", "register_texture", "relation_holds", "render_scene", "sample_coarse_spec", "sample_scene",
    "sample_short_spec", "spec_facts", "tokens", "write_karpathy_json", "write_sugarcrepe", "write_sugarcrepe_pp",
    "write_table", "write_winoground_jsonl",
]
