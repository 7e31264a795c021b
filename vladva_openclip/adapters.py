"""Saving and loading what VladVA trains: LoRA (peft's adapter format), soft prompts and logit_scale.

An adapter directory holds:

- ``adapter_config.json`` + ``adapter_model.safetensors``: the LoRA weights exactly as peft writes them, so
  ``peft.PeftModel.from_pretrained(base_lvlm, dir)`` can use them directly;
- ``vladva_extras.safetensors``: soft prompts and ``logit_scale``;
- ``vladva_adapter.json``: the model name, backbone, prompt settings and a fingerprint of the base model,
  checked on load so that an adapter made for another base fails with a clear error;
- optionally ``base_model.safetensors``: full base weights (only for the tiny models, whose base is small).

Everything is written to a temporary directory first and moved into place, so a crash never leaves a
half-written adapter. Nothing is unpickled: safetensors, or ``torch.load(weights_only=True)`` for open_clip_train
checkpoints.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ._fs import make_temp_dir, save_safetensors

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "vladva_adapter.json"
EXTRAS_FILE = "vladva_extras.safetensors"
LORA_FILE = "adapter_model.safetensors"
BASE_FILE = "base_model.safetensors"


class AdapterError(ValueError):
    """An adapter cannot be used with this model (wrong base, corrupt or incomplete files)."""


# ---- schema of vladva_adapter.json -------------------------------------------------------------------------------
#: field -> (allowed JSON types, required); a nested schema is a dict in place of the types
_PROMPT_SCHEMA = {"text": ((str,), True), "mode": ((str,), True)}
_FINGERPRINT_SCHEMA = {
    "backbone": ((str,), True), "hidden_size": ((int,), True), "num_hidden_layers": ((int,), True),
    "vocab_size": ((int,), True), "base_model": ((str, type(None)), False),
}
_LORA_SCHEMA = {
    "enabled": ((bool,), True), "r": ((int,), True), "alpha": ((int, float), True), "dropout": ((int, float), True),
    "target_modules": ((str, list, type(None)), False),
}
META_SCHEMA: dict[str, Any] = {
    "format_version": ((int,), True), "model_name": ((str,), True), "fingerprint": (_FINGERPRINT_SCHEMA, True),
    "base_only": ((bool,), False), "image_prompt": (_PROMPT_SCHEMA, False), "text_prompt": (_PROMPT_SCHEMA, False),
    "lora": (_LORA_SCHEMA, False), "merged": ((bool,), False),
}
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
               dict: "an object", type(None): "null"}


def _type_name(value: Any) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def validate_json(obj: Any, schema: dict[str, Any], source: str, where: str = "") -> None:
    """Check ``obj`` against ``schema`` (see :data:`META_SCHEMA`); AdapterError naming ``source`` and the field."""
    if not isinstance(obj, dict):
        raise AdapterError(f"{source}: {where or 'the file'} must be a JSON object, got {_type_name(obj)}")
    for name, (kind, required) in schema.items():
        path = f"{where}.{name}" if where else name
        if name not in obj:
            if required:
                raise AdapterError(f"{source}: missing field {path!r}; the file is incomplete: save the adapter "
                                   "again (vladva_openclip.save_adapter)")
            continue
        value = obj[name]
        if isinstance(kind, dict):
            validate_json(value, kind, source, path)
            continue
        # JSON has no int/bool distinction in Python's eyes: true is not an integer here
        ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in kind)
        if not ok:
            wanted = " or ".join(_JSON_NAMES.get(t, t.__name__) for t in kind)
            raise AdapterError(f"{source}: field {path!r} must be {wanted}, got {_type_name(value)} {value!r:.60}")
    if isinstance(obj.get("lora"), dict):
        lora = obj["lora"]
        if lora["r"] < 1:
            raise AdapterError(f"{source}: lora.r must be >= 1, got {lora['r']}")
        targets = lora["target_modules"]
        if isinstance(targets, list) and not all(isinstance(t, str) for t in targets):
            raise AdapterError(f"{source}: lora.target_modules must be a string or a list of strings")


def check_tensor(tensor: torch.Tensor, key: str, source: str, shape: tuple[int, ...] | None = None,
                 like: torch.Tensor | None = None) -> None:
    """A loaded tensor must be floating point (not int, bool or complex), finite, and of ``shape``; ``like`` (the
    model's own tensor) relaxes the dtype rule for integer buffers. AdapterError naming ``key`` otherwise."""
    if like is not None and not like.is_floating_point():
        if tensor.dtype != like.dtype:
            raise AdapterError(f"{source}: {key} is {tensor.dtype}, the model's is {like.dtype}")
    elif not tensor.is_floating_point():
        raise AdapterError(f"{source}: {key} is {tensor.dtype}; weights must be floating point (float32, bfloat16 or "
                           "float16), not integer, quantized or complex: save them again from the model")
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise AdapterError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects {tuple(shape)}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise AdapterError(f"{source}: {key} holds NaN or inf values; the training diverged or the file is damaged "
                           "(use an earlier checkpoint)")


def base_fingerprint(model) -> dict[str, Any]:
    """What must match between the model an adapter was trained on and the one it is loaded into."""
    cfg = model.lvlm.config
    text = cfg.get_text_config()
    return {
        "backbone": model.cfg.backbone,
        "hidden_size": int(text.hidden_size),
        "num_hidden_layers": int(text.num_hidden_layers),
        "vocab_size": int(text.vocab_size),
        "base_model": model.cfg.base_model,
    }


def adapter_meta(model) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "model_name": model.model_name,
        "fingerprint": base_fingerprint(model),
        "image_prompt": {"text": model.cfg.image_prompt.text, "mode": model.cfg.image_prompt.mode},
        "text_prompt": {"text": model.cfg.text_prompt.text, "mode": model.cfg.text_prompt.mode},
        "lora": {"enabled": model.cfg.lora.enabled, "r": model.cfg.lora.r, "alpha": model.cfg.lora.alpha,
                 "dropout": model.cfg.lora.dropout, "target_modules": model.cfg.lora.target_modules},
        "merged": bool(model.merged),
    }


