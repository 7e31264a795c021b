"""Errors raised for bad evaluation input. All are ``ValueError`` subclasses so callers can catch them broadly."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["AnnotationError", "EmptyDatasetError", "EvalDataError", "MissingImagesError", "UnreadableImageError",
           "UnreadableImagesError"]

#: how many missing files an error message lists before summarising the rest as a count
SHOWN_MISSING = 5


class EvalDataError(ValueError):
    """Base class: the data given to an evaluation task is unusable (the message says why and how to fix it)."""


class AnnotationError(EvalDataError):
    """An annotation file is malformed: the message names the file and the offending entry."""

    def __init__(self, path: object, entry: object | None, problem: str):
        where = f"{path}" if entry is None else f"{path}: entry {entry!s}"
        super().__init__(f"{where}: {problem}")
        self.path, self.entry, self.problem = path, entry, problem


class MissingImagesError(EvalDataError):
    """Images referenced by the annotations do not exist on disk (and maybe others cannot be read)."""

    def __init__(self, what: str, missing: Sequence[str], total: int, unreadable: Mapping[str, str] | None = None):
        shown = "\n  ".join(str(m) for m in missing[:SHOWN_MISSING])
        more = f"\n  ... and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        bad = f"\n{len(unreadable)} more cannot be read: {_listing(unreadable)}" if unreadable else ""
        super().__init__(
            f"{what}: {len(missing)} of {total} images are missing:\n  {shown}{more}{bad}\n"
            "Check the images folder (--images), or pass --skip-missing (skip_missing=True) to evaluate "
            "without them."
        )
        self.missing = list(missing)
        self.unreadable = dict(unreadable or {})
        self.total = total


class UnreadableImageError(EvalDataError):
    """One image file exists but cannot be decoded (raised while embedding; the message names the file).

    Constructible from the message alone, so a DataLoader worker can re-raise it in the main process as this type.
    """

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path


class UnreadableImagesError(EvalDataError):
    """Image files that exist but are not images or are corrupt (truncated): one line naming them."""

    def __init__(self, what: str, unreadable: Mapping[str, str], total: int, can_skip: bool = True):
        them = "it" if len(unreadable) == 1 else "them"
        fix = (f"re-save or remove {them}, or pass --skip-missing (skip_missing=True) to evaluate without {them}"
               if can_skip else f"this task cannot skip images: re-save or remove {them}")
        count = "1 image cannot" if len(unreadable) == 1 else f"{len(unreadable)} images cannot"
        super().__init__(f"{what}: {count} be read ({len(unreadable)} of {total}): {_listing(unreadable)}; {fix}")
        self.unreadable = dict(unreadable)
        self.total = total


def _listing(unreadable: Mapping[str, str]) -> str:
    """``path (reason), ...`` on one line, the first :data:`SHOWN_MISSING` of them."""
    items = [f"{p} ({' '.join(str(r).split())})" for p, r in list(unreadable.items())[:SHOWN_MISSING]]
    more = f", ... and {len(unreadable) - SHOWN_MISSING} more" if len(unreadable) > SHOWN_MISSING else ""
    return ", ".join(items) + more


class EmptyDatasetError(EvalDataError):
    """A dataset has no usable examples (empty file, wrong split, or everything skipped)."""
