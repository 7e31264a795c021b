"""Where a base LVLM and its tokenizer come from, checked before anything is loaded.

A source is a local directory (as written by ``save_pretrained`` or downloaded from the hub) or a Hugging Face
id. Each way it can be unusable gives one error that names the path or id and says what to provide:

- a local directory that does not exist, has no ``config.json``, has no weights, or whose index names shards
  that are missing: :class:`WeightsNotFoundError`;
- a ``config.json`` or tokenizer that cannot be parsed, or a checkpoint of another LVLM family:
  :class:`BaseModelError`;
- a hub id that cannot be fetched: :class:`WeightsNotFoundError`, with the hub's own reason kept in the text.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Protocol


class Backbone(Protocol):
    """What the checks here read of a backbone (:class:`.base.Backbone` satisfies it; base.py imports this module)."""

    name: str
    model_types: Sequence[str]
    model_class_name: str

CONFIG_FILE = "config.json"
# Weight files transformers' from_pretrained reads, in its order of preference (safetensors first).
WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin")
# One of these makes a directory a tokenizer directory (fast tokenizer, sentencepiece model, byte-level BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class WeightsNotFoundError(FileNotFoundError):
    """Base weights or tokenizer files are not where the source says: a missing or incomplete local directory,
    or a hub id that is neither in the local cache nor downloadable."""


class BaseModelError(ValueError):
    """A base model or tokenizer source exists but cannot be used: corrupt files, or another LVLM family."""


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_local(source: str) -> bool:
    """True when ``source`` means a directory on this machine rather than a hub id.

    An existing directory is local (as for transformers); so is anything that cannot be a hub id
    (``org/name``): an absolute path, one starting with ``.`` or ``~``, or one with more than one ``/``.
    """
    if os.path.isdir(source):
        return True
    return (os.path.isabs(source) or source.startswith((".", "~")) or source.count("/") > 1
            or os.sep != "/" and os.sep in source)


def root_cause(err: BaseException) -> str:
    """``"Type: message"`` of the innermost exception in ``err``'s chain: the real reason, not a wrapper's."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        nxt = err.__cause__ or err.__context__
        if nxt is None:
            break
        err = nxt
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:500]}"


