"""Per-modality templates and prompts (handcrafted, soft, or both).

A modality's sequence is ``prefix | body | suffix`` where the template ``"pre{body}mid{prompt}post"`` gives
``prefix = [BOS] pre`` and ``suffix = mid + prompt + post``. Soft prompts are learnable vectors initialised
from the handcrafted prompt's token embeddings; each modality has its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import PromptConfig


@dataclass(frozen=True)
class TemplateParts:
    pre: str
    mid: str
    post: str

    @classmethod
    def parse(cls, template: str) -> "TemplateParts":
        if template.count("{body}") != 1 or template.count("{prompt}") != 1:
            raise ValueError(f"a template needs exactly one {{body}} and one {{prompt}}: {template!r}")
        pre, rest = template.split("{body}")
        if "{prompt}" not in rest:
            raise ValueError(f"{{prompt}} must follow {{body}} (the summary token is last): {template!r}")
        mid, post = rest.split("{prompt}")
        return cls(pre, mid, post)


class ModalityPrompt(nn.Module):
    """Fixed prefix/suffix token ids of one modality plus its optional soft prompt.

    Args:
        cfg: the prompt's text and mode.
        prefix_ids: ``[BOS] + pre`` token ids.
        mid_ids, prompt_ids, post_ids: token ids of the template pieces after the body.
        embedding: the LLM input embedding, used to initialise the soft prompt.
    """

    def __init__(self, cfg: PromptConfig, prefix_ids: list[int], mid_ids: list[int], prompt_ids: list[int],
                 post_ids: list[int], embedding: nn.Embedding):
        super().__init__()
        self.cfg = cfg
        self.num_soft = len(prompt_ids) if cfg.has_soft else 0
        hand = prompt_ids if cfg.has_handcrafted_tokens else []
        # Soft slots carry the handcrafted ids so that id-based bookkeeping (M-RoPE types) sees plain text.
        suffix_ids = mid_ids + (prompt_ids if cfg.has_soft else []) + hand + post_ids
        # Plain copies: the inspection API must answer on a meta-device build, whose buffers hold no data.
        self.prefix_id_list, self.suffix_id_list = list(prefix_ids), list(suffix_ids)
        self.register_buffer("prefix_ids", torch.tensor(prefix_ids, dtype=torch.long), persistent=False)
        self.register_buffer("suffix_ids", torch.tensor(suffix_ids, dtype=torch.long), persistent=False)
        self.mid_len = len(mid_ids)
        if cfg.has_soft:
            if not prompt_ids:
                raise ValueError("a soft prompt is initialised from the handcrafted prompt, which is empty")
            with torch.no_grad():
                init = embedding.weight[torch.tensor(prompt_ids, device=embedding.weight.device)]
            self.soft = nn.Parameter(init.detach().float().clone())
        else:
            self.register_parameter("soft", None)

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_ids.numel())

    @property
    def suffix_len(self) -> int:
        return int(self.suffix_ids.numel())

    def prefix_embeds(self, embedding: nn.Embedding) -> torch.Tensor:
        """``[1, P, H]``."""
        return embedding(self.prefix_ids).unsqueeze(0)

    def suffix_embeds(self, embedding: nn.Embedding) -> torch.Tensor:
        """``[1, S, H]`` with the soft vectors in their slots (cast to the embedding dtype)."""
        fixed = embedding(self.suffix_ids)
        if self.soft is None:
            return fixed.unsqueeze(0)
        a, b = self.mid_len, self.mid_len + self.num_soft
        return torch.cat([fixed[:a], self.soft.to(fixed.dtype), fixed[b:]], dim=0).unsqueeze(0)
