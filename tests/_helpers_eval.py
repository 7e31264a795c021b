"""Fixtures for the evaluation-harness tests: a tiny random open_clip CLIP, fake models with chosen embeddings,
and tiny datasets written in the real benchmark formats (32 px images)."""
from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

TINY_CLIP = "eval-tiny-clip"
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# Fixtures are exported under fixture_* names (pytest uses ``name=``), so a test module can import them without its
# test arguments shadowing the imported names.
@pytest.fixture(scope="session", name="tiny_clip_config_dir")
def fixture_tiny_clip_config_dir(tmp_path_factory):
    """Registers ``eval-tiny-clip`` with open_clip for the session and unregisters it afterwards."""
    from open_clip import factory

    d = tmp_path_factory.mktemp("eval_model_configs")
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(d)
    yield d
    factory._MODEL_CONFIG_PATHS[:] = [p for p in factory._MODEL_CONFIG_PATHS if Path(p) != d]
    factory._rescan_model_configs()


@pytest.fixture(scope="session", name="tiny_clip")
def fixture_tiny_clip(tiny_clip_config_dir):
    """(model, preprocess, tokenizer) of a randomly initialised 32 px CLIP; seeded, eval mode."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY_CLIP)


class TableTokenizer:
    """Maps each text to one id (its index in ``vocab``) as a LongTensor [B, 1]."""

    def __init__(self, vocab: Sequence[str]):
        self.vocab = {t: i for i, t in enumerate(vocab)}

    def __call__(self, texts):
        return torch.tensor([[self.vocab[t]] for t in texts])


class TableModel(torch.nn.Module):
    """A fake open_clip model with chosen embeddings: a text's embedding is ``text_table[token]``, an image's is
    ``image_table[round(pixel[0, 0, 0] * 255)]`` (images are made with that id in their first pixel)."""

    def __init__(self, image_table: torch.Tensor, text_table: torch.Tensor):
        super().__init__()
        self.register_buffer("image_table", image_table.float())
        self.register_buffer("text_table", text_table.float())
        self.text_calls: list[list[int]] = []

    def encode_image(self, images, normalize=False):
        ids = (images[:, 0, 0, 0] * 255).round().long()
        emb = self.image_table[ids]
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens, normalize=False):
        self.text_calls.append(tokens[:, 0].tolist())
        emb = self.text_table[tokens[:, 0]]
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def id_image(i: int, size: int = 32) -> Image.Image:
    """An RGB image whose first pixel's red channel is ``i`` (read back by TableModel), textured elsewhere."""
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    arr[0, 0, 0] = i
    return Image.fromarray(arr)