def _extras(model) -> dict[str, torch.Tensor]:
    out = {"logit_scale": model.logit_scale.detach().float().reshape(1)}
    for name in ("image_prompt", "text_prompt"):
        soft = getattr(model, name).soft
        if soft is not None:
            out[f"{name}.soft"] = soft.detach().float()
    return out


def save_adapter(model, path: str | os.PathLike, include_base: bool = False, model_card: bool = False,
                 **card: Any) -> Path:
    """Write ``model``'s trainable state as an adapter directory (atomically).

    Args:
        path: the directory to create or replace.
        include_base: also write the full base weights (meant for tiny models only).
        model_card: also write ``open_clip_config.json`` and a ``README.md`` model card, i.e. the folder
            :func:`vladva_openclip.push_to_hub` uploads (``local-dir:PATH`` then loads it too); ``card`` takes
            :func:`vladva_openclip.hub.model_card`'s keywords (``repo_id``, ``training``, ``results``, ``license``).
    """
    from peft.utils import get_peft_model_state_dict

    if card and not model_card:
        raise TypeError(f"{sorted(card)} describe the model card: pass model_card=True as well")
    if model.merged:
        raise AdapterError("LoRA is merged into the base weights; save the adapter before calling merge_adapters()")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, prefix=f".{path.name}.")  # umask's permissions, not mkdtemp's 0700
    try:
        if model.cfg.lora.enabled and getattr(model, "lora_config", None) is not None:
            lora = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(model.lvlm).items()}
            save_safetensors(lora, str(tmp / LORA_FILE), metadata={"format": "pt"})
            cfg = model.lora_config
            cfg.base_model_name_or_path = model.cfg.base_model
            cfg.save_pretrained(str(tmp))
        save_safetensors({k: v.contiguous() for k, v in _extras(model).items()}, str(tmp / EXTRAS_FILE))
        if include_base:
            base = {k: v.detach().contiguous() for k, v in model.lvlm.state_dict().items() if "lora_" not in k}
            base = {k.replace(".base_layer.", "."): v for k, v in base.items()}
            save_safetensors(_dedupe_shared(base), str(tmp / BASE_FILE))
        (tmp / META_FILE).write_text(json.dumps(adapter_meta(model), indent=2) + "\n")
        if model_card:
            from .hub_files import write_hub_files

            write_hub_files(model, tmp, **card)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _logger.info("saved adapter to %s", path)
    return path


