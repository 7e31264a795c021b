"""VladVA adapters on the Hugging Face Hub, the way open_clip's own hub models work.

A hub repository (or a local folder) is an adapter directory (see :mod:`.adapters`) plus

- ``open_clip_config.json``: ``{"model_cfg": <the registered model's config>, "preprocess_cfg": {...},
  "vladva": {"model_name": "vladva-llava7b", ...}}``, what open_clip reads for ``hf-hub:`` / ``local-dir:`` names;
  ``model_cfg`` carries ``vladva_cfg``, so any tool can tell a VladVA repository from a CLIP one;
- ``README.md``: a model card (base model, recipe, training flags, and a ``vladva-eval`` results table if given).

So ``open_clip.create_model("hf-hub:org/repo")`` (the name from the config) and
``open_clip.create_model("vladva-llava7b", pretrained="hf-hub:org/repo")`` both load it. Downloads go through
``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, tokens); only the adapter's own files are fetched.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .hub_files import CARD_NAME, CONFIG_NAME, model_card, open_clip_config, write_hub_files

_logger = logging.getLogger(__name__)

__all__ = ["CONFIG_NAME", "HF_HUB_PREFIX", "LOCAL_DIR_PREFIX", "hub_model_name", "is_schema_name", "model_card",
           "open_clip_config", "push_to_hub", "resolve_adapter", "write_hub_files"]

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
#: what a VladVA hub repository may hold; nothing else is downloaded
ADAPTER_FILES = ("vladva_adapter.json", "adapter_config.json", "adapter_model.safetensors",
                 "vladva_extras.safetensors", "base_model.safetensors", CONFIG_NAME, CARD_NAME)


def is_schema_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith((HF_HUB_PREFIX, LOCAL_DIR_PREFIX))


def _repo_id(name: str) -> str:
    repo = name[len(HF_HUB_PREFIX):].strip("/")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ValueError(f"{name!r}: expected hf-hub:<org>/<repo>")
    return repo


def _read_config(name: str, cache_dir: str | None = None) -> dict[str, Any]:
    if name.startswith(LOCAL_DIR_PREFIX):
        path = Path(name[len(LOCAL_DIR_PREFIX):]).expanduser() / CONFIG_NAME
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(_repo_id(name), CONFIG_NAME, cache_dir=cache_dir))
    return json.loads(path.read_text(encoding="utf-8"))


#: the parts of open_clip_config.json this package reads: field -> (allowed JSON types, required)
HUB_CONFIG_SCHEMA: dict[str, Any] = {
    "model_cfg": ({}, False),
    "preprocess_cfg": ({}, False),
    "vladva": ({"model_name": ((str,), True), "format_version": ((int,), False)}, False),
}


def validate_hub_config(config: Any, source: str) -> None:
    """``open_clip_config.json`` against :data:`HUB_CONFIG_SCHEMA` (objects where objects belong, ``vladva.model_name``
    a string); ValueError (AdapterError) naming the file and the field."""
    from .adapters import validate_json

    validate_json(config, HUB_CONFIG_SCHEMA, source)


def hub_model_name(name: str, cache_dir: str | None = None) -> str | None:
    """The registered VladVA model an ``hf-hub:``/``local-dir:`` repository's ``open_clip_config.json`` names, or
    None when it is not a VladVA repository or its config cannot be read (open_clip then reports the problem)."""
    from .registry import is_vladva_name

    try:
        config = _read_config(name, cache_dir)
    except Exception as err:  # noqa: BLE001 - missing file, offline, bad JSON: open_clip's own path reports it
        _logger.debug("%s: no readable %s (%s)", name, CONFIG_NAME, err)
        return None
    validate_hub_config(config, f"{name}: {CONFIG_NAME}")
    target = (config.get("vladva") or {}).get("model_name")
    if target is None and "vladva_cfg" in (config.get("model_cfg") or {}):
        raise ValueError(f"{name}: {CONFIG_NAME} holds a VladVA config but names no model (vladva.model_name)")
    if target is not None and not is_vladva_name(target):
        raise ValueError(f"{name}: {CONFIG_NAME} names {target!r}, which is not a VladVA model")
    return target


def resolve_adapter(pretrained: str, cache_dir: str | None = None) -> Path:
    """``hf-hub:org/repo`` -> the local snapshot of its adapter files (downloaded or from the cache);
    ``local-dir:/path`` -> the folder."""
    if pretrained.startswith(LOCAL_DIR_PREFIX):
        path = Path(pretrained[len(LOCAL_DIR_PREFIX):]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{pretrained}: no such directory")
        return path
    from huggingface_hub import snapshot_download

    repo = _repo_id(pretrained)
    try:
        return Path(snapshot_download(repo, cache_dir=cache_dir, allow_patterns=list(ADAPTER_FILES)))
    except Exception as err:  # huggingface_hub raises many types; say what was asked for
        raise FileNotFoundError(f"cannot get the adapter {pretrained} from the Hugging Face Hub or its cache "
                                f"({type(err).__name__}: {err}); offline, it must be in the cache "
                                "(HF_HUB_CACHE), downloaded earlier") from err


def push_to_hub(model, repo_id: str, *, training: Mapping[str, Any] | str | os.PathLike | None = None,
                results: Any = None, license: str | None = None, include_base: bool = False, private: bool = False,
                token: str | None = None, revision: str | None = None, create_pr: bool = False,
                commit_message: str = "Add VladVA adapter") -> Any:
    """Upload ``model``'s adapter, its ``open_clip_config.json`` and a generated model card to ``repo_id``.

    training: the training flags (a dict, or open_clip_train's ``params.txt``); results: a vladva-eval Report,
    its ``results.json`` or ``evaluate()``'s dict; include_base: also upload the base weights (tiny models only).
    Returns what ``HfApi.upload_folder`` returns (the commit).
    """
    from huggingface_hub import HfApi

    from .adapters import save_adapter

    _repo_id(HF_HUB_PREFIX + repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        save_adapter(model, folder, include_base=include_base, model_card=True, repo_id=repo_id, training=training,
                     results=results, license=license)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                   revision=revision, create_pr=create_pr, repo_type="model")
    _logger.info("pushed %s to %s", model.model_name, repo_id)
    return commit

