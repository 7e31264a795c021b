"""open_clip-callable tokenizer: ``tok(texts, context_length=None) -> LongTensor [B, L]``.

Each row is the caption's part (the "body") of the whole-string tokenization of the model's template, right-padded
with ``pad_token_id``; the model adds the fixed template head and the prompt, so the LLM sees exactly the ids the
base tokenizer gives for the full text, and truncation can only ever cut the caption, never the prompt.
open_clip's HFTokenizer is not used: it collapses whitespace, and templates need their newlines.
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


PROBES = ("", " ", "a", " a", "A.", "a\n", "\n", "1", "\u00e9", "  x  ")


class VladVATokenizer:
    """Caption tokenizer with open_clip's calling convention, exact to the base tokenizer on the full string.

    For each caption the whole templated text (``template`` with the caption and the handcrafted ``prompt``) is
    tokenized as one string (:mod:`.templating`); the row returned holds the BODY of that tokenization: the
    caption's tokens together with the template text they merged with (LLaMA's "▁" before the caption, the newline
    that follows it, Qwen2's ``".Ċ"``). The model adds the fixed prefix (BOS + template head) and the prompt + tail,
    so ``prefix + row + suffix`` equals ``hf_tokenizer(full)``. Truncation cuts only the caption, at a token
    boundary of the whole-string tokenization, and the prompt is never cut.

    Args:
        hf_tokenizer: a transformers tokenizer of the base LVLM (fast backend).
        context_length: default body tokens per row (caption plus the template newline after it).
        template: the model's template config (``text``/``image``/``add_bos``/``answer_sep``); None gives plain
            caption tokens (no template; used only for tokenizers of non-VladVA baselines).
        text_prompt: handcrafted text prompt (the body does not depend on it; it fixes the whole string).
        image_prompt: handcrafted image prompt, the context of long captions (next-token targets).
    """

    def __init__(self, hf_tokenizer, context_length: int = 77, template=None, text_prompt: str = "",
                 image_prompt: str = ""):
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
        self.template = template
        self.text_prompt = text_prompt
        self.image_prompt = image_prompt
        self._codecs: dict = {}

    # ---- whole-string codecs --------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_codecs"] = {}  # rebuilt lazily (the tokenizers copy is cheap to rebuild, and not picklable)
        return state

    def codec(self, modality: str, prompt: str | None = None):
        """The :class:`~.templating.TemplateCodec` of ``modality`` ("text"/"image") with ``prompt``."""
        from .templating import ExactEncoder, TemplateCodec

        if self.template is None:
            raise ValueError("this tokenizer was built without a template (plain caption tokens)")
        prompt = (self.text_prompt if modality == "text" else self.image_prompt) if prompt is None else prompt
        key = (modality, prompt)
        if key not in self._codecs:
            if "encoder" not in self._codecs:
                self._codecs["encoder"] = ExactEncoder(self.tokenizer)
            bos = self.bos_token_id if self.template.add_bos else None
            if self.template.add_bos and bos is None:
                raise ValueError("the template adds BOS but the base tokenizer has no bos_token")
            self._codecs[key] = TemplateCodec(self._codecs["encoder"], getattr(self.template, modality), prompt, bos)
        return self._codecs[key]

    def text_prefix(self, prompt: str | None = None) -> list[int]:
        """Ids every text row is preceded by: the longest prefix shared by the whole-string tokenization of any
        caption (probed with captions that start with letters, spaces, punctuation and newlines)."""
        key = ("prefix", prompt)
        if key not in self._codecs:
            codec = self.codec("text", prompt)
            splits = [codec.split(p, body_is_template=False).ids for p in PROBES]
            n = 0
            while all(len(s) > n and s[n] == splits[0][n] for s in splits):
                n += 1
            self._codecs[key] = splits[0][:n]
        return self._codecs[key]

    def text_body(self, caption: str) -> list[int]:
        """Body ids of one caption (no truncation): ``text_prefix() + body + prompt + post`` is the whole string."""
        from .templating import TemplateTokenizationError

        codec = self.codec("text")
        split = codec.split(caption, body_is_template=False)
        prefix = self.text_prefix()
        head = split.prefix + split.body
        fixed = codec.fixed
        if head[: len(prefix)] != prefix or split.prompt != fixed.prompt or split.post != fixed.post:
            raise TemplateTokenizationError(
                f"caption {caption!r} changes the template's own tokens in the whole-string tokenization of "
                f"{codec.parts}; the template needs a newline or special token between caption and prompt")
        return head[len(prefix):]

    def _fit_caption(self, caption: str, length: int) -> tuple[list[int], bool]:
        body = self.text_body(caption)
        if len(body) <= length:
            return body, False
        cuts = [0] + self.codec("text").caption_cut_points(caption)
        text = self.codec("text").encoder.plain_text(caption)
        # The body's length grows with the cut point, so bisect for the last cut that fits: O(log n)
        # tokenizations of the caption instead of one per token (a 450-token text at context 77, real LLaMA vocabulary:
        # 0.016 s against 0.64 s on the 2-core CPU).
        lo, hi, best = 0, len(cuts) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            candidate = self.text_body(text[:cuts[mid]])
            if len(candidate) <= length:
                lo, best = mid + 1, candidate
            else:
                hi, body = mid - 1, candidate
        if best is not None:
            return best, True
        raise ValueError(f"context_length={length} cannot hold even an empty caption ({len(body)} template tokens "
                         f"surround it); use context_length >= {len(body)}")

    def answer_ids(self, caption: str) -> list[int]:
        """Ids of ``caption`` as the assistant's answer after the image prompt (long captions, next-token
        targets): the tokens of the whole string ``image template + answer_sep + caption`` after the template."""
        from .templating import TemplateTokenizationError

        if not caption:
            return []
        codec = self.codec("image")
        enc = codec.encoder
        head = codec.parts.pre + codec.parts.mid
        context = enc.template_text(head) + enc.plain_text(self.image_prompt) + enc.template_text(codec.parts.post)
        sep = getattr(self.template, "answer_sep", "")
        ids, offsets = enc.encode(context + sep + enc.plain_text(caption))
        cut = len(context)  # the separator belongs to the answer: LLaMA writes " The" as one token "▁The"
        first = next((i for i, (a, b) in enumerate(offsets) if b > cut), len(ids))
        if first < len(ids) and offsets[first][0] < cut:
            if caption != caption.lstrip():
                # Qwen2's "assistant\n" + "\nA cat" merges the newlines: an answer starts at its first word.
                return self.answer_ids(caption.lstrip())
            raise TemplateTokenizationError(f"the long caption {caption!r} merges with the template's last tokens "
                                            f"{codec.parts.post!r}; set the template's answer_sep")
        return ids[first:]

    # ---- a bound on the text read -------------------------------------------------------------------------------
    @property
    def max_token_chars(self) -> int:
        """The most characters one vocabulary entry spells (byte-level and SentencePiece pieces spell at least one
        character per covered character, so no token covers more of a caption than this)."""
        if "max_token_chars" not in self._codecs:
            vocab = self.tokenizer.get_vocab()
            self._codecs["max_token_chars"] = max(1, max((len(t) for t in vocab), default=1))
        return self._codecs["max_token_chars"]

    def char_bound(self, length: int) -> int:
        """Characters of a caption that certainly hold more than ``length`` tokens: 4 x (length + 16) x the longest
        token. Only that much of a caption is tokenized, so a 5 MB table cell costs what a short one does, and the
        result is the same as for the whole text: a caption that fits is shorter than the bound, and one that does
        not is cut at a token boundary far before it. The factor 4 covers Unicode normalisation, which can fold up
        to 3 characters into one before tokenizing."""
        return 4 * (int(length) + 16) * self.max_token_chars

    # ---- open_clip's tokenizer protocol ---------------------------------------------------------------------
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
        """Tokenize captions for the text tower.

        Args:
            texts: one caption or a list of captions.
            context_length: body tokens per row (default: the model's).

        Returns:
            LongTensor ``[B, context_length]``, right-padded with ``pad_token_id``. An empty list gives ``[0, L]``.
        """
        texts, length = self._check(texts, context_length)
        rows, truncated = [], 0
        bound = self.char_bound(length)
        for text in texts:
            text = text[:bound]  # see char_bound: the tokens kept are the same, the cost is bounded
            if self.template is None:
                ids = self.encode(text)
                cut = len(ids) > length
                ids = ids[:length]
            else:
                ids, cut = self._fit_caption(text, length)
            truncated += cut
            rows.append(ids)
        self._warn_truncated(truncated, len(texts), length, "the prompt is always kept")
        return self._pad(rows, length)

    def long_captions(self, texts: str | Sequence[str], context_length: int) -> torch.Tensor:
        """Tokenize long captions as answers after the image prompt (the next-token targets).

        A caption cut at ``context_length`` fills its row completely, and a full row is how the model knows that
        the caption was cut: it then gets no EOS target (the model must never learn to stop mid-sentence). So a
        complete caption uses at most ``context_length - 1`` tokens.

        Returns:
            LongTensor ``[B, context_length]`` right-padded with ``pad_token_id``.
        """
        texts, length = self._check(texts, context_length)
        rows, truncated = [], 0
        bound = self.char_bound(length)
        for text in texts:
            text = text[:bound]  # see char_bound
            ids = self.answer_ids(text) if self.template is not None else self.encode(text)
            if len(ids) >= length:
                truncated += len(ids) > length
                ids = ids[:length]
            rows.append(ids)
        self._warn_truncated(truncated, len(texts), length, "cut captions get no EOS target")
        return self._pad(rows, length)

    def _check(self, texts, context_length) -> tuple[list[str], int]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        length = int(context_length or self.context_length)
        if length <= 0:
            raise ValueError(f"context_length must be positive, got {length}")
        return list(texts), length

    def _pad(self, rows: list[list[int]], length: int) -> torch.Tensor:
        out = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            if ids:
                out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def _warn_truncated(self, truncated: int, total: int, length: int, note: str) -> None:
        if not truncated:
            return
        self.truncated_total += truncated
        # Data pipelines tokenize one sample at a time: warn once per length, then keep a count (DEBUG).
        log = _logger.debug if length in self._warned_lengths else _logger.warning
        self._warned_lengths.add(length)
        log("%d of %d captions were longer than %d tokens and were truncated (%s; %d truncated so far by this "
            "tokenizer)", truncated, total, length, note, self.truncated_total)

    def lengths(self, ids: torch.Tensor) -> torch.Tensor:
        """Caption lengths of right-padded ``ids [B, L]`` -> ``[B]``: one past the last non-pad token."""
        return caption_lengths(ids, self.pad_token_id)


def caption_lengths(ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """``ids [B, L]`` -> ``[B]``: one past the last token that is not ``pad_token_id`` (0 for an all-pad row)."""
    real = ids != pad_token_id
    last = real.shape[1] - real.flip(1).int().argmax(dim=1)
    return torch.where(real.any(dim=1), last, torch.zeros_like(last))
