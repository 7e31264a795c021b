"""A static results page: each query (its text, or a thumbnail of its image) above a grid of its hits.

Thumbnails are embedded as JPEG data URIs, so the page is one self-contained file that shows the same thing from
any folder or machine; webdataset hits are read from their tar by key. Every text is HTML-escaped.

Only images under the input roots the embedding manifest records (``results["image_roots"]``: the image folder,
the folder a table's images share, or the folder of the webdataset tars) are shown; a relative ``image_path`` is
resolved against those roots, never the working directory, so a metadata row cannot pull any other readable file
into the page.
Metadata columns may have any types: they are shown as text.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import os
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from ..train._common import IMAGE_ERRORS, load_rgb
from ..train._wds import IMAGE_KEYS
from .layout import atomic_write_bytes

__all__ = ["THUMBNAIL_SIZE", "render_html", "thumbnail_uri", "write_html"]

_logger = logging.getLogger(__name__)

THUMBNAIL_SIZE = 192

_STYLE = """
body { font-family: sans-serif; margin: 16px; background: #fafafa; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin: 24px 0 8px; }
.query > img { width: 128px; height: 128px; object-fit: contain; border: 2px solid #333; background: #fff; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, 208px); gap: 12px; }
figure { margin: 0; padding: 8px; width: 192px; background: #fff; border: 1px solid #ddd; }
figure img { width: 192px; height: 192px; object-fit: contain; display: block; background: #fff; }
.missing { width: 192px; height: 192px; display: flex; align-items: center; justify-content: center;
           background: #eee; color: #888; font-size: 12px; }
figcaption { font-size: 12px; margin-top: 4px; overflow-wrap: anywhere; }
.meta { color: #666; }
"""


class _TarImages:
    """Images of webdataset shards by ``(tar, key)``; each tar's member list is read once."""

    def __init__(self):
        self.members: dict[str, dict[str, tarfile.TarInfo]] = {}

    def read(self, url: str, key: str) -> bytes | None:
        """The image bytes of sample ``key`` in ``url``; ValueError naming the tar when it cannot be read."""
        if not os.path.isfile(url):
            return None
        try:
            if url not in self.members:
                with tarfile.open(url) as tar:
                    self.members[url] = {m.name: m for m in tar.getmembers() if m.isfile()}
            for ext in IMAGE_KEYS:
                member = self.members[url].get(f"{key}.{ext}")
                if member is not None:
                    with tarfile.open(url) as tar:
                        f = tar.extractfile(member)
                        return f.read() if f is not None else None
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ValueError(f"{url} cannot be read for the page's thumbnails ({type(err).__name__}: {err}): the tar "
                             "is truncated or corrupt; repair or re-download it, or search without --html") from None
        return None


def _within(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or below it, after resolving symlinks and ``..``."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    try:
        return os.path.commonpath([p, r]) == r
    except ValueError:
        return False


def thumbnail_uri(source: str | bytes | Image.Image, size: int = THUMBNAIL_SIZE) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail (longest side ``size``), or None when the image is unreadable."""
    try:
        image = source.convert("RGB") if isinstance(source, Image.Image) else load_rgb(source)
    except IMAGE_ERRORS as err:
        _logger.warning("no thumbnail for %s: %s", source if isinstance(source, str) else "<bytes>", err)
        return None
    image.thumbnail((size, size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _hit_image(meta: Mapping[str, Any], tars_cache: _TarImages, roots: list[str]) -> str | None:
    """The thumbnail of a hit whose image lies under one of ``roots`` (None otherwise, or when unreadable)."""
    path = meta.get("image_path")
    if not isinstance(path, str) or not path or not roots:
        return None
    shard = meta.get("shard")
    folders = [r for r in roots if os.path.isdir(r)]
    if isinstance(shard, str) and shard:
        # a webdataset hit: its tar must lie under a root (a relative one, as older manifests stored it, is taken
        # from the roots, never the working directory)
        tars = [shard] if os.path.isabs(shard) else [os.path.join(r, shard) for r in folders]
        tar = next((t for t in tars if os.path.isfile(t) and any(_within(t, r) for r in folders)), None)
        if tar is None:
            return None
        data = tars_cache.read(tar, path)
        return thumbnail_uri(data) if data is not None else None
    candidates = [path] if os.path.isabs(path) else [os.path.join(r, path) for r in folders]
    for candidate in candidates:
        if os.path.isfile(candidate) and any(_within(candidate, r) for r in folders):
            return thumbnail_uri(candidate)
    return None


def _score(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else html.escape(
        str(value))


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return '<div class="missing">image unavailable</div>'
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _meta_line(results: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    source = html.escape(str(results.get("source", "")))
    mode = html.escape(str(results.get("mode", "")))
    name = html.escape(str(model.get("name")))
    tag = f" ({html.escape(str(model['pretrained']))})" if model.get("pretrained") else ""
    return f'<p class="meta">{source} &middot; {mode} &middot; model {name}{tag}</p>'


def render_html(results: Mapping[str, Any], title: str = "vladva search") -> str:
    """The page for :func:`~vladva_openclip.retrieval.search.run_search`'s result."""
    tars = _TarImages()
    model = results.get("model") or {}
    roots = [str(r) for r in results.get("image_roots") or []]
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
        _meta_line(results, model),
    ]
    for n, q in enumerate(results.get("queries", []), 1):
        parts.append(f'<section class="query" id="q{n}">')
        if q["type"] == "image":
            parts.append(f"<h2>Query {n} (image): {html.escape(q['query'])}</h2>")
            parts.append(_img(thumbnail_uri(q["query"]) if os.path.isfile(q["query"]) else None, q["query"]))
        else:
            parts.append(f"<h2>Query {n} (text): &ldquo;{html.escape(q['query'])}&rdquo;</h2>")
        parts.append('<div class="grid">')
        for hit in q["results"]:
            meta = hit.get("metadata") if isinstance(hit.get("metadata"), Mapping) else {}
            label = str(meta.get("image_path") or hit.get("id"))
            caption = meta.get("caption")
            parts.append(
                "<figure>" + _img(_hit_image(meta, tars, roots), label)
                + f"<figcaption><b>#{html.escape(str(hit.get('rank')))}</b> score {_score(hit.get('score'))}"
                + (f"<br>{html.escape(str(caption))}" if caption not in (None, "") else "")
                + f'<br><span class="meta">{html.escape(label)}</span></figcaption></figure>')
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(results: Mapping[str, Any], out: str | os.PathLike, title: str = "vladva search") -> Path:
    out = Path(out)
    atomic_write_bytes(out, render_html(results, title).encode("utf-8"))
    return out
