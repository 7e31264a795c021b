"""The seam with open_clip: make open_clip's own entry points handle ``vladva-*`` names, reversibly.

open_clip 3.3.0 picks the model class in hard-coded branches, so ``create_model`` is wrapped; the wrapper
dispatches only on VladVA names and passes every other call through untouched. ``create_model_and_transforms``
and ``create_model_from_pretrained`` look ``create_model`` up in ``open_clip.factory`` at call time, so they follow.
Other modules that imported a function by name (``open_clip``, ``open_clip_train.main``/``zero_shot``...) hold
their own binding: every module-level alias of an original is rebound, and restored by :func:`uninstall`.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

_logger = logging.getLogger(__name__)

_MARK = "__vladva_wrapped__"
# (module, attribute, original) for every binding changed, so uninstall restores exactly these.
_patched: list[tuple[Any, str, Any]] = []
_added_tags: list[tuple[str, str]] = []
_added_config_path: list[Any] = []
_added_configs: list[str] = []


def _hub_target(name: Any, cache_dir: str | None) -> str | None:
    """The VladVA model an ``hf-hub:``/``local-dir:`` name's open_clip_config.json names (None: not one)."""
    from .hub import hub_model_name, is_schema_name

    return hub_model_name(name, cache_dir=cache_dir) if is_schema_name(name) else None


def _vladva_create_model(original: Callable) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def create_model(*args: Any, **kwargs: Any):
        from .registry import is_vladva_name

        bound = signature.bind(*args, **kwargs)
        name = bound.arguments.get("model_name")
        hub = _hub_target(name, bound.arguments.get("cache_dir"))
        if not is_vladva_name(hub or name):
            return original(*args, **kwargs)
        from .factory import create_vladva

        params = dict(bound.arguments)
        params.update(params.pop("model_kwargs", {}))
        params.pop("model_name")
        if hub:  # hf-hub:/local-dir: repository of a VladVA adapter: it is the pretrained weights, as in open_clip
            if params.get("pretrained"):
                _logger.warning("ignoring pretrained=%r: %s names its own weights", params["pretrained"], name)
            name, params["pretrained"] = hub, name
        return create_vladva(name, **params)

    setattr(create_model, _MARK, True)
    return create_model


def _vladva_get_tokenizer(original: Callable) -> Callable:
    @functools.wraps(original)
    def get_tokenizer(model_name: str = "", context_length: int | None = None, cache_dir: str | None = None,
                      **kwargs: Any):
        from .registry import is_vladva_name

        model_name = _hub_target(model_name, cache_dir) or model_name
        if not is_vladva_name(model_name):
            return original(model_name, context_length=context_length, cache_dir=cache_dir, **kwargs)
        from .factory import build_tokenizer, tokenizer_config

        # tokenizer= / base_model= as for create_model (a base directory carries its own tokenizer).
        unknown = sorted(set(kwargs) - {"tokenizer", "base_model"})
        if unknown:
            raise TypeError(f"unexpected arguments for the {model_name} tokenizer: {unknown}; VladVA tokenizers take "
                            f"context_length, cache_dir, tokenizer=<dir or hub id>, base_model=<dir or hub id>")
        cfg = tokenizer_config(model_name.replace("/", "-"), **kwargs)
        return build_tokenizer(cfg, context_length=context_length, cache_dir=cache_dir)

    setattr(get_tokenizer, _MARK, True)
    return get_tokenizer


def _vladva_image_transform_v2(original: Callable) -> Callable:
    """LLaVA-NeXT's ``anyres:...`` resize mode (not one of open_clip's) builds :class:`anyres.AnyresTransform`;
    every other config goes to open_clip untouched."""

    @functools.wraps(original)
    def image_transform_v2(cfg, is_train, aug_cfg=None):
        from .anyres import AnyresTransform, parse_resize_mode

        geometry = parse_resize_mode(getattr(cfg, "resize_mode", None))
        if geometry is None:
            return original(cfg, is_train, aug_cfg=aug_cfg)
        if is_train and aug_cfg:
            _logger.warning("the anyres transform has no augmentation; aug_cfg is ignored")
        return AnyresTransform(geometry, cfg.mean, cfg.std)

    setattr(image_transform_v2, _MARK, True)
    return image_transform_v2


WRAPPERS: dict[str, Callable[[Callable], Callable]] = {
    "create_model": _vladva_create_model,
    "get_tokenizer": _vladva_get_tokenizer,
    "image_transform_v2": _vladva_image_transform_v2,
}


def _rebind(original: Callable, wrapper: Callable) -> None:
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not namespace:
            continue
        for attr, value in list(namespace.items()):
            if value is original:
                setattr(module, attr, wrapper)
                _patched.append((module, attr, original))


def is_installed() -> bool:
    from open_clip import factory

    return getattr(factory.create_model, _MARK, False)


def install() -> None:
    """Register the VladVA configs and pretrained tags with open_clip and wrap its entry points (idempotent).

    Modules imported later that bind open_clip functions by name (e.g. ``open_clip_train.main``) are covered
    by calling ``install()`` again after importing them; the trainer does so.
    """
    import open_clip
    import open_clip.pretrained as oc_pretrained
    from open_clip import factory

    from .registry import CONFIG_DIR, pretrained_tags

    if not is_installed():
        known = set(factory._MODEL_CONFIGS)
        factory._MODEL_CONFIG_PATHS.append(CONFIG_DIR)
        _added_config_path.append(CONFIG_DIR)
        factory._rescan_model_configs()
        _added_configs.extend(sorted(set(factory._MODEL_CONFIGS) - known))
        for name, tags in pretrained_tags().items():
            for tag, cfg in tags.items():
                if tag not in oc_pretrained._PRETRAINED.get(name, {}):
                    oc_pretrained._PRETRAINED.setdefault(name, {})[tag] = cfg
                    _added_tags.append((name, tag))
    # Rebind every alias of the originals, including ones created since the last install().
    for attr, make in WRAPPERS.items():
        current = getattr(factory, attr)
        original = getattr(current, "__wrapped__", current) if getattr(current, _MARK, False) else current
        wrapper = current if getattr(current, _MARK, False) else make(original)
        _rebind(original, wrapper)
    _logger.debug("open_clip integration installed (%s)", open_clip.__version__)


def uninstall() -> None:
    """Undo :func:`install`: open_clip's functions, configs and pretrained tags are as before."""
    import open_clip.pretrained as oc_pretrained
    from open_clip import factory

    while _patched:
        module, attr, original = _patched.pop()
        setattr(module, attr, original)
    while _added_tags:
        name, tag = _added_tags.pop()
        tags = oc_pretrained._PRETRAINED.get(name, {})
        tags.pop(tag, None)
        if not tags:
            oc_pretrained._PRETRAINED.pop(name, None)
    while _added_config_path:
        path = _added_config_path.pop()
        if path in factory._MODEL_CONFIG_PATHS:
            factory._MODEL_CONFIG_PATHS.remove(path)
    # A rescan only adds entries, so the names this package added are removed explicitly.
    while _added_configs:
        factory._MODEL_CONFIGS.pop(_added_configs.pop(), None)
