"""Inputs for the retrieval tests: image folders, tables and webdataset shards generated on the fly."""
from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

#: solid colours that a screenshot can find again
COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230), "yellow": (240, 220, 20),
           "magenta": (220, 30, 200), "cyan": (20, 210, 220)}


def noise_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def image_folder(root: Path, n: int, captions: bool = True, corrupt: tuple[int, ...] = ()) -> list[Path]:
    """``n`` PNGs ``im00.png``... (``.txt`` captions of different lengths); rows in ``corrupt`` are not images."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = root / f"im{i:02d}.png"
        if i in corrupt:
            p.write_bytes(b"this is not a png")
        else:
            noise_image(i).save(p)
        if captions:
            p.with_suffix(".txt").write_text(f"picture {i}" + " with more words" * (i % 4))
        paths.append(p)
    return paths


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[tuple[str, bytes | None, str | None]]) -> Path:
    """A webdataset shard: ``(key, png bytes or None, caption or None)`` per sample."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, data in (("png", image), ("txt", caption.encode() if caption is not None else None)):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every data file of an embedding folder (the three clip-retrieval folders) by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for folder in ("img_emb", "text_emb", "metadata")
            for p in sorted((root / folder).glob("*")) if (root / folder).is_dir()}
