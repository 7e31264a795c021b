"""What a VladVA model needs from an LVLM family, and the registry of families.

A backbone knows how its transformers model is laid out (where the language model, embeddings and lm_head
are), how an open_clip image tensor ``[B,3,H,W]`` becomes LLM input embeddings, which token ids wrap the
image, and how positions are computed. Everything else (templates, prompts, pooling, losses) is shared.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .sources import (  # also re-exported: other modules import these names from here
    BaseModelError,
    WeightsNotFoundError,
    check_base_dir,
    check_family,
    hub_offline,
    is_local,
    missing_message,
    root_cause,
)

_logger = logging.getLogger(__name__)

BACKBONES: dict[str, Backbone] = {}


def register_backbone(cls: type[Backbone]) -> type[Backbone]:
    """Class decorator: registers one instance of ``cls`` under ``cls.name``; a second registration is an error."""
    if cls.name in BACKBONES:
        raise KeyError(f"backbone {cls.name!r} is already registered")
    BACKBONES[cls.name] = cls()
    return cls


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; registered backbones: {sorted(BACKBONES)}") from None


def hw(image_size: int | tuple[int, int] | torch.Size) -> tuple[int, int]:
    """``(height, width)`` of a square side or a pair."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


@dataclass
class VisionOutput:
    """What the vision side hands the LLM for a batch of images, flattened in image order.

    Attributes:
        tokens: ``[N_total, H_llm]`` projected features that fill the image-token slots, image after image.
        counts: ``[B]`` image tokens of each image (``N_total = counts.sum()``).
        layer_tokens: per early LLM layer ``i``, ``[N_total, H_llm]`` features added to that layer's output at the
            image slots (Qwen3-VL's DeepStack); empty for families that only fill the slots.
    """

    tokens: torch.Tensor
    counts: torch.Tensor
    layer_tokens: list[torch.Tensor] = field(default_factory=list)