def save_base(model, path: str | os.PathLike) -> Path:
    """Write only the base LVLM weights (tiny models) as a pretrained artifact: ``pretrained=path`` then builds the
    model on these weights with fresh adapters, as the configured defaults or ``create_model`` keywords say."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, prefix=f".{path.name}.")  # umask's permissions, not mkdtemp's 0700
    try:
        base = {k: v.detach().float().contiguous() for k, v in model.lvlm.state_dict().items() if "lora_" not in k}
        base = {k.replace(".base_layer.", "."): v for k, v in base.items()}
        save_safetensors(_dedupe_shared(base), str(tmp / BASE_FILE))
        meta = {"format_version": FORMAT_VERSION, "model_name": model.model_name, "base_only": True,
                "fingerprint": base_fingerprint(model)}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path``, replacing what was there."""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(path)


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied embeddings): keep one copy of each."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen:
            continue
        seen[key] = k
        out[k] = v
    return out


def read_meta(path: str | os.PathLike) -> dict[str, Any] | None:
    """The adapter's ``vladva_adapter.json``, or None for a single-file checkpoint."""
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        return None
    if not meta_file.is_file():
        raise AdapterError(f"{path} is a directory but has no {META_FILE}; it is not a VladVA adapter")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{meta_file} is corrupt: {err}") from err
    validate_json(meta, META_SCHEMA, str(meta_file))
    if not meta.get("base_only"):
        for key in ("image_prompt", "text_prompt"):
            if key not in meta:
                raise AdapterError(f"{meta_file}: missing field {key!r}; the file is incomplete: save the adapter "
                                   "again (vladva_openclip.save_adapter)")
    elif any((path / f).exists() for f in (LORA_FILE, EXTRAS_FILE)):
        present = [f for f in (LORA_FILE, EXTRAS_FILE) if (path / f).exists()]
        raise AdapterError(f"{meta_file} says base_only (base weights, fresh adapters) but {path} holds adapter "
                           f"weights ({', '.join(present)}), which would be ignored: remove \"base_only\" from the "
                           "file, or the adapter files")
    return meta


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterError(f"cannot read {file}: {err} (the file is corrupt or not safetensors)") from err


