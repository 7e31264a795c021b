"""Embedding cache on disk (safetensors, never pickle), keyed by model and data fingerprints.

Model fingerprint = model id (name + pretrained tag; a checkpoint file adds its absolute path, size and mtime)
+ weights + preprocessing + tokenizer + precision + device type:
- weights: every state_dict tensor of up to ``FULL_HASH_NUMEL`` elements is hashed in full (LoRA matrices, soft
  prompts, norms, logit_scale: what differs between fine-tuned checkpoints of one base); a larger tensor is
  hashed by its shape, dtype and ``SAMPLE_NUMEL`` evenly strided elements. Cost: about a second for a 7B model,
  the time to read a few hundred MB, instead of hashing 14 GB.
- preprocessing: ``repr(preprocess)`` (torchvision transforms print their sizes, interpolation and mean/std);
- tokenizer: its class and the tokens it gives for a fixed probe sentence (catches vocab/context-length changes).
Data fingerprint: image files by absolute path, size and mtime (see ``ImageSet``); texts by a hash of the strings.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._fs import save_safetensors, write_atomically

__all__ = [
    "FULL_HASH_NUMEL",
    "SAMPLE_NUMEL",
    "EmbeddingCache",
    "default_cache_dir",
    "model_fingerprint",
    "texts_fingerprint",
    "weights_fingerprint",
]

_logger = logging.getLogger(__name__)

FULL_HASH_NUMEL = 1 << 22
SAMPLE_NUMEL = 1 << 16
_PROBE = ["a photo of a cat sitting on a red sofa, next to two remote controls."]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the state_dict (full bytes for small tensors, strided samples for big ones; see module doc)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        digest.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\n".encode())
        if t.device.type == "meta":
            continue
        flat = t.detach().reshape(-1)
        if flat.numel() > FULL_HASH_NUMEL:
            step = flat.numel() // SAMPLE_NUMEL
            flat = torch.cat([flat[::step][:SAMPLE_NUMEL], flat[-1:]])
        digest.update(_tensor_bytes(flat))
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    name = f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}"
    try:
        tokens = tokenizer(_PROBE)
    except Exception:  # noqa: BLE001  (a toy tokenizer with a closed vocabulary: key on its class only)
        return name
    if isinstance(tokens, torch.Tensor):
        payload = _tensor_bytes(tokens)
    elif hasattr(tokens, "items"):  # BatchEncoding-like
        payload = b"".join(k.encode() + _tensor_bytes(torch.as_tensor(v)) for k, v in sorted(tokens.items()))
    else:
        payload = repr(tokens).encode()
    return f"{name}:" + hashlib.blake2b(payload, digest_size=8).hexdigest()


def model_fingerprint(model: torch.nn.Module, preprocess: Any, tokenizer: Any, *, model_id: str | None,
                      precision: str, device_type: str) -> str:
    """One key for everything that changes embeddings on the model side."""
    parts = {
        "model_id": model_id or f"{type(model).__module__}.{type(model).__qualname__}",
        "weights": weights_fingerprint(model),
        "preprocess": repr(preprocess),
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "precision": precision,
        "device_type": device_type,
    }
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def texts_fingerprint(texts: list[str]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for t in texts:
        digest.update(t.encode("utf-8") + b"\0")
    return f"texts{len(texts)}:" + digest.hexdigest()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vladva_openclip" / "eval_embeddings"


class EmbeddingCache:
    """``root/<model key>/<kind>-<data key>.safetensors`` holding one tensor ``embeddings`` [N, D] (fp32)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _path(self, model_key: str, kind: str, data_key: str) -> Path:
        safe = hashlib.blake2b(data_key.encode(), digest_size=16).hexdigest()
        return self.root / model_key / f"{kind}-{safe}.safetensors"

    def get(self, model_key: str, kind: str, data_key: str, n: int) -> torch.Tensor | None:
        path = self._path(model_key, kind, data_key)
        if not path.is_file():
            return None
        try:
            emb = load_file(str(path))["embeddings"]
        except (OSError, SafetensorError, KeyError) as err:  # truncated or foreign file: recompute, do not fail
            _logger.warning("ignoring unreadable cache file %s (%s)", path, err)
            return None
        if emb.shape[0] != n:
            _logger.warning("ignoring cache file %s: %d rows, expected %d", path, emb.shape[0], n)
            return None
        _logger.info("loaded %s embeddings from cache %s", kind, path)
        return emb

    def put(self, model_key: str, kind: str, data_key: str, emb: torch.Tensor, meta: dict[str, str]) -> None:
        path = self._path(model_key, kind, data_key)
        # write then rename, so a crash or a concurrent run never leaves a half-written file under the final name;
        # the unique temporary name gets the umask's permissions (mkstemp's 0600 would stay on the cache file)
        write_atomically(path, lambda tmp: save_safetensors({"embeddings": emb.detach().float().contiguous().cpu()},
                                                            tmp, metadata={k: str(v) for k, v in meta.items()}),
                         prefix=f".{path.stem}.")
