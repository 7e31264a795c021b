"""Caption instructions (presets) and the chat formats that wrap them for each model family.

An instruction is what the captioner is asked ("Describe the image in detail."); the full prompt is the exact
string the model reads, image placeholder and chat markup included. Both are recorded with every caption, since
users who publish recaptioned data are asked which prompt produced it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CHAT_FORMATS", "PRESETS", "ChatFormat", "register_chat_format", "resolve_instruction"]

#: named instructions; ``--long-prompt``/``--short-prompt`` take one of these names or any other text
PRESETS: dict[str, str] = {
    # ShareGPT-4V's Share-Captioner instruction (its batch script's), for long, detailed captions
    "long": "Analyze the image in a comprehensive and detailed manner.",
    # one sentence, the length of a BLIP-2 / alt-text caption
    "short": "Describe the image in one short sentence.",
    # what the shipped tiny captioner (synth_captioner) was pretrained on
    "detailed": "Describe the image in detail.",
}


def resolve_instruction(value: str) -> str:
    """A preset's text for a preset name, else ``value`` itself (a custom instruction)."""
    if not value or not value.strip():
        raise ValueError("an empty caption prompt: give a preset name (" + ", ".join(PRESETS) + ") or some text")
    return PRESETS.get(value, value)


@dataclass(frozen=True)
class ChatFormat:
    """How a family's instruction-tuned checkpoints expect one image and one instruction.

    ``template`` has ``{prompt}``; the image placeholder is written out (the processor or vLLM expands it)."""

    template: str

    def __call__(self, instruction: str) -> str:
        return self.template.format(prompt=instruction)


CHAT_FORMATS: dict[str, ChatFormat] = {}


def register_chat_format(*model_types: str) -> Callable[[ChatFormat], ChatFormat]:
    def add(fmt: ChatFormat) -> ChatFormat:
        for t in model_types:
            CHAT_FORMATS[t] = fmt
        return fmt
    return add


# llava-hf's chat template renders one user turn as "USER: <image>\n{text} ASSISTANT:"
register_chat_format("llava")(ChatFormat("USER: <image>\n{prompt} ASSISTANT:"))
# Qwen2-VL / Qwen2.5-VL instruct: ChatML with the default system turn and the vision span before the text
register_chat_format("qwen2_vl", "qwen2_5_vl")(ChatFormat(
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n"))
