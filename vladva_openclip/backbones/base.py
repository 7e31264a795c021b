"""What a VladVA model needs from an LVLM family, and the registry of families.

A backbone knows how its transformers model is laid out (where the language model, embeddings and lm_head
are), how an open_clip image tensor ``[B,3,H,W]`` becomes LLM input embeddings, which token ids wrap the
image, and how positions are computed. Everything else (templates, prompts, pooling, losses) is shared.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch
from torch import nn

_logger = logging.getLogger(__name__)

BACKBONES: dict[str, "Backbone"] = {}


def register_backbone(cls: type["Backbone"]) -> type["Backbone"]:
    """Class decorator: registers one instance of ``cls`` under ``cls.name``; a second registration is an error."""
    if cls.name in BACKBONES:
        raise KeyError(f"backbone {cls.name!r} is already registered")
    BACKBONES[cls.name] = cls()
    return cls


def get_backbone(name: str) -> "Backbone":
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; registered backbones: {sorted(BACKBONES)}") from None


class WeightsNotFoundError(FileNotFoundError):
    """Base weights are neither in a local directory nor in the Hugging Face cache, and the hub is unreachable."""


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def missing_message(what: str, source: str) -> str:
    """The one error text for weights or a tokenizer that cannot be found: what is missing and how to provide it."""
    state = "offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE set)" if hub_offline() else "unreachable"
    return (
        f"{what} {source!r} are not in the local Hugging Face cache and the hub is {state}. Provide them in one "
        f"of these ways: (1) on a machine with network, run `huggingface-cli download {source}` and copy the cache "
        f"(HF_HOME) here; (2) pass base_model='/path/to/local/dir' (a directory saved with save_pretrained, holding "
        f"the weights and the tokenizer) to create_model; (3) set VLADVA_BASE_DIR=/dir holding a sub-directory named "
        f"{source.split('/')[-1]!r}. To only inspect the architecture, use device='meta' or load_weights=False."
    )


class Backbone:
    """Interface of one LVLM family. Subclasses set the class attributes and implement the abstract methods."""

    name: str = ""
    model_class_name: str = ""  # attribute of ``transformers``

    # ---- construction -------------------------------------------------------------------------------------
    def model_class(self) -> type[nn.Module]:
        import transformers

        return getattr(transformers, self.model_class_name)

    def build_config(self, hf_config: dict[str, Any]):
        from transformers import AutoConfig

        cfg = dict(hf_config)
        model_type = cfg.pop("model_type")
        return AutoConfig.for_model(model_type, **cfg)

    def build_random(self, hf_config: dict[str, Any], dtype: torch.dtype) -> nn.Module:
        """The architecture with random weights (on the current default device, which may be ``meta``)."""
        config = self.build_config(hf_config)
        config._attn_implementation = "sdpa"
        model = self.model_class()(config)
        return model.to(dtype) if model.dtype != dtype and str(next(model.parameters()).device) != "meta" else model

    def load_pretrained(self, source: str, dtype: torch.dtype, cache_dir: str | None = None) -> nn.Module:
        """Base weights from a local directory or a Hugging Face id (offline mode honoured)."""
        local = os.path.isdir(source)
        try:
            return self.model_class().from_pretrained(
                source, dtype=dtype, cache_dir=cache_dir, local_files_only=local or hub_offline(),
                attn_implementation="sdpa",
            )
        except (OSError, ValueError) as err:
            if local:
                raise WeightsNotFoundError(
                    f"could not load {self.name} base weights from local directory {source!r}: {err}"
                ) from err
            raise WeightsNotFoundError(missing_message("base weights", source)) from err

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

    def image_features(self, lvlm: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels [B,3,H,W]`` (normalised) -> projected vision features ``[B, N, H_llm]``."""
        raise NotImplementedError

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
