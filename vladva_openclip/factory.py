"""Building VladVA models and tokenizers: resolve config -> build base -> wrap -> load adapter -> finalise."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from .adapters import BASE_FILE, check_compatible, config_fingerprint, load_adapter, load_base_weights, read_meta
from .backbones import Backbone, WeightsNotFoundError, get_backbone
from .backbones.sources import BaseModelError, check_base_dir, check_tokenizer_dir, is_local, root_cause
from .config import VladVAConfig
from .hub import is_schema_name, resolve_adapter
from .model import VladVA
from .registry import get_pretrained_cfg, get_vladva_config, pretrained_tags
from .tokenizer import VladVATokenizer, load_hf_tokenizer
from .transforms import preprocess_cfg

_logger = logging.getLogger(__name__)

# create_model keyword -> config field it overrides ("section.field" for nested fields).
CONFIG_OVERRIDES: dict[str, str] = {
    "base_model": "base_model",
    "tokenizer": "tokenizer",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "use_lora": "lora.enabled",
    "image_prompt": "image_prompt.text",
    "text_prompt": "text_prompt.text",
    "image_prompt_mode": "image_prompt.mode",
    "text_prompt_mode": "text_prompt.mode",
    "init_logit_scale": "init_logit_scale",
    "context_length": "context_length",
    "resize_mode": "resize_mode",
}
# open_clip precision -> dtype the frozen base is loaded in (trainable parameters always stay fp32). autocast
# precisions keep open_clip's meaning (float32 weights) except amp_bf16: its matmuls run in bf16 anyway, so the
# base is stored in bf16 and never exists in float32 (half the memory; what open_clip_train's amp_bf16 runs use).
BASE_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "amp": torch.float32, "amp_fp16": torch.float32, "amp_bfloat16": torch.bfloat16,
    "amp_bf16": torch.bfloat16, "bf16": torch.bfloat16, "pure_bf16": torch.bfloat16, "fp16": torch.float16,
    "pure_fp16": torch.float16,
}
# open_clip arguments that have no meaning for an LVLM tower.
_UNSUPPORTED = ("jit", "force_quick_gelu", "force_custom_text", "force_patch_dropout", "pretrained_image_path",
                "pretrained_text_path")
RANDOM_INIT_SEED = 0


def resolve_pretrained(name: str, pretrained: str | None) -> tuple[Path | None, dict[str, Any]]:
    """A tag or a path -> (local path or None, preprocessing keys from the tag)."""
    if not pretrained:
        return None, {}
    if is_schema_name(pretrained):  # hf-hub:org/repo or local-dir:/path holding an adapter (see hub.py)
        return resolve_adapter(pretrained), {}
    tag_cfg = get_pretrained_cfg(name, pretrained)
    if tag_cfg is not None:
        if "file" not in tag_cfg:
            from open_clip.pretrained import download_pretrained

            return Path(download_pretrained(tag_cfg)), tag_cfg
        return Path(tag_cfg["file"]), tag_cfg
    path = Path(os.path.expanduser(pretrained))
    if path.exists():
        return path, {}
    tags = sorted(pretrained_tags().get(name, {}))
    raise ValueError(f"pretrained={pretrained!r} for {name!r} is neither a registered tag ({tags or 'none'}) nor an "
                     f"existing adapter directory / .safetensors / .pt file")


def build_config(name: str, overrides: dict[str, Any], adapter_meta: dict[str, Any] | None) -> VladVAConfig:
    cfg = VladVAConfig.from_dict(get_vladva_config(name)["vladva_cfg"], where=name)
    changes: dict[str, Any] = {}
    if adapter_meta:
        # The adapter's own structure (prompt modes, LoRA shape) wins over the registered defaults.
        for key in ("image_prompt", "text_prompt"):
            changes[f"{key}.text"] = adapter_meta[key]["text"]
            changes[f"{key}.mode"] = adapter_meta[key]["mode"]
        for key, value in adapter_meta.get("lora", {}).items():
            changes[f"lora.{key}"] = value
    for key, value in overrides.items():
        changes[CONFIG_OVERRIDES[key]] = value
    return cfg.replace(**changes) if changes else cfg


def _tokenizer_follows_base(name: str, kwargs: dict[str, Any]) -> None:
    """A ``base_model`` override also sets the tokenizer when the registered config takes both from one place
    (a base directory or hub repo carries its own tokenizer)."""
    registered = get_vladva_config(name)["vladva_cfg"]
    if "base_model" in kwargs and "tokenizer" not in kwargs and registered.get("tokenizer") == registered.get("base_model"):
        kwargs["tokenizer"] = kwargs["base_model"]


def tokenizer_config(name: str, **overrides: Any) -> VladVAConfig:
    """The config ``get_tokenizer(name, tokenizer=..., base_model=...)`` builds its tokenizer from."""
    _tokenizer_follows_base(name, overrides)
    return build_config(name, overrides, None)


def _local_override(source: str | None) -> str | None:
    """``VLADVA_BASE_DIR/<last part of the hub id>`` when that directory exists, else ``source``."""
    if source is None or source.startswith("asset:"):
        return source
    root = os.environ.get("VLADVA_BASE_DIR")
    if root and not is_local(source):
        candidate = Path(root) / source.split("/")[-1]
        if candidate.is_dir():
            return str(candidate)
    return source


def make_tokenizer(hf_tokenizer, cfg: VladVAConfig, context_length: int | None = None) -> VladVATokenizer:
    """The caption tokenizer over ``hf_tokenizer`` for ``cfg``'s templates and handcrafted prompts."""
    return VladVATokenizer(hf_tokenizer, context_length or cfg.context_length, template=cfg.template,
                           text_prompt=cfg.text_prompt.text, image_prompt=cfg.image_prompt.text)


