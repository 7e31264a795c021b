"""Whole-string tokenization of chat templates: the ids the base LVLM's own tokenizer gives for the full text.

Tokenizing template pieces one at a time is wrong for real vocabularies: LLaMA's sentencepiece prepends "▁" to
every separately encoded piece, and Qwen2's byte-level BPE merges a caption's final punctuation with the newline
that follows it (".Ċ"). So every sequence here is tokenized as ONE string, then split by character offsets:

    [prefix | body | suffix]     body = the caption (text tower) or the image placeholders (image tower), together
                                 with whatever template text its tokens merged with; suffix = prompt + post.

The split points are token boundaries of the whole-string tokenization, so ``prefix + body + suffix`` is exactly
what the base tokenizer produces for the full string.

Special tokens are parsed only where the TEMPLATE writes them. A caption that contains ``"<image>"`` or
``"<|im_end|>"`` stays plain text: the encoder works on a copy of the tokenizer whose added tokens are renamed to
private-use markers no caption contains, so the tokenizer's own splitting logic (and every quirk of it, such as
sentencepiece's "prepend ▁ to the first segment only") is unchanged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

_MARK = "\ue000"  # Unicode private use: never produced by normal text, and stripped from captions


class TemplateTokenizationError(ValueError):
    """A template whose pieces cannot be separated at token boundaries of the whole-string tokenization."""


class ExactEncoder:
    """Encodes strings in which only template-written special tokens are special.

    Args:
        hf_tokenizer: a transformers tokenizer with a ``tokenizers`` backend (every LLaVA / Qwen2-VL checkpoint).
    """

    def __init__(self, hf_tokenizer):
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise TypeError(f"{type(hf_tokenizer).__name__} has no fast (tokenizers) backend; VladVA needs the "
                            f"base model's tokenizer.json")
        from tokenizers import Tokenizer

        data = json.loads(backend.to_str())
        self._markers: dict[str, str] = {}
        for tok in data.get("added_tokens", []):
            marker = f"{_MARK}{tok['id']}{_MARK}"
            self._markers[tok["content"]] = marker
            tok["content"] = marker
            tok["normalized"] = False
        # Longest first, so "<|im_start|>" is never half-replaced by a shorter special that prefixes it.
        self._order = sorted(self._markers, key=len, reverse=True)
        self._backend = Tokenizer.from_str(json.dumps(data))
        # A renamed token outside the model vocabulary may get a fresh id in the copy: map it back.
        ids = {tok["content"]: int(tok["id"]) for tok in data.get("added_tokens", [])}
        self._remap = {self._backend.token_to_id(m): i for m, i in ids.items() if self._backend.token_to_id(m) != i}

    def template_text(self, text: str) -> str:
        """Template text with its special-token literals turned into markers (so they stay special)."""
        for content in self._order:
            if content in text:
                text = text.replace(content, self._markers[content])
        return text

    @staticmethod
    def plain_text(text: str) -> str:
        """Caption text: the marker character is removed so a caption can never forge a special token."""
        return text.replace(_MARK, "")

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets (into ``text``) of an already-marked string; no BOS/EOS added."""
        enc = self._backend.encode(text, add_special_tokens=False)
        ids = [self._remap.get(i, i) for i in enc.ids] if self._remap else list(enc.ids)
        return ids, [tuple(o) for o in enc.offsets]


@dataclass(frozen=True)
class Split:
    """One whole-string tokenization cut into ``prefix | body | prompt | post`` (lists of ids)."""

    prefix: list[int]
    body: list[int]
    prompt: list[int]
    post: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prefix + self.body + self.prompt + self.post


class TemplateCodec:
    """Tokenizes ``template`` (``"pre{body}mid{prompt}post"``) as the base tokenizer would tokenize the full string.

    Args:
        encoder: the shared :class:`ExactEncoder`.
        template: a template with one ``{body}`` and one ``{prompt}`` after it.
        prompt: the handcrafted prompt text (soft slots carry its ids).
        bos_id: prepended when not None (the template's ``add_bos``).
    """

    def __init__(self, encoder: ExactEncoder, template: str, prompt: str, bos_id: int | None):
        from .prompts import TemplateParts

        self.encoder = encoder
        self.parts = TemplateParts.parse(template)
        self.prompt_text = prompt
        self.bos = [int(bos_id)] if bos_id is not None else []

    def split(self, body: str, *, body_is_template: bool, prompt: str | None = None) -> Split:
        """Whole-string tokenization of the template around ``body``, cut at token boundaries.

        The prefix is the tokens that end before the body starts; the prompt part the tokens from the prompt's
        first character to its last; a token that crosses into the prompt is an error (the soft slots would be
        ambiguous). Tokens that merge the body with neighbouring template text belong to the body.
        """
        enc = self.encoder
        prompt = self.prompt_text if prompt is None else prompt
        pre = enc.template_text(self.parts.pre)
        mid = enc.template_text(self.parts.mid)
        body_text = enc.template_text(body) if body_is_template else enc.plain_text(body)
        # The prompt is template text: a prompt never carries specials, but it must not forge one either.
        prompt_text = enc.plain_text(prompt)
        post = enc.template_text(self.parts.post)
        body_start = len(pre)
        prompt_start = body_start + len(body_text) + len(mid)
        prompt_end = prompt_start + len(prompt_text)
        ids, offsets = enc.encode(pre + body_text + mid + prompt_text + post)
        n_pre = 0
        while n_pre < len(ids) and offsets[n_pre][1] <= body_start and offsets[n_pre][0] < body_start:
            n_pre += 1
        p0 = _first_at_or_after(offsets, prompt_start, n_pre)
        p1 = _first_at_or_after(offsets, prompt_end, p0) if prompt_text else p0
        for cut, pos, name in ((p0, prompt_start, "start"), (p1, prompt_end, "end")):
            if cut < len(ids) and offsets[cut][0] < pos:
                raise TemplateTokenizationError(
                    f"a token crosses the {name} of the prompt {prompt!r} in template {self.parts}: the prompt "
                    f"cannot be located; put a newline or a special token next to {{prompt}}")
        return Split(self.bos + ids[:n_pre], ids[n_pre:p0], ids[p0:p1], ids[p1:])

    def caption_cut_points(self, body: str) -> list[int]:
        """Character positions in ``body`` (plain text) at which its whole-string tokens end, ascending."""
        enc = self.encoder
        text = enc.plain_text(body)
        pre = enc.template_text(self.parts.pre)
        ids, offsets = enc.encode(pre + text + enc.template_text(self.parts.mid))
        start = len(pre)
        return sorted({e - start for _, e in offsets if start < e <= start + len(text)})

    @cached_property
    def fixed(self) -> Split:
        """The split of an empty body: its prefix, prompt and post are the ones every body gets (checked)."""
        return self.split("", body_is_template=False)


def _first_at_or_after(offsets: list[tuple[int, int]], pos: int, start: int) -> int:
    i = start
    while i < len(offsets) and offsets[i][1] <= pos and offsets[i][0] < pos:
        i += 1
    return i
