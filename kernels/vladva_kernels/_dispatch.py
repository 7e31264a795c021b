"""Choosing between the Triton kernels and the pure-torch references (xformers-style ``not_supported_reasons``).

Every op registers its implementations under a name in an :class:`OpRegistry`. An implementation says why it
cannot take a given input (a list of human-readable reasons; empty means it can). ``impl="auto"`` takes the first
implementation in priority order with no reasons, so the Triton path is used on CUDA tensors and the reference
everywhere else; naming an implementation that cannot take the input raises :class:`KernelNotSupportedError`
listing every reason. Triton is imported lazily: importing this package never requires it.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

_logger = logging.getLogger(__name__)

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class KernelNotSupportedError(ValueError):
    """An explicitly requested implementation cannot run on the given inputs; the message lists why."""


@functools.cache
def triton_available() -> bool:
    """Whether ``import triton`` can succeed (checked without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules["triton"] is None (import blocked)
        return False


def triton_interpret() -> bool:
    """Whether Triton runs in interpreter mode (``TRITON_INTERPRET=1``, which must be set before triton is imported).

    In that mode Triton kernels run on CPU tensors (slowly): the tests use it to check the kernels without a GPU.
    """
    import sys

    triton = sys.modules.get("triton")
    if triton is not None:
        return bool(triton.knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def interpreter_only_reasons(tensors: Iterable[torch.Tensor | None]) -> list[str]:
    """Extra reasons for ``impl="auto"``: CPU tensors reach the Triton kernels only through the (slow, test-only)
    interpreter, which auto never picks; ``impl="triton"`` still runs it."""
    if any(t is not None and not t.is_cuda for t in tensors):
        return ["auto runs Triton only on CUDA tensors (CPU tensors would go through the interpreter)"]
    return []


def triton_reasons(tensors: Iterable[torch.Tensor | None], dtypes: tuple[torch.dtype, ...] = TRITON_DTYPES
                   ) -> list[str]:
    """Reasons the generic Triton path cannot take these tensors (device, dtype, availability, tracing)."""
    reasons: list[str] = []
    if not triton_available():
        reasons.append("triton is not installed (pip install triton; Linux only)")
    tensors = [t for t in tensors if t is not None]
    interpret = triton_interpret()
    for t in tensors:
        if not (t.is_cuda or (interpret and t.device.type == "cpu")):
            reasons.append(f"tensor on device {t.device} (Triton kernels need CUDA tensors, or CPU tensors with "
                           "TRITON_INTERPRET=1 set before triton is imported)")
            break
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        reasons.append(f"tensors on different devices {sorted(str(d) for d in devices)}")
    for t in tensors:
        if t.is_floating_point() and t.dtype not in dtypes:
            reasons.append(f"dtype {t.dtype} not supported (supported: {', '.join(str(d) for d in dtypes)})")
            break
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        reasons.append("TorchScript tracing/scripting cannot capture Triton launches")
    if torch.compiler.is_compiling():
        reasons.append("inside torch.compile: the reference path compiles, the Triton launcher is opaque to it")
    return reasons


@dataclass(frozen=True)
class Implementation:
    """One way to compute an op: ``reasons(*args, **kwargs) -> list[str]`` (empty: supported) and ``fn``.

    ``auto_reasons`` adds reasons that only stop ``impl="auto"`` from choosing it.
    """

    name: str
    fn: Callable
    reasons: Callable[..., list[str]]
    auto_reasons: Callable[..., list[str]] | None = None

    def all_reasons(self, *args, **kwargs) -> list[str]:
        extra = self.auto_reasons(*args, **kwargs) if self.auto_reasons else []
        return self.reasons(*args, **kwargs) + extra


@dataclass
class OpRegistry:
    """Implementations of one op in priority order (``auto`` takes the first one that supports the input)."""

    op: str
    _impls: dict[str, Implementation] = field(default_factory=dict)

    def register(self, name: str, fn: Callable, reasons: Callable[..., list[str]],
                 auto_reasons: Callable[..., list[str]] | None = None) -> None:
        if name in self._impls or name == "auto":
            raise KeyError(f"{self.op}: implementation {name!r} is already registered (or reserved)")
        self._impls[name] = Implementation(name, fn, reasons, auto_reasons)

    @property
    def names(self) -> list[str]:
        return list(self._impls)

    def not_supported_reasons(self, impl: str, *args, **kwargs) -> list[str]:
        """Why implementation ``impl`` cannot run on these inputs (empty list: it can)."""
        return self._get(impl).reasons(*args, **kwargs)

    def select(self, impl: str, *args, **kwargs) -> Implementation:
        """The implementation to run: ``auto`` picks the first supported one; a named one must support the input."""
        if impl == "auto":
            for candidate in self._impls.values():
                if not candidate.all_reasons(*args, **kwargs):
                    return candidate
            raise KernelNotSupportedError(self._report(*args, **kwargs))
        chosen = self._get(impl)
        reasons = chosen.reasons(*args, **kwargs)
        if reasons:
            raise KernelNotSupportedError(
                f"{self.op}: impl={impl!r} cannot run on these inputs:\n  - " + "\n  - ".join(reasons)
                + "\nUse impl='auto' to fall back to the reference automatically.")
        return chosen

    def _get(self, impl: str) -> Implementation:
        if impl not in self._impls:
            raise ValueError(f"{self.op}: unknown impl {impl!r}; choose one of {['auto', *self._impls]}")
        return self._impls[impl]

    def _report(self, *args, **kwargs) -> str:
        lines = [f"{self.op}: no implementation supports these inputs:"]
        for candidate in self._impls.values():
            lines.append(f"  {candidate.name}: " + "; ".join(candidate.all_reasons(*args, **kwargs)))
        return "\n".join(lines)


def no_reasons(*args, **kwargs) -> list[str]:
    """The reference implementations take every input their argument checks accept."""
    return []