def build_tokenizer(cfg: VladVAConfig, context_length: int | None = None, cache_dir: str | None = None):
    """The caption tokenizer of ``cfg`` (its ``tokenizer``, else its ``base_model``).

    Raises:
        WeightsNotFoundError: a local tokenizer directory that is missing or holds no tokenizer files, or a hub
            id that cannot be fetched.
        BaseModelError: a local tokenizer directory whose files cannot be parsed.
    """
    source = _local_override(cfg.tokenizer or cfg.base_model)
    if source is None:
        raise ValueError("the model config names no tokenizer; pass tokenizer=<directory or Hugging Face id>")
    if source.startswith("asset:") or not is_local(source):
        return make_tokenizer(load_hf_tokenizer(source, cache_dir=cache_dir), cfg, context_length)
    root = check_tokenizer_dir(source)
    try:
        hf_tokenizer = load_hf_tokenizer(str(root), cache_dir=cache_dir)
    except Exception as err:  # tokenizers raises bare Exceptions for corrupt files
        raise BaseModelError(f"tokenizer directory {root} cannot be loaded ({root_cause(err)}); its files are "
                             f"corrupt or incomplete: copy the base model's tokenizer files there again") from err
    return make_tokenizer(hf_tokenizer, cfg, context_length)


def _base_source(cfg: VladVAConfig) -> str | None:
    source = _local_override(cfg.base_model)
    return os.path.expanduser(source) if source is not None and is_local(source) else source


def adopt_architecture(cfg: VladVAConfig, backbone: Backbone, hf_config: Any) -> VladVAConfig:
    """``cfg`` with the checkpoint's own config (a config.json dict or a transformers config) as the architecture,
    and what it fixes (e.g. LLaVA's image size).

    The registered ``hf_config`` only describes the checkpoint the name was registered for; a base directory of
    another size (a smaller test checkpoint, a fine-tuned variant) is built as its config.json says.
    """
    config = backbone.build_config(hf_config)
    as_dict = hf_config if isinstance(hf_config, dict) else config.to_dict()
    changes = {"hf_config": as_dict, **backbone.architecture(config)}
    if changes.get("image_size") not in (None, cfg.image_size):
        _logger.info("image size %s from the base checkpoint (registered: %s)", changes["image_size"], cfg.image_size)
    return cfg.replace(**changes)


