"""VladVA configurations of the demo and of the paper's Table 4 ablation, by name.

A variant is the model's structure (LoRA on or off, each prompt handcrafted or soft) plus the AR-loss weight. The
same structural keywords build the model for training (as trainer flags) and for loading its checkpoint (as
``create_model`` keywords), so the two can never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Variant:
    """One configuration.

    Attributes:
        label: how tables name it (the paper's Table 4 wording).
        use_lora: LoRA on the LLM's linear layers.
        prompt_mode: ``handcrafted`` or ``soft`` (learnable, initialised from the handcrafted prompt), both towers.
        ar_weight: weight of the next-token loss on the long captions (0: contrastive only).
        trained: False for the zero-shot row (the captioner with its handcrafted prompts, no training).
        text_pairs: E5-V-style text-only training: the contrastive loss pairs a caption with its paraphrase,
            both through the text tower (``vladva-train --text-pairs``); no image is seen while training.
    """

    label: str
    use_lora: bool = True
    prompt_mode: str = "soft"
    ar_weight: float = 1.0
    trained: bool = True
    text_pairs: bool = False

    def model_kwargs(self) -> dict[str, Any]:
        """``create_model`` keywords that fix the structure (also what loading a checkpoint needs)."""
        return {"use_lora": self.use_lora, "image_prompt_mode": self.prompt_mode,
                "text_prompt_mode": self.prompt_mode}

    def train_flags(self) -> list[str]:
        """The matching ``vladva-train`` flags."""
        flags = ["--image-prompt-mode", self.prompt_mode, "--text-prompt-mode", self.prompt_mode,
                 "--ar-weight", str(self.ar_weight)]
        if not self.use_lora:
            flags.append("--no-lora")
        if self.text_pairs:
            flags.append("--text-pairs")
        return flags


#: The paper's Table 4 rows, in order, and the E5-V-style baseline (key -> variant).
VARIANTS: dict[str, Variant] = {
    "zero-shot": Variant("zero-shot (handcrafted prompt)", use_lora=False, prompt_mode="handcrafted",
                         ar_weight=0.0, trained=False),
    "soft-prompt": Variant("+ soft prompt", use_lora=False, prompt_mode="soft", ar_weight=0.0),
    "lora": Variant("+ LoRA", use_lora=True, prompt_mode="handcrafted", ar_weight=0.0),
    "lora-soft-prompt": Variant("+ LoRA + soft prompt", use_lora=True, prompt_mode="soft", ar_weight=0.0),
    "vladva": Variant("+ LoRA + soft prompt + AR loss (VladVA)", use_lora=True, prompt_mode="soft", ar_weight=1.0),
    # The paper's LVLM baseline (E5-V): LoRA on the same captioner with its handcrafted prompts, trained on text pairs
    # only (E5-V uses NLI sentence pairs; here the world's SugarCrepe++-style paraphrases are the positives).
    "e5v": Variant("E5-V-style: LoRA, text-only contrastive on caption/paraphrase pairs", use_lora=True,
                   prompt_mode="handcrafted", ar_weight=0.0, text_pairs=True),
}
#: the rows of the paper's Table 4 (the ablation adds ``e5v`` after them)
TABLE4: tuple[str, ...] = ("zero-shot", "soft-prompt", "lora", "lora-soft-prompt", "vladva")


def get_variant(key: str) -> Variant:
    try:
        return VARIANTS[key]
    except KeyError:
        raise ValueError(f"unknown variant {key!r}; known: {', '.join(VARIANTS)}") from None
