"""Errors raised for bad evaluation input. All are ``ValueError`` subclasses so callers can catch them broadly."""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["AnnotationError", "EmptyDatasetError", "EvalDataError", "MissingImagesError"]

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
    """Images referenced by the annotations do not exist on disk."""

    def __init__(self, what: str, missing: Sequence[str], total: int):
        shown = "\n  ".join(str(m) for m in missing[:SHOWN_MISSING])
        more = f"\n  ... and {len(missing) - SHOWN_MISSING} more" if len(missing) > SHOWN_MISSING else ""
        super().__init__(
            f"{what}: {len(missing)} of {total} images are missing:\n  {shown}{more}\n"
            "Check the images folder (--images), or pass --skip-missing (skip_missing=True) to evaluate "
            "without them."
        )
        self.missing = list(missing)
        self.total = total


class EmptyDatasetError(EvalDataError):
    """A dataset has no usable examples (empty file, wrong split, or everything skipped)."""