def local_architecture(cfg: VladVAConfig, model_name: str | None = None, need_weights: bool = True) -> VladVAConfig:
    """When the base is a local directory, check it (exists, config.json, family, weights) before anything is
    loaded, and make its config.json the architecture, also for meta-device and random builds."""
    source = _base_source(cfg)
    if source is None or not is_local(source):
        return cfg
    backbone = get_backbone(cfg.backbone)
    return adopt_architecture(cfg, backbone, check_base_dir(source, backbone, model_name, need_weights=need_weights))


def _ships_base(adapter_path: Path | None) -> bool:
    return adapter_path is not None and adapter_path.is_dir() and (adapter_path / BASE_FILE).is_file()


def build_lvlm(cfg: VladVAConfig, device: torch.device, dtype: torch.dtype, load_weights: bool,
               adapter_path: Path | None, cache_dir: str | None, model_name: str | None = None):
    """The base LVLM in ``dtype``, never materialised in float32 first -> (lvlm, ``cfg`` with its architecture).

    Weights come from, in order: nothing on the ``meta`` device; the adapter directory when it ships
    ``base_model.safetensors`` (tiny models); the config's ``base_model`` (a directory or hub id; straight onto a
    CUDA ``device``) when ``load_weights``; else a seeded random initialisation.
    """
    backbone = get_backbone(cfg.backbone)
    source = _base_source(cfg)
    ships_base = _ships_base(adapter_path)
    if device.type == "meta":
        with torch.device("meta"):
            return backbone.build_random(cfg.hf_config, dtype), cfg
    if source is not None and load_weights and not ships_base:
        lvlm = backbone.load_pretrained(source, dtype, device=device, cache_dir=cache_dir, model_name=model_name)
        if not is_local(source):  # a local directory's config was adopted before loading
            cfg = adopt_architecture(cfg, backbone, lvlm.config)
        return lvlm, cfg
    if source is not None and not ships_base:
        _logger.warning("load_weights=False: %s is built with RANDOM weights (architecture only)", source)
    # Random init is seeded so that a tiny model (and its LoRA init) is the same on every call and machine; it is
    # drawn on the CPU for the same reason, directly in the target dtype.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        lvlm = backbone.build_random(cfg.hf_config, dtype)
    if ships_base:
        load_base_weights(lvlm, adapter_path)
    return lvlm, cfg