def load_base_weights(model_lvlm, path: Path) -> bool:
    """Load ``base_model.safetensors`` from an adapter dir into the (not yet LoRA-wrapped) LVLM, if present."""
    file = path / BASE_FILE if path.is_dir() else None
    if file is None or not file.is_file():
        return False
    state = _load_safetensors(file)
    own = model_lvlm.state_dict()
    for key, tensor in state.items():
        if key in own:
            check_tensor(tensor, key, str(file), tuple(own[key].shape), like=own[key])
    try:
        missing, unexpected = model_lvlm.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise AdapterError(f"{file} was made for another base model (shapes differ): {str(err)[:300]}") from err
    tied = set(getattr(model_lvlm, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise AdapterError(f"{file} does not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return True


def config_fingerprint(cfg) -> dict[str, Any]:
    """:func:`base_fingerprint` from a :class:`~.config.VladVAConfig` alone (no weights loaded): what an adapter
    is checked against before a large base model is read or downloaded."""
    from .backbones import get_backbone

    text = get_backbone(cfg.backbone).build_config(cfg.hf_config).get_text_config()
    return {"backbone": cfg.backbone, "hidden_size": int(text.hidden_size),
            "num_hidden_layers": int(text.num_hidden_layers), "vocab_size": int(text.vocab_size),
            "base_model": cfg.base_model}


def check_compatible(model, meta: dict[str, Any], source: str, mine: dict[str, Any] | None = None) -> None:
    """AdapterError when the adapter's base fingerprint differs from ``model``'s (or from ``mine``, computed from
    the config before any weights are loaded: then only what the config fixes for sure, the backbone and the
    transformer's width and depth, is compared)."""
    if mine is None:
        mine = base_fingerprint(model)
    else:
        mine = {k: v for k, v in mine.items() if k in ("backbone", "hidden_size", "num_hidden_layers")}
    theirs = meta.get("fingerprint", {})
    diffs = {k: (theirs.get(k), v) for k, v in mine.items() if k != "base_model" and theirs.get(k) != v}
    if diffs:
        details = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diffs.items())
        raise AdapterError(
            f"adapter {source} was made for another base model ({meta.get('model_name')!r}); {details}. "
            f"Create the model it was trained for: open_clip.create_model({meta.get('model_name')!r}, pretrained=...)"
        )
    if "base_model" in mine and theirs.get("base_model") != mine.get("base_model"):
        _logger.warning("adapter %s was trained on base %r; loading into base %r", source,
                        theirs.get("base_model"), mine.get("base_model"))


def load_adapter(model, path: str | os.PathLike) -> None:
    """Load an adapter directory, a ``.safetensors`` trainable state dict, or an open_clip_train ``.pt``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"adapter {path} does not exist")
    if path.is_dir():
        meta = read_meta(path)
        check_compatible(model, meta, str(path))
        if meta.get("base_only"):
            return  # base weights were loaded when the LVLM was built; the adapters stay fresh
        _load_adapter_dir(model, path)
    elif path.suffix == ".safetensors":
        _load_trainable(model, _load_safetensors(path), str(path))
    else:
        try:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
            raise AdapterError(f"cannot read checkpoint {path}: {err}") from err
        state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise AdapterError(f"{path} holds no state_dict")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        _load_trainable(model, state, str(path))
    _logger.info("loaded adapter %s", path)


def _load_adapter_dir(model, path: Path) -> None:
    from peft.utils import set_peft_model_state_dict

    lora_file = path / LORA_FILE
    if model.cfg.lora.enabled:
        if not lora_file.is_file():
            raise AdapterError(f"{path} has no {LORA_FILE} but the model expects LoRA weights")
        lora = _load_safetensors(lora_file)
        _check_lora(model, lora, path)
        try:
            result = set_peft_model_state_dict(model.lvlm, lora)
        except RuntimeError as err:  # a shape torch still refuses: one line, with the file
            raise AdapterError(f"{lora_file} does not fit this model: {' '.join(str(err).split())[:300]}") from None
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise AdapterError(f"{lora_file} has LoRA weights this model lacks: {unexpected[:5]}")
        expected = {k for k in model.lvlm.state_dict() if "lora_" in k}
        loaded = len(lora)
        if loaded != len(expected):
            raise AdapterError(f"{lora_file} holds {loaded} LoRA tensors, the model has {len(expected)}")
    extras_file = path / EXTRAS_FILE
    if not extras_file.is_file():
        raise AdapterError(f"{path} is missing {EXTRAS_FILE}")
    _load_extras(model, _load_safetensors(extras_file), str(extras_file))


def _check_lora(model, lora: dict[str, torch.Tensor], path: Path) -> None:
    """Every LoRA tensor of the file against the model's (peft's file keys lack the adapter name "default")."""
    source = str(path / LORA_FILE)
    own = {k.replace(".default.", "."): v for k, v in model.lvlm.state_dict().items() if "lora_" in k}
    for key, tensor in lora.items():
        if key in own and tuple(tensor.shape) != tuple(own[key].shape):
            meta_r = model.cfg.lora.r
            raise AdapterError(f"{source}: {key} has shape {tuple(tensor.shape)}, the model expects "
                               f"{tuple(own[key].shape)} (lora.r={meta_r} in {path / META_FILE}); the adapter's "
                               "files disagree: save it again")
        check_tensor(tensor, key, source, tuple(own[key].shape) if key in own else None)


def _load_extras(model, extras: dict[str, torch.Tensor], source: str) -> None:
    with torch.no_grad():
        if "logit_scale" not in extras:
            raise AdapterError(f"{source} has no logit_scale")
        scale = extras["logit_scale"]
        if scale.numel() != 1:
            raise AdapterError(f"{source}: logit_scale has shape {tuple(scale.shape)}; it must be one number "
                               "(shape () or (1,))")
        check_tensor(scale, "logit_scale", source)
        for name in ("image_prompt", "text_prompt"):
            key = f"{name}.soft"
            if key in extras:
                check_tensor(extras[key], key, source)
        model.logit_scale.copy_(scale.reshape(()))
        for name in ("image_prompt", "text_prompt"):
            soft = getattr(model, name).soft
            key = f"{name}.soft"
            if (soft is None) != (key not in extras):
                raise AdapterError(f"{source}: {name} soft prompt present in one of adapter/model but not the other; "
                                   f"create the model with the adapter's prompt modes")
            if soft is not None:
                if tuple(extras[key].shape) != tuple(soft.shape):
                    raise AdapterError(f"{source}: {key} has shape {tuple(extras[key].shape)}, model expects "
                                       f"{tuple(soft.shape)}")
                soft.copy_(extras[key])


def _load_trainable(model, state: dict[str, torch.Tensor], source: str) -> None:
    """Load what trains (LoRA, soft prompts, logit_scale) from a state dict: the trainer's trainable-only dict, or a
    stock open_clip_train checkpoint's full one. The frozen rest of a full dict is checked against this model's
    base, never loaded (see :func:`_check_frozen`)."""
    mine = model.trainable_state_dict()
    if model.merged:
        raise AdapterError("cannot load an adapter into a model whose LoRA is already merged")
    missing = sorted(set(mine) - set(state))
    extra = set(state) - set(mine)
    whole = model.state_dict() if extra else {}
    unexpected = sorted(k for k in extra if k not in whole)
    if missing or unexpected:
        raise AdapterError(f"{source} does not match this model's trainable parameters: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]} (was it trained for another model or prompt setting?)")
    for k, p in mine.items():
        if not isinstance(state[k], torch.Tensor):
            raise AdapterError(f"{source}: {k} is a {type(state[k]).__name__}, not a tensor")
        check_tensor(state[k], k, source, tuple(p.shape))
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(state[k])
    if extra:
        _check_frozen(source, {k: state[k] for k in extra}, whole)


def _check_frozen(source: str, theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> None:
    """A full checkpoint's frozen tensors against this model's base. They are compared in the lower of the two
    precisions (a run that trained on a bf16 base and a model built in fp32 hold the same base). A difference is
    reported, not loaded: VladVA trains only its adapters, so a frozen tensor that differs means another base (or
    a run that changed it), and the model keeps its own base weights."""
    differ: list[tuple[str, float]] = []
    for key in sorted(theirs):
        t, o = theirs[key], ours[key]
        if tuple(t.shape) != tuple(o.shape):
            raise AdapterError(f"{source}: frozen tensor {key} has shape {tuple(t.shape)}, this model's base has "
                               f"{tuple(o.shape)}; the checkpoint was made for another base model")
        if o.is_meta or not (t.is_floating_point() and o.is_floating_point()):
            if not o.is_meta and not torch.equal(t.to(o.device), o):
                differ.append((key, float("nan")))
            continue
        low = t.dtype if t.element_size() <= o.element_size() else o.dtype
        a, b = t.to(device=o.device, dtype=low), o.detach().to(low)
        if not torch.equal(a, b):
            differ.append((key, float((a.float() - b.float()).abs().max())))
    if differ:
        shown = ", ".join(f"{k} (max |diff| {d:.3g})" for k, d in differ[:5])
        _logger.warning(
            "%s: %d of its %d frozen tensors differ from this model's base: %s%s. Loaded only the trainable part "
            "(LoRA, soft prompts, logit_scale) and kept the base's own values; if the run trained on another base, "
            "build the model from it (base_model=DIR or VLADVA_BASE_DIR).", source, len(differ), len(theirs), shown,
            " ..." if len(differ) > 5 else "")
    else:
        _logger.info("%s: full checkpoint; its %d frozen tensors equal this model's base", source, len(theirs))
