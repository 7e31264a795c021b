"""Inputs for the vladva caption tests: synthetic-world scenes (what the shipped tiny captioner knows) as an
image folder, a table, or webdataset shards with ``txt`` or ``json`` alt-text."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from vladva_openclip.synth import World, WorldConfig

CAPTIONER = ("vladva-tiny-llava", "synth_captioner")


def scenes(n: int, seed: int = 0, image_size: int = 64) -> list[tuple[Image.Image, str, str]]:
    """(image, short caption, long caption) of the first ``n`` test scenes."""
    world = World(WorldConfig(seed=seed, image_size=image_size))
    out = []
    for i in range(n):
        s = world.sample("test", i)
        out.append((world.render(s.scene), s.short, s.long))
    return out


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: Path, n_shards: int, per_shard: int, json_captions: bool = False,
                 corrupt: tuple[tuple[int, int], ...] = ()) -> str:
    """``root/0000{k}.tar`` in img2dataset's layout (``KEY.png`` + ``KEY.txt`` or ``KEY.json`` with a caption);
    returns the brace pattern. ``corrupt``: (shard, index) pairs whose image bytes are not an image."""
    root.mkdir(parents=True, exist_ok=True)
    data = scenes(n_shards * per_shard)
    for k in range(n_shards):
        with tarfile.open(root / f"{k:05d}.tar", "w") as tar:
            for j in range(per_shard):
                image, short, _ = data[k * per_shard + j]
                key = f"{k:05d}{j:04d}"
                members = {"png": b"not an image" if (k, j) in corrupt else png(image)}
                if json_captions:
                    members["json"] = json.dumps({"caption": short, "key": key}).encode()
                else:
                    members["txt"] = short.encode()
                for ext, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar")