class Backbone:
    """Interface of one LVLM family. Subclasses set the class attributes and implement the abstract methods."""

    name: str = ""
    model_class_name: str = ""  # attribute of ``transformers``
    model_types: tuple[str, ...] = ()  # config.json ``model_type`` values of checkpoints this family loads
    # True when the number of image tokens depends on each image (LLaVA-NeXT's anyres tiles, Qwen's dynamic
    # resolution): the model then
    # assembles right-padded image rows of their own lengths (see VladVA._image_rows).
    variable_image_tokens: bool = False
    # True when the vision tower takes tensors of any size its check_image_size allows (and per-image sizes within
    # one batch, as a list of [3, H, W] tensors): the number of image tokens follows each tensor's size (Qwen).
    dynamic_resolution: bool = False

    # ---- construction -------------------------------------------------------------------------------------
    def model_class(self) -> type[nn.Module]:
        import transformers

        return getattr(transformers, self.model_class_name)

    def build_config(self, hf_config: dict[str, Any]):
        from transformers import AutoConfig, PretrainedConfig

        if isinstance(hf_config, PretrainedConfig):
            return hf_config
        cfg = dict(hf_config)
        model_type = cfg.pop("model_type")
        return AutoConfig.for_model(model_type, **cfg)

    def build_random(self, hf_config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
        """The architecture with random weights, created directly in ``dtype`` (no float32 copy), on the current
        default device (which may be ``meta``)."""
        return self.model_class()._from_config(self.build_config(hf_config), dtype=dtype, attn_implementation="sdpa")

    def load_pretrained(self, source: str, dtype: torch.dtype, device: torch.device | None = None,
                        cache_dir: str | None = None, model_name: str | None = None) -> nn.Module:
        """Base weights from a local directory or a Hugging Face id (offline mode honoured).

        Weights are read straight into ``dtype`` (transformers builds the model on the meta device and loads one
        tensor at a time from memory-mapped safetensors): no float32 copy and no second host copy. With a CUDA
        ``device`` they go straight to it (``device_map``), so torchrun ranks do not each stage the model in host
        memory. The directory's (or hub id's) config.json is the architecture.

        Raises:
            WeightsNotFoundError: the directory or hub id does not hold the weights (the reason is in the text).
            BaseModelError: a checkpoint of another family, corrupt files, or weights missing from the checkpoint.
        """
        local = is_local(source)
        if local:
            source = os.path.expanduser(source)
            check_base_dir(source, self, model_name)
        else:
            self._check_hub_family(source, cache_dir, model_name)
        kwargs: dict[str, Any] = {"dtype": dtype, "cache_dir": cache_dir, "local_files_only": local or hub_offline(),
                                  "attn_implementation": "sdpa", "output_loading_info": True}
        if device is not None and device.type not in ("cpu", "meta"):
            kwargs["device_map"] = {"": device}
        try:
            lvlm, info = self.model_class().from_pretrained(source, **kwargs)
        except Exception as err:  # transformers/safetensors raise many types; the cause is kept
            if local:
                raise BaseModelError(
                    f"could not load {self.name} base weights from directory {source}: {root_cause(err)}. The "
                    f"directory must hold an unmodified {self.model_types[0]} checkpoint (config.json and the "
                    f"weights as written by save_pretrained)") from err
            raise WeightsNotFoundError(missing_message("base weights", source, err)) from err
        self._check_loading_info(lvlm, info, source)
        return lvlm

    def _check_hub_family(self, source: str, cache_dir: str | None, model_name: str | None) -> None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(source, cache_dir=cache_dir, local_files_only=hub_offline())
        except Exception as err:  # the hub raises many types; the cause is kept in the message
            raise WeightsNotFoundError(missing_message("base weights", source, err)) from err
        check_family(getattr(config, "model_type", None), self, f"hub checkpoint {source!r}", model_name)

    @staticmethod
    def _check_loading_info(lvlm: nn.Module, info: dict[str, Any], source: str) -> None:
        """from_pretrained fills weights absent from the checkpoint with random values and only warns: here a
        base with missing weights is an error (tied weights are not missing)."""
        missing = sorted(info.get("missing_keys") or [])
        if missing:
            raise BaseModelError(
                f"base checkpoint {source} lacks {len(missing)} weight(s) of {type(lvlm).__name__}, e.g. "
                f"{missing[:5]}; it was saved from another architecture or is incomplete. Provide the full "
                f"checkpoint")
        if info.get("unexpected_keys"):
            _logger.warning("base checkpoint %s has %d weight(s) the model does not use, e.g. %s", source,
                            len(info["unexpected_keys"]), sorted(info["unexpected_keys"])[:5])

    def architecture(self, config) -> dict[str, Any]:
        """What a checkpoint's config decides beyond the LVLM itself, as VladVAConfig fields (e.g. the image size
        of a fixed-size vision tower); empty when the registered value stays."""
        return {}

    # ---- layout -------------------------------------------------------------------------------------------
    def language_model(self, lvlm: nn.Module) -> nn.Module:
        return lvlm.model.language_model

    def input_embeddings(self, lvlm: nn.Module) -> nn.Embedding:
        return lvlm.get_input_embeddings()

    def lm_head(self, lvlm: nn.Module) -> nn.Linear:
        return lvlm.lm_head

    def frozen_towers(self, lvlm: nn.Module) -> list[nn.Module]:
        """Modules that are never trained (vision tower, projector)."""
        raise NotImplementedError

    # ---- image tokens -------------------------------------------------------------------------------------
    def image_token_id(self, config) -> int:
        raise NotImplementedError

    def num_image_tokens(self, config, image_size: int) -> int:
        raise NotImplementedError

    def image_body_ids(self, config, image_size: int) -> list[int]:
        """Token ids of the image part of a sequence; image-token slots are filled with vision features."""
        return [self.image_token_id(config)] * self.num_image_tokens(config, image_size)

    def check_image_size(self, config, image_size: int) -> None:
        """Raise ValueError when an image side is not supported by the family."""

    def input_size(self, config, image_size: int) -> tuple[int, int]:
        """``(height, width)`` of the image tensors ``encode_image`` takes (the preprocess transform's output)."""
        return image_size, image_size

    def image_features(self, lvlm: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B,3,H,W]`` (normalised) -> projected vision features ``[B, N, H_llm]``."""
        raise NotImplementedError

    def image_batch(self, lvlm: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels`` -> (features ``[B, N_max, H_llm]``, right-padded, and the count of each image ``[B]``).
        Fixed-count families: every count is ``N``."""
        feats = self.image_features(lvlm, pixels)
        return feats, torch.full((feats.shape[0],), feats.shape[1], dtype=torch.long, device=feats.device)

    def image_sizes(self, config, pixels: torch.Tensor) -> list[tuple[int, int]] | None:
        """Original ``(height, width)`` of each image where the token count depends on it; None otherwise."""
        return None

    def vision(self, lvlm: nn.Module, images: torch.Tensor | list[torch.Tensor]) -> VisionOutput:
        """Everything the vision side gives the LLM for ``images`` (``[B,3,H,W]``, or a list of ``[3,H_i,W_i]``
        for dynamic-resolution families); the default is :meth:`image_batch`, flattened."""
        if isinstance(images, (list, tuple)):
            images = torch.stack(list(images))
        feats, counts = self.image_batch(lvlm, images)
        real = torch.arange(feats.shape[1], device=feats.device).unsqueeze(0) < counts.unsqueeze(1)
        return VisionOutput(feats[real], counts)

    def injection_kwargs(self, layer_tokens: list[torch.Tensor], slots: torch.Tensor) -> dict[str, Any]:
        """Language-model keyword arguments carrying :attr:`VisionOutput.layer_tokens` into the LLM's early layers,
        given the image-slot mask ``slots [B, T]`` of the sequence; ``{}`` when there are none."""
        if layer_tokens:
            raise NotImplementedError(f"{self.name} produced per-layer visual features but cannot inject them")
        return {}

    def position_ids(
        self, lvlm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, image_size: int | None
    ) -> torch.Tensor | None:
        """Position ids for an assembled sequence ``ids [B,T]`` (right padded, ``mask [B,T]``).

        None means the language model's default (``arange``), which is exact with right padding.
        """
        return None

    def generation_inputs(
        self, lvlm: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``lvlm.generate`` for left-padded ``ids`` holding image tokens."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} ({self.model_class_name})"


Factory = Callable[..., nn.Module]
