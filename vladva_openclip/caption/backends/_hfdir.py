"""What the ``hf`` and ``vllm`` backends share about a transformers checkpoint directory: its identity and the
prompt its instruction-tuned model expects."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..prompts import CHAT_FORMATS

__all__ = ["checkpoint_fingerprint", "model_type", "prompt_builder"]


def checkpoint_fingerprint(path: str) -> str:
    """Hash of config.json and the weight files' names and sizes (cheap for 7B checkpoints; a different
    checkpoint in the same folder changes it)."""
    digest = hashlib.blake2b(digest_size=16)
    root = Path(path)
    if not root.is_dir():
        return hashlib.blake2b(str(path).encode(), digest_size=16).hexdigest()  # a hub id: the name is all we know
    for f in sorted(root.iterdir()):
        if f.name == "config.json" or f.name.endswith(".index.json"):
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin"):
            digest.update(f"{f.name}\0{f.stat().st_size}\n".encode())
    return digest.hexdigest()


def model_type(path: str) -> str | None:
    cfg = Path(path) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("model_type")
    return None


def prompt_builder(processor: Any, kind: str | None):
    """instruction -> full prompt: the processor's chat template when the checkpoint ships one, else the
    registered format of its model type."""
    template = getattr(processor, "chat_template", None) if processor is not None else None
    if template:
        def build(instruction: str) -> str:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return build
    if kind in CHAT_FORMATS:
        return CHAT_FORMATS[kind]
    raise ValueError(f"no chat template in the checkpoint and no registered prompt format for model type {kind!r} "
                     f"(known: {sorted(CHAT_FORMATS)}); add a chat_template.json to the checkpoint directory")


def resolve_path(path: str) -> str:
    return os.path.abspath(path) if os.path.isdir(path) else path
