"""The optional CLIP-score filter: cosine similarity x 100 between an image and its caption under any open_clip
model (DataComp's filter). A long caption is split into sentences and the scores averaged, since CLIP's text tower
reads only 77 tokens."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .quality import sentences

__all__ = ["ClipScorer"]


class ClipScorer:
    def __init__(self, model: torch.nn.Module, preprocess: Callable, tokenizer: Callable, device: torch.device):
        self.model, self.preprocess, self.tokenizer, self.device = model.eval(), preprocess, tokenizer, device

    @classmethod
    def load(cls, name: str, pretrained: str | None, device: torch.device) -> ClipScorer:
        from ..eval.api import ModelSpec, load_model

        model, preprocess, tokenizer = load_model(ModelSpec(name, pretrained), device=device)
        return cls(model, preprocess, tokenizer, device)

    @torch.no_grad()
    def score(self, pixels: Sequence[torch.Tensor], texts: Sequence[str | None], split: bool) -> list[float | None]:
        """``pixels``: ``[3, H, W]`` per image (this scorer's preprocess); ``texts``: one caption per image (None:
        no score). ``split``: average over the caption's sentences."""
        todo = [i for i, t in enumerate(texts) if t]
        if not todo:
            return [None] * len(texts)
        img = F.normalize(self.model.encode_image(torch.stack([pixels[i] for i in todo]).to(self.device)).float(),
                          dim=-1)
        pieces, owner = [], []
        for j, i in enumerate(todo):
            parts = sentences(texts[i]) if split else [texts[i]]
            pieces += parts or [texts[i]]
            owner += [j] * len(parts or [texts[i]])
        txt = F.normalize(self.model.encode_text(self.tokenizer(pieces).to(self.device)).float(), dim=-1)
        sims = (txt * img[torch.tensor(owner)]).sum(-1) * 100
        out: list[float | None] = [None] * len(texts)
        owner_t = torch.tensor(owner)
        for j, i in enumerate(todo):
            out[i] = round(float(sims[owner_t == j].mean()), 4)
        return out