def is_cache_miss(err: BaseException) -> bool:
    """The files are not in the local Hugging Face cache and the hub could not be asked (offline/unreachable)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, LocalEntryNotFoundError):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _ways_to_provide(source: str) -> str:
    return (f"Provide them in one of these ways: (1) on a machine with network, run `huggingface-cli download "
            f"{source}` and copy the cache (HF_HOME) here; (2) pass base_model='/path/to/local/dir' (a directory "
            f"saved with save_pretrained, holding the weights and the tokenizer) to create_model; (3) set "
            f"VLADVA_BASE_DIR=/dir holding a sub-directory named {source.split('/')[-1]!r}. To only inspect the "
            f"architecture, use device='meta' or load_weights=False.")


def missing_message(what: str, source: str, cause: BaseException | None = None) -> str:
    """The text of a hub source that cannot be loaded: why (the hub's own reason) and how to provide it."""
    reason = f" Cause: {root_cause(cause).rstrip('.')}." if cause is not None else ""
    if cause is None or is_cache_miss(cause):
        state = "offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE set)" if hub_offline() else "unreachable"
        head = f"{what} {source!r} are not in the local Hugging Face cache and the hub is {state}."
    else:
        head = f"{what} {source!r} could not be loaded from the Hugging Face hub or its cache."
    return f"{head}{reason} {_ways_to_provide(source)}"


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BaseModelError(f"{what} {path} cannot be read ({root_cause(err)}); replace it with the file from the "
                             f"original checkpoint") from err
    if not isinstance(data, dict):
        raise BaseModelError(f"{what} {path} holds a JSON {type(data).__name__}, not an object; replace it with the "
                             f"file from the original checkpoint")
    return data


def check_family(model_type: str | None, backbone: Backbone, where: str, model_name: str | None = None) -> None:
    """Raise :class:`BaseModelError` when a checkpoint's ``model_type`` is not one ``backbone`` can load."""
    if model_type in backbone.model_types:
        return
    if not model_type:
        raise BaseModelError(f"{where}: config.json names no model_type, so it is not a transformers checkpoint of "
                             f"the {backbone.name!r} family; provide a {backbone.model_types[0]} checkpoint "
                             f"(config.json as written by save_pretrained)")
    from ..registry import get_vladva_config, list_vladva_models

    fitting = []
    for name in list_vladva_models():
        other = get_vladva_config(name)["vladva_cfg"]
        if other.get("hf_config", {}).get("model_type") == model_type:
            fitting.append(name)
    hint = (f"use a VladVA model of that family ({', '.join(fitting)})" if fitting
            else "no registered VladVA model is built on that family")
    wanted = f"{model_name} is" if model_name else "this model is"
    raise BaseModelError(
        f"{where} holds a {model_type!r} checkpoint, but {wanted} built on the {backbone.name!r} family "
        f"({backbone.model_class_name}, model_type {' or '.join(map(repr, backbone.model_types))}): {hint}, or pass "
        f"base_model=<a {backbone.model_types[0]} checkpoint directory or hub id>")


def check_base_dir(path: str | os.PathLike, backbone: Backbone, model_name: str | None = None,
                   need_weights: bool = True) -> dict[str, Any]:
    """Validate a local base-model directory; returns its ``config.json`` as a dict.

    Checks, in order: the directory exists, ``config.json`` exists and parses, its ``model_type`` is of
    ``backbone``'s family, and (``need_weights``) a weight file exists, with every shard its index names.
    """
    root = Path(os.path.expanduser(str(path)))
    provide = ("a directory written by save_pretrained (or `huggingface-cli download <id> --local-dir DIR`), "
               "holding config.json, the weights (model.safetensors, or model-*.safetensors shards plus "
               "model.safetensors.index.json) and the tokenizer files")
    if not root.is_dir():
        raise WeightsNotFoundError(f"base model directory {root} does not exist; pass base_model= {provide}")
    config_file = root / CONFIG_FILE
    if not config_file.is_file():
        raise WeightsNotFoundError(f"base model directory {root} has no {CONFIG_FILE}, so it is not a Hugging Face "
                                   f"checkpoint; pass base_model= {provide}")
    config = read_json(config_file, "base model config")
    check_family(config.get("model_type"), backbone, f"base model directory {root}", model_name)
    if need_weights:
        check_weight_files(root, provide)
    return config


def check_weight_files(root: Path, provide: str) -> None:
    present = [name for name in WEIGHT_FILES if (root / name).is_file()]
    if not present:
        listing = sorted(p.name for p in root.iterdir())[:12]
        raise WeightsNotFoundError(
            f"base model directory {root} has a config.json but no weights (none of {', '.join(WEIGHT_FILES)}; "
            f"it holds {listing}); pass base_model= {provide}")
    index_name = present[0]
    if not index_name.endswith(".index.json"):
        return
    index = read_json(root / index_name, "weight index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BaseModelError(f"weight index {root / index_name} has no weight_map; replace it with the file from the "
                             f"original checkpoint")
    missing = sorted({str(f) for f in weight_map.values() if not (root / str(f)).is_file()})
    if missing:
        raise WeightsNotFoundError(f"base model directory {root} is incomplete: {index_name} names shard(s) "
                                   f"{missing[:5]} that are not there; copy every shard of the checkpoint")


def check_tokenizer_dir(path: str | os.PathLike) -> Path:
    """Validate a local tokenizer directory (it exists and holds tokenizer files); returns it."""
    root = Path(os.path.expanduser(str(path)))
    provide = ("pass tokenizer= (or base_model=) a directory holding the base model's tokenizer files: "
               "tokenizer.json or tokenizer.model (sentencepiece) or vocab.json + merges.txt, with "
               "tokenizer_config.json")
    if not root.is_dir():
        raise WeightsNotFoundError(f"tokenizer directory {root} does not exist; {provide}")
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        listing = sorted(p.name for p in root.iterdir())[:12]
        raise WeightsNotFoundError(f"tokenizer directory {root} holds no tokenizer files (none of "
                                   f"{', '.join(TOKENIZER_FILES)}; it holds {listing}); {provide}")
    return root
