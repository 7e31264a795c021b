"""Candidate prompt pairs for the prompt search: the shipped default set, or a user's file.

File format (UTF-8, one candidate per line)::

    IMAGE PROMPT<TAB>TEXT PROMPT
    A PROMPT USED FOR BOTH TOWERS

The shipped set (``default_prompts.tsv``) holds 50 pairs of the "summarize ... in one word" family that E5-V
introduced and VladVA searches (the paper's own 50 strings were not published): the image prompt names the image,
the text prompt names the sentence, in the same words.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_PROMPTS_FILE", "PromptFileError", "PromptPair", "default_prompt_pairs", "load_prompt_pairs",
           "validate_pairs"]

DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parent / "default_prompts.tsv"


class PromptFileError(ValueError):
    """A prompt file (or list) is unusable; the message names the file and the lines."""


@dataclass(frozen=True)
class PromptPair:
    """One candidate: the image tower's prompt and the text tower's prompt."""

    image: str
    text: str

    @property
    def label(self) -> str:
        return self.image if self.image == self.text else f"{self.image} | {self.text}"


def validate_pairs(pairs: list[PromptPair], where: str = "prompt list") -> list[PromptPair]:
    """Reject an empty list, empty prompts and repeated pairs (a repeat would be scored twice)."""
    if not pairs:
        raise PromptFileError(f"{where}: no prompts; give at least one candidate (image<TAB>text per line)")
    for i, p in enumerate(pairs):
        if not p.image.strip() or not p.text.strip():
            raise PromptFileError(f"{where}: candidate {i + 1} has an empty prompt: {p!r}")
    seen: dict[PromptPair, int] = {}
    for i, p in enumerate(pairs):
        if p in seen:
            raise PromptFileError(f"{where}: candidate {i + 1} repeats candidate {seen[p] + 1}: {p.label!r}")
        seen[p] = i
    return pairs


def load_prompt_pairs(path: str | os.PathLike) -> list[PromptPair]:
    """Read a prompt file (see the module docstring).

    Raises:
        PromptFileError: missing file, no candidates, blank lines (listed by number: a blank line is more likely
            a mistake than an intended empty prompt), more than one tab, an empty side, a repeated pair.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file {path} does not exist")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # utf-8-sig: a BOM is no part of a prompt
    except UnicodeDecodeError as err:
        raise PromptFileError(f"prompt file {path} is not UTF-8 text: {err}") from err
    while lines and not lines[-1].strip():  # trailing newlines at the end of the file are not candidates
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (" ..." if len(blank) > 10 else "")
        raise PromptFileError(f"prompt file {path}: blank line(s) {shown}; every line must be a prompt "
                              f"(IMAGE PROMPT<TAB>TEXT PROMPT, or one prompt for both towers). Remove them.")
    pairs = []
    for i, line in enumerate(lines):
        fields = line.split("\t")
        if len(fields) > 2:
            raise PromptFileError(f"prompt file {path}, line {i + 1}: {len(fields)} tab-separated fields; "
                                  f"expected IMAGE PROMPT<TAB>TEXT PROMPT or a single prompt")
        image = fields[0].strip()
        text = fields[1].strip() if len(fields) == 2 else image
        if not image or not text:
            raise PromptFileError(f"prompt file {path}, line {i + 1}: an empty prompt ({line!r})")
        pairs.append(PromptPair(image, text))
    return validate_pairs(pairs, f"prompt file {path}")


def default_prompt_pairs() -> list[PromptPair]:
    """The shipped 50 candidate pairs."""
    return load_prompt_pairs(DEFAULT_PROMPTS_FILE)
