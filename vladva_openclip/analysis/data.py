"""Images and captions for the analyses, read with the evaluator's own loaders.

Paired data is any retrieval annotation the evaluator reads (Karpathy ``dataset_*.json``, per-image
``{"image", "caption": [...]}`` lists, COCO captions); unpaired data is a folder of images and/or a text file with
one caption per line.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..eval.errors import EmptyDatasetError
from ..eval.images import IMAGE_EXTENSIONS, ImageSet

__all__ = ["AnalysisData", "image_batches", "load_analysis_data", "read_lines"]


@dataclass
class AnalysisData:
    """Images (N) and captions (M); ``caption_image[j]`` is the image of caption j when they are paired.

    Attributes:
        images: the image collection (may be empty when only captions are analysed).
        captions: caption strings.
        caption_image: LongTensor ``[M]`` with values in ``[0, N)``, or None (unpaired: no retrieval metrics).
        info: where the data came from and how it was cut.
    """

    images: ImageSet
    captions: list[str]
    caption_image: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return self.caption_image is not None


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """Non-empty stripped lines of a UTF-8 file; blank lines inside the file are an error (listed by number)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise ValueError(f"{what} {path}: blank line(s) {blank[:10]}; one item per line, no blank lines")
    if not lines:
        raise EmptyDatasetError(f"{what} {path} is empty")
    return [line.strip() for line in lines]


def _subset(images: ImageSet, keep: int) -> ImageSet:
    if keep >= len(images):
        return images
    loader = images.loader
    return ImageSet(images.keys[:keep], loader, f"{images.fingerprint}[:{keep}]")


def load_analysis_data(
    data: str | os.PathLike | None = None,
    images: str | os.PathLike | None = None,
    captions: str | os.PathLike | Sequence[str] | None = None,
    *,
    split: str | None = "test",
    max_images: int | None = None,
    captions_per_image: int | None = None,
    skip_missing: bool = False,
) -> AnalysisData:
    """Read the analysis inputs.

    Args:
        data: a retrieval annotation file (paired captions); ``images`` is then its images folder.
        images: without ``data``: a folder whose image files (sorted by name) are the image set.
        captions: without ``data``: a text file with one caption per line, or a list of captions.
        split: Karpathy split to keep.
        max_images: keep the first N images (and, when paired, only their captions).
        captions_per_image: when paired, keep each image's first K captions.
    """
    from ..eval.data_retrieval import load_retrieval

    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if captions_per_image is not None and captions_per_image < 1:
        raise ValueError(f"captions_per_image must be >= 1, got {captions_per_image}")
    if data is not None:
        if captions is not None:
            raise ValueError("give either a paired annotation file (data) or separate captions, not both")
        rd = load_retrieval(data, images, split=split, skip_missing=skip_missing)
        keep = min(len(rd.images), max_images or len(rd.images))
        counts: dict[int, int] = {}
        chosen = []
        for j, owner in enumerate(rd.caption_image.tolist()):
            if owner < keep and counts.get(owner, 0) < (captions_per_image or 1 << 30):
                counts[owner] = counts.get(owner, 0) + 1
                chosen.append(j)
        info = {**rd.info, "n_images": keep, "n_captions": len(chosen)}
        return AnalysisData(_subset(rd.images, keep), [rd.captions[j] for j in chosen],
                            rd.caption_image[chosen].clone(), info)
    if images is None and captions is None:
        raise ValueError("nothing to analyse: give a paired annotation file (data=...), an images folder, "
                         "or captions")
    image_set = ImageSet.from_paths([])
    if images is not None:
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"images folder {folder} does not exist")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise EmptyDatasetError(f"images folder {folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        image_set = _subset(ImageSet.from_paths(paths), max_images or len(paths))
    if captions is None:
        caps: list[str] = []
    elif isinstance(captions, (str, os.PathLike)):
        caps = read_lines(captions, "captions file")
    else:
        caps = [str(c).strip() for c in captions]
        if not caps or not all(caps):
            raise ValueError("captions must be a non-empty list of non-empty strings")
    return AnalysisData(image_set, caps, None, {"images": str(images) if images else None,
                                                "n_images": len(image_set), "n_captions": len(caps)})


def image_batches(images: ImageSet, preprocess: Callable, batch_size: int,
                  indices: Sequence[int] | None = None) -> Iterator[tuple[list[int], torch.Tensor]]:
    """``(indices, [B, 3, S, S])`` batches of preprocessed images, in order."""
    order = list(range(len(images))) if indices is None else list(indices)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, torch.stack([preprocess(images.load(i)) for i in idx])
