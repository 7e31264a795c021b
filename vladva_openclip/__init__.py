"""vladva_openclip: generative LVLMs (LLaVA-1.5, Qwen2-VL) as CLIP-like embedding models (VladVA), behind
open_clip's own API.

Importing the package installs the open_clip integration (idempotent; :func:`uninstall` reverts it)::

    import open_clip, vladva_openclip
    model, _, preprocess = open_clip.create_model_and_transforms("vladva-tiny-llava")
    tokenizer = open_clip.get_tokenizer("vladva-tiny-llava")
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._checkout import attach_kernels as _attach_kernels

_attach_kernels(__name__)  # before any submodule imports .kernels (see _checkout.py: torch.hub, no shadowing)

from .adapters import AdapterError, load_adapter, save_adapter, save_base
from .backbones import BaseModelError, WeightsNotFoundError
from .config import LoraSettings, PromptConfig, TemplateConfig, VladVAConfig
from .factory import count_parameters, create_vladva
from .hub import push_to_hub
from .integration import install, is_installed, uninstall
from .model import VladVA
from .registry import list_vladva_models, model_entrypoints, register_pretrained
from .tokenizer import VladVATokenizer

install()

__all__ = [
    "AdapterError", "BaseModelError", "LoraSettings", "PromptConfig", "TemplateConfig", "VladVA", "VladVAConfig", "VladVATokenizer",
    "WeightsNotFoundError", "count_parameters", "create_vladva", "install", "is_installed", "list_vladva_models",
    "load_adapter", "model_entrypoints", "push_to_hub", "register_pretrained", "save_adapter", "save_base", "uninstall",
]
