"""The captioner interface and its registry (``--backend NAME``)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from ..config import CaptionJobConfig, GenerationSettings

__all__ = ["BACKENDS", "BackendUnavailable", "Captioner", "Generation", "keep_image", "register_backend"]



class BackendUnavailable(RuntimeError):
    """The backend cannot run here (a package or a device is missing); the message says what to do."""


@dataclass(frozen=True)
class Generation:
    """One generated caption: the raw decoded text, the number of generated tokens in the captioner's own
    tokenizer (EOS not counted) and why generation ended: ``stop`` (end of sequence) or ``length`` (budget)."""

    text: str
    n_tokens: int
    finish_reason: str


class Captioner(ABC):
    """A model that captions images with an instruction.

    ``prepare`` runs in the DataLoader workers (image -> whatever ``generate`` consumes; picklable), ``generate``
    in the main process on a batch of prepared images with one instruction.
    """

    name: str = ""

    @abstractmethod
    def prepare(self, image: Image.Image) -> Any: ...

    def image_transform(self) -> Callable[[Image.Image], Any]:
        """``prepare`` as a light, picklable callable for the DataLoader workers (not bound to the model, which a
        spawned worker would otherwise receive a copy of)."""
        return self.prepare

    @abstractmethod
    def full_prompt(self, instruction: str) -> str:
        """The exact prompt string the model reads for ``instruction`` (recorded with every caption)."""

    @abstractmethod
    def generate(self, inputs: list[Any], instruction: str, settings: GenerationSettings) -> list[Generation]:
        """Captions of ``inputs`` (prepared images) in order."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Length of ``text`` in the captioner's tokenizer (no special tokens)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Identity of the model (name, weights fingerprint, dtype) for the manifest and the settings hash."""

    @property
    def model_name(self) -> str:
        return str(self.describe().get("name"))


def keep_image(image: Image.Image) -> Image.Image:
    """The identity ``prepare`` of backends whose processor resizes in the main process."""
    return image


Builder = Callable[["CaptionJobConfig", Any], Captioner]
BACKENDS: dict[str, Builder] = {}


def register_backend(name: str) -> Callable[[Builder], Builder]:
    def add(builder: Builder) -> Builder:
        if name in BACKENDS:
            raise ValueError(f"caption backend {name!r} is already registered")
        BACKENDS[name] = builder
        return builder
    return add


def device_and_precision(config: CaptionJobConfig, ctx: Any) -> tuple[Any, str]:
    """The ``torch.device`` a backend runs on (``--device``, else the rank's default) and its precision
    (``--precision``, else bf16 on CUDA and fp32 elsewhere)."""
    import torch

    device = torch.device(config.device) if config.device else ctx.default_device()
    return device, config.precision or ("bf16" if device.type == "cuda" else "fp32")
