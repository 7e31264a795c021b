"""open_clip-callable tokenizer: ``tok(texts, context_length=None) -> LongTensor [B, L]``.

It returns the CAPTION tokens only, right-padded with ``pad_token_id``: the model wraps them in the chat
template and appends the prompt itself, so truncation can only ever cut the caption, never the prompt, and the
template's newlines survive (open_clip's HFTokenizer collapses whitespace, so templates are never built as text
here).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

_logger = logging.getLogger(__name__)

ASSET_TOKENIZERS = Path(__file__).resolve().parent / "assets" / "tokenizers"


def load_hf_tokenizer(source: str, cache_dir: str | None = None):
    """A transformers tokenizer from ``asset:<name>`` (shipped), a local directory, or a Hugging Face id."""
    from transformers import AutoTokenizer

    from .backbones.base import WeightsNotFoundError, hub_offline, missing_message

    if source.startswith("asset:"):
        path = ASSET_TOKENIZERS / source.split(":", 1)[1]
        if not path.is_dir():
            raise FileNotFoundError(f"shipped tokenizer {source!r} not found at {path}; reinstall the package")
        return AutoTokenizer.from_pretrained(str(path))
    local = os.path.isdir(source)
    try:
        return AutoTokenizer.from_pretrained(source, cache_dir=cache_dir, local_files_only=local or hub_offline())
    except (OSError, ValueError) as err:
        raise WeightsNotFoundError(missing_message("tokenizer files of", source, err)) from err


class VladVATokenizer:
    """Caption tokenizer with open_clip's calling convention.

    Args:
        hf_tokenizer: a transformers tokenizer of the base LVLM.
        context_length: default number of caption tokens per row (the prompt is added by the model on top).
    """

    def __init__(self, hf_tokenizer, context_length: int = 77):
        self.tokenizer = hf_tokenizer
        self.context_length = context_length
        pad = hf_tokenizer.pad_token_id
        if pad is None:
            pad = hf_tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the base tokenizer has neither a pad nor an eos token; cannot pad captions")
        self.pad_token_id = int(pad)
        self.truncated_total = 0
        self._warned_lengths: set[int] = set()

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, *, special: bool = False) -> list[int]:
        """Token ids of ``text`` with no BOS/EOS added.

        Args:
            special: parse special tokens written in ``text`` (templates). User captions are never parsed for
                special tokens, so a caption containing ``"<pad>"`` or ``"<image>"`` stays plain text.
        """
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=not special).input_ids)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenize captions.

        Args:
            texts: one caption or a list of captions.
            context_length: caption tokens per row (default: the model's).

        Returns:
            LongTensor ``[B, context_length]``, right-padded with ``pad_token_id``. An empty list gives ``[0, L]``.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        length = int(context_length or self.context_length)
        if length <= 0:
            raise ValueError(f"context_length must be positive, got {length}")
        out = torch.full((len(texts), length), self.pad_token_id, dtype=torch.long)
        truncated = 0
        for i, text in enumerate(texts):
            ids = self.encode(text)
            if len(ids) > length:
                truncated += 1
                ids = ids[:length]
            if ids:
                out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        if truncated:
            self.truncated_total += truncated
            # Data pipelines tokenize one sample at a time: warn once per length, then keep a count (DEBUG).
            log = _logger.debug if length in self._warned_lengths else _logger.warning
            self._warned_lengths.add(length)
            log("%d of %d captions were longer than %d tokens and were truncated (the prompt is always kept; "
                "%d truncated so far by this tokenizer)", truncated, len(texts), length, self.truncated_total)
        return out

    def lengths(self, ids: torch.Tensor) -> torch.Tensor:
        """Caption lengths of right-padded ``ids [B, L]`` -> ``[B]``: one past the last non-pad token."""
        return caption_lengths(ids, self.pad_token_id)


def caption_lengths(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """``ids [B, L]`` -> ``[B]``: one past the last token that is not ``pad_token_id`` (0 for an all-pad row)."""
    real = ids != pad_token_id
    last = real.shape[1] - real.flip(1).int().argmax(dim=1)
    return torch.where(real.any(dim=1), last, torch.zeros_like(last))
