"""Rendering a :class:`~vladva_openclip.synth.scene.Scene` to a PIL image.

Drawing happens at ``image_size * supersample`` and is downscaled once, which anti-aliases the edges for about
1 ms per 64 px image. Shapes and textures come from registries, so adding one is adding a function.
"""
from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from .config import WorldConfig
from .scene import Scene, SceneObject

Point = tuple[float, float]
ShapeFn = Callable[[float, float, float, float], list[Point]]
TextureFn = Callable[[ImageDraw.ImageDraw, int, tuple[int, int, int], int], None]

SHAPES: dict[str, ShapeFn] = {}
TEXTURES: dict[str, TextureFn] = {}


def register_shape(name: str):
    """Register ``fn(cx, cy, r, rotation_deg) -> polygon points`` (a circle returns an empty list)."""
    def deco(fn: ShapeFn) -> ShapeFn:
        SHAPES[name] = fn
        return fn
    return deco


def register_texture(name: str):
    """Register ``fn(draw, canvas_size, shade_rgb, seed)`` that paints the texture over the plain background."""
    def deco(fn: TextureFn) -> TextureFn:
        TEXTURES[name] = fn
        return fn
    return deco


def _regular(cx: float, cy: float, radii: list[float], rotation: float, start: float = -90.0) -> list[Point]:
    n = len(radii)
    return [
        (cx + r * math.cos(math.radians(start + rotation + 360.0 * k / n)),
         cy + r * math.sin(math.radians(start + rotation + 360.0 * k / n)))
        for k, r in enumerate(radii)
    ]


@register_shape("circle")
def _circle(cx, cy, r, rotation):
    return []


@register_shape("square")
def _square(cx, cy, r, rotation):
    # r is the circumradius budget; shrink so the square's area reads like the circle's.
    return _regular(cx, cy, [r * 1.15] * 4, rotation, start=-135.0)


@register_shape("diamond")
def _diamond(cx, cy, r, rotation):
    return _regular(cx, cy, [r * 1.1, r * 0.75] * 2, rotation, start=-90.0)


@register_shape("triangle")
def _triangle(cx, cy, r, rotation):
    return _regular(cx, cy + r * 0.15, [r * 1.2] * 3, rotation)


@register_shape("star")
def _star(cx, cy, r, rotation):
    return _regular(cx, cy, [r * 1.15, r * 0.5] * 5, rotation)


@register_shape("hexagon")
def _hexagon(cx, cy, r, rotation):
    return _regular(cx, cy, [r * 1.05] * 6, rotation, start=0.0)


@register_texture("plain")
def _plain(draw, size, shade, seed):
    return None


@register_texture("striped")
def _striped(draw, size, shade, seed):
    step = max(4, size // 10)
    width = max(1, step // 3)
    offset = seed % step
    for x in range(-size + offset, size, step):
        draw.line([(x, 0), (x + size, size)], fill=shade, width=width)


@register_texture("dotted")
def _dotted(draw, size, shade, seed):
    step = max(4, size // 8)
    rad = max(1, step // 6)
    off = seed % step
    for y in range(off, size, step):
        for x in range(off, size, step):
            draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=shade)


@register_texture("checkered")
def _checkered(draw, size, shade, seed):
    step = max(4, size // 6)
    for i, y in enumerate(range(0, size, step)):
        for j, x in enumerate(range(0, size, step)):
            if (i + j + seed) % 2:
                draw.rectangle([x, y, x + step - 1, y + step - 1], fill=shade)


@register_texture("grainy")
def _grainy(draw, size, shade, seed):
    # Sparse speckles in the shade colour; drawn as points so it stays on the ImageDraw path.
    rng = np.random.default_rng(seed)
    n = size * size // 12
    xs = rng.integers(0, size, n)
    ys = rng.integers(0, size, n)
    draw.point(list(zip(xs.tolist(), ys.tolist())), fill=shade)


def _shade(rgb: tuple[int, int, int], delta: int) -> tuple[int, int, int]:
    """A slightly darker (light backgrounds) or lighter (dark backgrounds) version of ``rgb``."""
    sign = -1 if sum(rgb) > 3 * 128 else 1
    return tuple(int(min(255, max(0, c + sign * delta))) for c in rgb)


def object_geometry(obj: SceneObject, config: WorldConfig) -> tuple[float, float, float]:
    """Centre and radius of ``obj`` in output pixels: ``(cx, cy, r)``."""
    cell = config.image_size / config.grid
    half = cell / 2
    r = half * config.sizes[obj.size]
    margin = max(0.0, half - r) * 0.8
    return (obj.col + 0.5) * cell + obj.dx * margin, (obj.row + 0.5) * cell + obj.dy * margin, r


def render_scene(scene: Scene, config: WorldConfig) -> Image.Image:
    """The scene as an RGB ``PIL.Image`` of ``config.image_size`` squared pixels."""
    ss = config.supersample
    size = config.image_size * ss
    bg = config.backgrounds[scene.background]
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    try:
        texture = TEXTURES[scene.texture]
    except KeyError:
        raise ValueError(f"unknown texture {scene.texture!r}; registered: {sorted(TEXTURES)}") from None
    texture(draw, size, _shade(bg, 14), scene.texture_seed)
    for obj in scene.objects:
        try:
            shape_fn = SHAPES[obj.shape]
        except KeyError:
            raise ValueError(f"no drawer for shape {obj.shape!r}; registered: {sorted(SHAPES)}") from None
        cx, cy, r = (v * ss for v in object_geometry(obj, config))
        fill = config.colours[obj.colour]
        outline = _shade(fill, 60) if sum(fill) > 3 * 128 else None
        points = shape_fn(cx, cy, r, obj.rotation)
        if points:
            draw.polygon(points, fill=fill, outline=outline)
        else:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    if ss > 1:
        img = img.resize((config.image_size, config.image_size), Image.Resampling.BOX)
    return img


def png_bytes(image: Image.Image) -> bytes:
    """Deterministic PNG encoding (PIL writes no timestamp)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
