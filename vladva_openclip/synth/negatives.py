"""SugarCrepe-style hard negatives, one generator per type, each checked false against the scene.

Every generator lists candidate edits of the positive :class:`CaptionSpec`; :func:`make_negative` shuffles them
with the sample's own random stream and returns the first whose text the checker in
:mod:`vladva_openclip.synth.facts` finds FALSE for the scene. A type with no false candidate (e.g. ``swap_obj``
with one object, ``add_att`` when every size is already mentioned) gives None, so subsets differ in size, as the
real SugarCrepe subsets do.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

from .captions import CaptionSpec, NounPhrase, realise
from .config import WorldConfig
from .facts import holds
from .scene import Scene

CandidateFn = Callable[[CaptionSpec, Scene, WorldConfig], list[CaptionSpec]]
NEGATIVE_TYPES: dict[str, CandidateFn] = {}

# SugarCrepe's seven subsets; SugarCrepe++ has the first five (no add_*).
SUGARCREPE_SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
SUGARCREPE_PP_SUBSETS = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att")


def register_negative(name: str):
    def deco(fn: CandidateFn) -> CandidateFn:
        NEGATIVE_TYPES[name] = fn
        return fn
    return deco


def _with_np(spec: CaptionSpec, k: int, np_: NounPhrase) -> CaptionSpec:
    return replace(spec, nps=spec.nps[:k] + (np_,) + spec.nps[k + 1:])


@register_negative("replace_obj")
def _replace_obj(spec, scene, config):
    return [_with_np(spec, k, replace(n, shape=s)) for k, n in enumerate(spec.nps) for s in config.shapes
            if s != n.shape]


@register_negative("replace_att")
def _replace_att(spec, scene, config):
    out = [_with_np(spec, k, replace(n, colour=c)) for k, n in enumerate(spec.nps) if n.colour
           for c in config.colours if c != n.colour]
    out += [_with_np(spec, k, replace(n, size=z)) for k, n in enumerate(spec.nps) if n.size
            for z in config.sizes if z != n.size]
    return out


@register_negative("replace_rel")
def _replace_rel(spec, scene, config):
    if spec.relation is None:
        return []
    i, rel, j = spec.relation
    return [replace(spec, relation=(i, r, j)) for r in config.relations if r != rel]


def _swap_attributes(spec, fields: tuple[str, ...]):
    """Every caption with one attribute exchanged between two of its noun phrases (pairs in order, then ``fields``
    in order), where both phrases state the attribute and it differs."""
    out = []
    for i in range(len(spec.nps)):
        for j in range(i + 1, len(spec.nps)):
            a, b = spec.nps[i], spec.nps[j]
            for f in fields:
                va, vb = getattr(a, f), getattr(b, f)
                if va and vb and va != vb:
                    out.append(_with_np(_with_np(spec, i, replace(a, **{f: vb})), j, replace(b, **{f: va})))
    return out


@register_negative("swap_obj")
def _swap_obj(spec, scene, config):
    return _swap_attributes(spec, ("shape",))


@register_negative("swap_att")
def _swap_att(spec, scene, config):
    return _swap_attributes(spec, ("colour", "size"))


@register_negative("add_obj")
def _add_obj(spec, scene, config):
    mentioned = {n.shape for n in spec.nps}
    return [replace(spec, nps=spec.nps + (NounPhrase(shape=s, colour=c),))
            for s in config.shapes if s not in mentioned for c in config.colours]


@register_negative("add_att")
def _add_att(spec, scene, config):
    out = [_with_np(spec, k, replace(n, size=z)) for k, n in enumerate(spec.nps) if n.size is None
           for z in config.sizes]
    out += [_with_np(spec, k, replace(n, colour=c)) for k, n in enumerate(spec.nps) if n.colour is None
            for c in config.colours]
    return out


def make_negative(kind: str, spec: CaptionSpec, scene: Scene, config: WorldConfig,
                  rng: random.Random) -> CaptionSpec | None:
    """A negative of type ``kind`` that is false for ``scene``, or None when the type does not apply."""
    try:
        candidates = NEGATIVE_TYPES[kind](spec, scene, config)
    except KeyError:
        raise ValueError(f"unknown negative type {kind!r}; registered: {sorted(NEGATIVE_TYPES)}") from None
    rng.shuffle(candidates)
    positive = realise(spec)
    for cand in candidates:
        text = realise(cand)
        if text != positive and not holds(text, scene, config):
            return cand
    return None


def make_negatives(spec: CaptionSpec, scene: Scene, config: WorldConfig, rng: random.Random,
                   kinds: tuple[str, ...] = SUGARCREPE_SUBSETS) -> dict[str, CaptionSpec]:
    """One negative per applicable type, in ``kinds`` order."""
    out = {}
    for kind in kinds:
        neg = make_negative(kind, spec, scene, config, rng)
        if neg is not None:
            out[kind] = neg
    return out