def create_vladva(
    model_name: str,
    pretrained: str | None = None,
    load_weights: bool = True,
    precision: str = "fp32",
    device: str | torch.device = "cpu",
    force_image_size: int | None = None,
    force_preprocess_cfg: dict[str, Any] | None = None,
    force_context_length: int | None = None,
    cache_dir: str | None = None,
    output_dict: bool | None = None,
    require_pretrained: bool = False,
    init_seed: int | None = None,
    **kwargs: Any,
) -> VladVA:
    """Build a registered VladVA model; the open_clip ``create_model`` signature, plus config overrides.

    Args:
        model_name: a registered ``vladva-*`` name.
        pretrained: a registered tag, an adapter directory, a ``.safetensors`` trainable state dict or an
            open_clip_train ``.pt`` checkpoint. Base weights always come from the config's ``base_model`` (a
            Hugging Face id or, with ``base_model=``/``VLADVA_BASE_DIR``, a local directory).
        precision: open_clip precision; decides the dtype the frozen base is loaded in (``BASE_DTYPES``: the bf16
            variants, amp_bf16 included, give bfloat16; fp16/pure_fp16 float16; fp32/amp float32). The base is
            read straight into that dtype: no float32 copy is ever made.
        device: where the model is built; with a CUDA device the base weights are loaded straight onto it
            (each torchrun rank onto its own), ``"meta"`` builds the architecture without weights.
        **kwargs: overrides from ``CONFIG_OVERRIDES`` (e.g. ``lora_r=8``, ``image_prompt_mode="both"``).
    """
    for key in _UNSUPPORTED:
        if kwargs.pop(key, None):
            _logger.warning("%s has no effect on VladVA models; ignored", key)
    for key in ("init_logit_bias", "weights_only", "pretrained_image", "pretrained_text", "cast_dtype"):
        kwargs.pop(key, None)
    unknown = sorted(set(kwargs) - set(CONFIG_OVERRIDES))
    if unknown:
        raise TypeError(f"unexpected arguments for {model_name}: {unknown}; VladVA options: {sorted(CONFIG_OVERRIDES)}")
    if precision not in BASE_DTYPES:
        raise ValueError(f"precision {precision!r} is not supported; choose from {sorted(BASE_DTYPES)}")
    name = model_name.replace("/", "-")
    path, tag_cfg = resolve_pretrained(name, pretrained)
    if require_pretrained and path is None:
        raise ValueError(f"{name} needs pretrained=<tag or adapter path>; tags: {sorted(pretrained_tags().get(name, {}))}")
    meta = read_meta(path) if path is not None else None
    raw_meta = meta
    if meta is not None and meta.get("base_only"):
        meta = None  # base weights only: the registered structure (and the keywords) decide the adapters
    if force_context_length:
        kwargs["context_length"] = force_context_length
    _tokenizer_follows_base(name, kwargs)
    cfg = build_config(name, kwargs, meta)
    device = torch.device(device)
    dtype = BASE_DTYPES[precision]
    loads_base = load_weights and device.type != "meta" and not _ships_base(path)
    cfg = local_architecture(cfg, name, need_weights=loads_base)
    if raw_meta is not None:  # before any base weights are read or downloaded (a 7B base for a tiny adapter)
        check_compatible(None, raw_meta, str(path), mine=config_fingerprint(cfg))
    if force_image_size:
        size = force_image_size if isinstance(force_image_size, int) else force_image_size[0]
        cfg = cfg.replace(image_size=int(size))
    try:
        tokenizer = build_tokenizer(cfg, cache_dir=cache_dir)
    except WeightsNotFoundError:
        if device.type != "meta":
            raise
        # On the meta device only the template's token counts matter; the shipped tokenizer stands in.
        _logger.warning("tokenizer %s unavailable; using a stand-in for the meta-device build", cfg.tokenizer)
        tokenizer = make_tokenizer(load_hf_tokenizer("asset:tiny-llava"), cfg)
    lvlm, cfg = build_lvlm(cfg, device, dtype, load_weights, path, cache_dir, model_name=name)
    with torch.random.fork_rng(devices=[]), (device if device.type == "meta" else contextlib.nullcontext()):
        # The adapters' initialisation (LoRA, soft prompts) follows init_seed (the trainer passes --seed).
        torch.manual_seed(RANDOM_INIT_SEED if init_seed is None else int(init_seed))
        model = VladVA(cfg, lvlm, tokenizer, name=name)
        model.add_lora()
    model.tokenizer = tokenizer
    if path is not None:
        load_adapter(model, path)
    if device.type != "meta":
        model.to(device)
    pp = preprocess_cfg(cfg)
    pp.update({k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg})
    pp.update(force_preprocess_cfg or {})
    model.visual.preprocess_cfg = pp
    model.visual.image_mean, model.visual.image_std = pp["mean"], pp["std"]
    if output_dict is not None:
        model.output_dict = output_dict
    return model


def count_parameters(model: VladVA) -> dict[str, int]:
    """Parameter counts: the base LVLM (LoRA excluded), LoRA, soft prompts and the total trainable."""
    base = sum(p.numel() for n, p in model.lvlm.named_parameters() if "lora_" not in n)
    lora = sum(p.numel() for n, p in model.lvlm.named_parameters() if "lora_" in n)
    groups = model.trainable_groups()
    return {
        "base": base, "lora": lora, "soft_prompt": sum(p.numel() for _, p in groups["soft_prompt"]),
        "trainable": sum(p.numel() for g in groups.values() for _, p in g),
    }
