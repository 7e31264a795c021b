"""Registered VladVA model names (one JSON config each in ``model_configs/``) and their pretrained tags."""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
ASSET_DIR = Path(__file__).resolve().parent / "assets"
PREFIX = "vladva-"

# name -> tag -> open_clip pretrained cfg ({"file": path} plus optional preprocessing keys). Tags whose files
# are not installed are not listed.
_PRETRAINED: dict[str, dict[str, dict[str, Any]]] = {}


@lru_cache(maxsize=None)
def _configs() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(CONFIG_DIR.glob(f"{PREFIX}*.json"))}


def list_vladva_models() -> list[str]:
    return list(_configs())


def is_vladva_name(name: str) -> bool:
    return isinstance(name, str) and name.replace("/", "-").startswith(PREFIX)


def get_vladva_config(name: str) -> dict[str, Any]:
    """The full JSON config of a registered name (a deep copy); unknown names list the registered ones."""
    key = name.replace("/", "-")
    try:
        return copy.deepcopy(_configs()[key])
    except KeyError:
        raise ValueError(f"unknown VladVA model {name!r}; registered VladVA models: {list_vladva_models()}") from None


def register_pretrained(name: str, tag: str, cfg: dict[str, Any]) -> None:
    """Register ``tag`` of model ``name`` (``cfg`` as in open_clip's pretrained registry: ``file``, ``hf_hub``...)."""
    get_vladva_config(name)
    tags = _PRETRAINED.setdefault(name, {})
    key = tag.lower().replace("-", "_")
    if key in tags:
        raise KeyError(f"pretrained tag {tag!r} of {name!r} is already registered")
    tags[key] = dict(cfg)


def pretrained_tags() -> dict[str, dict[str, dict[str, Any]]]:
    return _PRETRAINED


def get_pretrained_cfg(name: str, tag: str) -> dict[str, Any] | None:
    return _PRETRAINED.get(name.replace("/", "-"), {}).get(tag.lower().replace("-", "_"))


def _register_shipped() -> None:
    """Tags whose files ship inside the package (tiny models trained by the project's own scripts)."""
    shipped = ASSET_DIR / "pretrained"
    if not shipped.is_dir():
        return
    for model_dir in sorted(p for p in shipped.iterdir() if p.is_dir()):
        for tag_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            if (tag_dir / "vladva_adapter.json").is_file():
                register_pretrained(model_dir.name, tag_dir.name, {"file": str(tag_dir)})


def model_entrypoints() -> dict[str, Callable[..., Any]]:
    """One torch.hub entry point per registered name (``vladva-tiny-llava`` -> ``vladva_tiny_llava``), plus
    ``tokenizer``.

    Like timm's and dinov2's entries, a model entry returns the model. ``return_transforms=True`` returns
    open_clip's ``(model, preprocess_train, preprocess_val)`` instead, for CLIP code written around
    ``create_model_and_transforms``; ``torch.hub.load(repo, "tokenizer", name)`` gives the matching tokenizer.
    """

    def make(name: str) -> Callable[..., Any]:
        def entry(pretrained: str | None = None, return_transforms: bool = False, **kwargs: Any):
            import open_clip

            from . import install

            install()
            if return_transforms:
                return open_clip.create_model_and_transforms(name, pretrained=pretrained, **kwargs)
            return open_clip.create_model(name, pretrained=pretrained, **kwargs)

        entry.__name__ = name.replace("-", "_")
        entry.__doc__ = (f"``{name}``: the VladVA model, as open_clip.create_model({name!r}, pretrained=...) builds "
                         f"it. Pretrained tags: {sorted(_PRETRAINED.get(name, {})) or 'none shipped'}. "
                         f"return_transforms=True returns (model, preprocess_train, preprocess_val) like "
                         f"open_clip.create_model_and_transforms; other keywords go to open_clip "
                         f"(precision, device, base_model, ...).")
        return entry

    def tokenizer(name: str, **kwargs: Any):
        """The open_clip tokenizer of a VladVA model name: ``torch.hub.load(repo, "tokenizer", "vladva-llava7b")``
        (keywords go to open_clip.get_tokenizer, e.g. ``base_model=DIR``)."""
        import open_clip

        from . import install

        install()
        return open_clip.get_tokenizer(name, **kwargs)

    entries: dict[str, Callable[..., Any]] = {name.replace("-", "_"): make(name) for name in list_vladva_models()}
    entries["tokenizer"] = tokenizer
    return entries


_register_shipped()
