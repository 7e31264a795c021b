"""Batched, cached embedding of images and texts with any open_clip-style model.

The model is used only through ``encode_image(images [B, 3, H, W], normalize=True) -> [B, D]``,
``encode_text(tokenizer(list[str]), normalize=True) -> [B, D]``, the preprocess transform and the tokenizer, so
VladVA models and CLIP baselines go through the same code. Outputs are fp32, L2-normalised, on CPU, in the order
of the inputs.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..progress import progress as tqdm
from .cache import EmbeddingCache, model_fingerprint, texts_fingerprint
from .images import ImageSet

__all__ = [
    "PRECISIONS",
    "EmbedConfig",
    "Embedder",
    "Precision",
    "autocast_for",
    "length_buckets",
    "model_precision",
]

_logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Precision:
    """autocast: dtype for torch.autocast (None: off); build: the ``precision`` given to open_clip's
    create_model (which casts weights for fp16/bf16/pure_*; the amp names are passed as open_clip_train passes them:
    CLIP keeps fp32 weights, a VladVA base is loaded in bf16 for amp_bf16); images: dtype images are cast to (as
    open_clip_train's ``get_input_dtype``), None to leave them fp32."""

    autocast: torch.dtype | None
    build: str
    images: torch.dtype | None


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision(None, "fp32", None),
    "amp": Precision(torch.float16, "amp", None),
    "amp_bf16": Precision(torch.bfloat16, "amp_bf16", None),
    "fp16": Precision(None, "fp16", torch.float16),
    "bf16": Precision(None, "bf16", torch.bfloat16),
    "pure_fp16": Precision(None, "pure_fp16", torch.float16),
    "pure_bf16": Precision(None, "pure_bf16", torch.bfloat16),
}


def _precision(name: str) -> Precision:
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; choose from {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a precision name (a no-op for fp32 and for weights cast at build time)."""
    dtype = _precision(precision).autocast
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def model_precision(precision: str) -> str:
    """The ``precision`` argument for ``open_clip.create_model_and_transforms``."""
    return _precision(precision).build


def length_buckets(texts: Sequence[str], batch_size: int) -> list[list[int]]:
    """Batches of indices into ``texts``, longest strings first, so each batch holds texts of similar length.

    A model that trims padding (VladVA) then does little wasted work; fixed-length tokenizers (CLIP) are
    unaffected. The caller scatters results back by index, so the original order is kept.
    """
    order = sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@dataclass
class EmbedConfig:
    """batch_size: images or texts per forward; num_workers: image-decoding processes (0 = in-process);
    cache_dir: where embeddings are cached (None = no cache); progress: tqdm bars."""

    batch_size: int = 64
    precision: str = "fp32"
    num_workers: int = 0
    cache_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        model_precision(self.precision)


class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, preprocess: Callable):
        self.images, self.preprocess = images, preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(self.images.load(i))


def _to_device(batch: Any, device: torch.device) -> Any:
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


class Embedder:
    """Embeds ImageSets and caption lists with one model; results are cached when ``config.cache_dir`` is set.

    model_id names the weights for the cache key (e.g. ``"ViT-B-32|openai"``); the weights are hashed as well.
    """

    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable,
                 config: EmbedConfig | None = None, *, device: str | torch.device | None = None,
                 model_id: str | None = None):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.config = config or EmbedConfig()
        if device is None:
            param = next(iter(model.parameters()), None)
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        self.model_id = model_id
        self.cache = EmbeddingCache(self.config.cache_dir) if self.config.cache_dir else None
        self._model_key: str | None = None
        self._warned_nonfinite = False

    @property
    def model_key(self) -> str:
        if self._model_key is None:  # hashing weights costs a little: only when the cache is used
            self._model_key = model_fingerprint(self.model, self.preprocess, self.tokenizer, model_id=self.model_id,
                                                precision=self.config.precision, device_type=self.device.type)
        return self._model_key

    def _cached(self, kind: str, data_key: str, n: int, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.cache is None:
            return compute()
        emb = self.cache.get(self.model_key, kind, data_key, n)
        if emb is None:
            emb = compute()
            self.cache.put(self.model_key, kind, data_key, emb,
                           {"model_id": self.model_id or "", "kind": kind, "n": str(n)})
        return emb

    def _finish(self, emb: torch.Tensor, what: str) -> torch.Tensor:
        emb = F.normalize(emb.float(), dim=-1)
        if not self._warned_nonfinite and not torch.isfinite(emb).all():
            self._warned_nonfinite = True
            _logger.warning("%s embeddings contain NaN/inf; those items will score as misses", what)
        return emb.cpu()

    @torch.no_grad()  # not inference_mode: callers may modify the returned tensors in place
    def images(self, images: ImageSet, desc: str = "images") -> torch.Tensor:
        """Embed every image of the set: -> [len(images), D] fp32, normalised."""
        def compute() -> torch.Tensor:
            loader = torch.utils.data.DataLoader(_ImageDataset(images, self.preprocess),
                                                 batch_size=self.config.batch_size, shuffle=False,
                                                 num_workers=self.config.num_workers)
            out = []
            image_dtype = _precision(self.config.precision).images
            with autocast_for(self.config.precision, self.device):
                for batch in tqdm(loader, desc=f"embed {desc}", disable=not self.config.progress, leave=False):
                    batch = batch.to(self.device, dtype=image_dtype or batch.dtype)
                    emb = self.model.encode_image(batch, normalize=True)
                    out.append(self._finish(emb, "image"))
            return torch.cat(out)

        return self._cached("images", images.fingerprint, len(images), compute)

    @torch.no_grad()
    def texts(self, texts: Sequence[str], desc: str = "texts") -> torch.Tensor:
        """Embed texts (duplicates once, length-bucketed batches): -> [len(texts), D] fp32, normalised, in order."""
        texts = list(texts)
        unique = list(dict.fromkeys(texts))
        where = {t: i for i, t in enumerate(unique)}

        def compute() -> torch.Tensor:
            buckets = length_buckets(unique, self.config.batch_size)
            result: torch.Tensor | None = None
            with autocast_for(self.config.precision, self.device):
                for idx in tqdm(buckets, desc=f"embed {desc}", disable=not self.config.progress, leave=False):
                    tokens = _to_device(self.tokenizer([unique[i] for i in idx]), self.device)
                    emb = self._finish(self.model.encode_text(tokens, normalize=True), "text")
                    if result is None:
                        result = torch.empty(len(unique), emb.shape[-1])
                    result[torch.tensor(idx)] = emb
            return result if result is not None else torch.empty(0, 0)

        emb = self._cached("texts", texts_fingerprint(unique), len(unique), compute)
        return emb[torch.tensor([where[t] for t in texts], dtype=torch.long)] if texts else emb

    def describe(self) -> dict[str, Any]:
        return {"device": str(self.device), "precision": self.config.precision,
                "batch_size": self.config.batch_size, "cache_dir": self.config.cache_dir}

