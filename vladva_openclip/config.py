"""Configuration dataclasses for VladVA models.

A registered model is one JSON file in ``model_configs/``. Its ``vladva_cfg`` block parses into
:class:`VladVAConfig`; the other top-level keys (``embed_dim``, ``vision_cfg``, ``text_cfg``) exist so that
open_clip's own config scan accepts the file and ``open_clip.list_models()`` shows the name.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from typing import Any

_logger = logging.getLogger(__name__)

PROMPT_MODES = ("handcrafted", "soft", "both")
# open_clip's eval resize modes: "shortest" (resize the short side, centre crop), "longest" (resize the long side,
# pad; keeps the whole image at its aspect ratio), "squash" (resize both sides; keeps the whole image, not the ratio).
# "anyres" (LLaVA-NeXT): the processor's base view and grid tiles packed with the image size (see anyres.py).
RESIZE_MODES = ("shortest", "longest", "squash", "anyres")


def _from_dict(cls, d: dict[str, Any], where: str):
    """Build dataclass ``cls`` from ``d``, warning about (and dropping) keys this version does not know."""
    known = {f.name for f in fields(cls)}
    extra = sorted(set(d) - known)
    if extra:
        _logger.warning("%s: ignoring unknown config keys %s", where, extra)
    return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class PromptConfig:
    """The prompt that follows the image (or caption) and whose last token becomes the embedding.

    Attributes:
        text: the handcrafted prompt, e.g. ``"Summary above image in one word:"``.
        mode: ``"handcrafted"`` (fixed tokens), ``"soft"`` (learnable vectors that replace the handcrafted tokens,
            initialised from their embeddings) or ``"both"`` (learnable vectors initialised from the handcrafted
            embeddings, followed by the fixed handcrafted tokens).
    """

    text: str
    mode: str = "handcrafted"

    def __post_init__(self):
        if self.mode not in PROMPT_MODES:
            raise ValueError(f"prompt mode must be one of {PROMPT_MODES}, got {self.mode!r}")

    @property
    def has_soft(self) -> bool:
        return self.mode in ("soft", "both")

    @property
    def has_handcrafted_tokens(self) -> bool:
        return self.mode in ("handcrafted", "both")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the LLM's linear layers (paper: r=16, alpha=16). ``enabled=False`` trains prompts only."""

    enabled: bool = True
    r: int = 16
    alpha: int = 16
    dropout: float = 0.0
    # peft matches a string target with re.fullmatch on the full module name; this keeps LoRA out of the
    # vision tower, whose CLIP layers also have q_proj/v_proj names.
    target_modules: str = (
        r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    )


@dataclass(frozen=True)
class TemplateConfig:
    """Chat template of one modality. ``{body}`` is the image tokens or the caption; ``{prompt}`` the prompt.

    ``{prompt}`` must come after ``{body}``: the summary token is the last token of the sequence.
    """

    image: str
    text: str
    add_bos: bool = True
    # What separates the image template from the assistant's answer (the long caption) in the whole string:
    # LLaVA-1.5's conversation format writes "ASSISTANT: answer"; Qwen2-VL's template already ends in a newline.
    answer_sep: str = ""


@dataclass(frozen=True)
class VladVAConfig:
    """Everything needed to build a VladVA model around a base LVLM."""

    backbone: str  # key into backbones.BACKBONES
    hf_config: dict[str, Any]  # the base LVLM's transformers config, embedded so it builds offline
    image_size: int
    template: TemplateConfig
    image_prompt: PromptConfig
    text_prompt: PromptConfig
    lora: LoraSettings = field(default_factory=LoraSettings)
    base_model: str | None = None  # Hugging Face id or local dir of the base weights; None = random init (tiny)
    tokenizer: str | None = None  # Hugging Face id or local dir; "asset:<name>" = a tokenizer shipped in the package
    context_length: int = 77  # caption tokens kept by the tokenizer (the prompt is added on top)
    # Training defaults (vladva-train --max-short-len/--max-long-len): the paper's short captions have < 30 tokens,
    # its long ones up to 500; the rows also hold the template newline (short) or the EOS (long).
    max_short_len: int = 32
    max_long_len: int = 128
    init_logit_scale: float = 2.995732273553991  # ln(1/0.05), E5-V's temperature
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    resize_mode: str = "shortest"  # how a non-square image becomes the square input (RESIZE_MODES); see transforms

    def __post_init__(self):
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "vladva_cfg") -> VladVAConfig:
        d = dict(d)
        d["template"] = _from_dict(TemplateConfig, d["template"], f"{where}.template")
        d["image_prompt"] = _from_dict(PromptConfig, d["image_prompt"], f"{where}.image_prompt")
        d["text_prompt"] = _from_dict(PromptConfig, d["text_prompt"], f"{where}.text_prompt")
        d["lora"] = _from_dict(LoraSettings, d.get("lora", {}), f"{where}.lora")
        for key in ("image_mean", "image_std"):
            if key in d:
                d[key] = tuple(d[key])
        return _from_dict(cls, d, where)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> VladVAConfig:
        """A copy with top-level fields, or nested ones written ``"lora.r"``, changed."""
        d = self.to_dict()
        for key, value in changes.items():
            head, _, tail = key.partition(".")
            if tail:
                d[head] = {**d[head], tail: value}
            else:
                d[head] = value
        return VladVAConfig.from_dict(d)