def photo_images(n: int, size: int = 32) -> list[Image.Image]:
    """``n`` distinct small images: scikit-learn's two sample photos (crops), then seeded noise textures."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        if i < 2 * len(photos):
            y, x = (i // len(photos)) * 150, (i // len(photos)) * 200
            out.append(Image.fromarray(src[y:y + 250, x:x + 250]).resize((size, size)))
        else:
            out.append(id_image(i, size))
    return out


def save_images(folder: Path, images: Sequence[Image.Image], names: Sequence[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for im, name in zip(images, names):
        p = folder / name
        p.parent.mkdir(parents=True, exist_ok=True)
        im.save(p, format="PNG")  # lossless whatever the name says, so TableModel can read the id pixel back
        paths.append(p)
    return paths


def write_wds_retrieval(root: Path, images: Sequence[Image.Image], captions: Sequence[Sequence[str]]) -> Path:
    """CLIP_benchmark's webdataset retrieval layout under ``root``: ``test/0.tar`` (``s000.png`` + ``s000.txt``, one
    caption a line), ``test/nshards.txt`` and ``dataset_type.txt``."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i, (im, caps) in enumerate(zip(images, captions)):
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            for ext, payload in (("png", buf.getvalue()), ("txt", "\n".join(caps).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "test" / "nshards.txt").write_text("1")
    (root / "dataset_type.txt").write_text("retrieval")
    return root


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def karpathy_json(path: Path, items: Sequence[tuple[str, Sequence[str]]], split: str = "test",
                  filepath: str | None = None) -> Path:
    """Karpathy ``dataset_*.json`` with ``items`` = [(filename, captions)], plus one train image that must be
    filtered out by the split."""
    images = []
    sid = 0
    for i, (fn, caps) in enumerate([*items, ("train_only.png", ["a train caption"])]):
        entry = {"filename": fn, "imgid": i, "split": split if fn != "train_only.png" else "train",
                 "sentids": list(range(sid, sid + len(caps))),
                 "sentences": [{"tokens": c.lower().split(), "raw": c, "imgid": i, "sentid": sid + j}
                               for j, c in enumerate(caps)]}
        if filepath:
            entry["filepath"] = filepath
        images.append(entry)
        sid += len(caps)
    return write_json(path, {"dataset": "flickr30k", "images": images})


class ConstantModel(torch.nn.Module):
    """Every image and every text gets the same embedding: every comparison is a tie."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.register_buffer("vec", torch.full((dim,), 0.3))

    def encode_image(self, images, normalize=False):
        return self.vec.expand(images.shape[0], -1).clone()

    def encode_text(self, tokens, normalize=False):
        return self.vec.expand(tokens.shape[0], -1).clone()


def constant_tokenizer(texts):
    return torch.zeros(len(texts), 4, dtype=torch.long)


def small_benchmarks(root: Path) -> dict[str, dict]:
    """Tiny copies of every benchmark in its real format under ``root``; returns task specs for them."""
    imgs = [id_image(i) for i in range(12)]
    save_images(root / "flickr" / "images", imgs, [f"{i}.jpg" for i in range(12)])
    karpathy_json(root / "flickr" / "dataset_flickr30k.json",
                  [(f"{i}.jpg", [f"picture {i}", f"another view of thing {i}"][: 1 + i % 2]) for i in range(12)])
    save_images(root / "val2017", imgs[:4], [f"00000{i}.jpg" for i in range(4)])
    write_json(root / "sc" / "replace_obj.json",
               {str(i): {"filename": f"00000{i}.jpg", "caption": f"thing {i}", "negative_caption": f"other {i}"}
                for i in range(4)})
    write_json(root / "sc" / "add_att.json",
               {"0": {"filename": "000001.jpg", "caption": "a thing", "negative_caption": "a red thing"}})
    write_json(root / "scpp" / "swap_obj.json",
               [{"id": i, "filename": f"00000{i}.jpg", "caption": f"thing {i}", "caption2": f"the thing {i}",
                 "negative_caption": f"other {i}"} for i in range(3)])
    wino = root / "winoground"
    (wino / "images").mkdir(parents=True)
    (wino / "examples.jsonl").write_text("\n".join(json.dumps(
        {"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1", "caption_0": f"a {i} b",
         "caption_1": f"b {i} a"}) for i in range(2)))
    save_images(wino / "images", imgs[:4], [f"ex_{i}_img_{j}.png" for i in range(2) for j in (0, 1)])
    for c in range(3):
        save_images(root / "imagenet" / f"n0{c}", imgs[2 * c:2 * c + 2], ["a.png", "b.png"])
    return {
        "retrieval": {"task": "retrieval", "data": str(root / "flickr" / "dataset_flickr30k.json"),
                      "images": str(root / "flickr" / "images")},
        "sugarcrepe": {"task": "sugarcrepe", "data": str(root / "sc"), "images": str(root / "val2017")},
        "sugarcrepe_pp": {"task": "sugarcrepe_pp", "data": str(root / "scpp"), "images": str(root / "val2017")},
        "winoground": {"task": "winoground", "data": str(wino)},
        "imagenet": {"task": "imagenet", "data": str(root / "imagenet"), "classnames": ["cat", "dog", "car"],
                     "templates": ["a photo of a {}.", "a {} in the wild."]},
    }
