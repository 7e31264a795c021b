"""VladVA's training loss: contrastive InfoNCE on short captions + next-token loss on long captions.

``VladVALoss`` keeps open_clip ``ClipLoss``'s constructor and call signature, so open_clip_train's
``train_one_epoch`` uses it unchanged: ``losses = loss(**model_out, output_dict=True)``; ``sum(losses.values())``.
The model returns per-sample ``ar_nll_sum`` and ``ar_num_tokens`` (``[B]``); dividing the summed NLL by the summed
token count of the whole (accumulated, and across ranks, gathered) batch keeps the AR loss exact under
open_clip's two-pass accumulation and DDP.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .kernels import FusedClipLoss


class VladVALoss(nn.Module):
    """``contrastive_weight * InfoNCE(image, short caption) + ar_weight * NLL(long caption | image, prompt)``.

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: as open_clip's ClipLoss.
        contrastive_weight: weight of the contrastive term. The term is ClipLoss's MEAN of the two directions;
            the paper's formula sums them, so ``contrastive_weight=2`` reproduces the paper's scale.
        ar_weight: weight of the next-token term (mean NLL per token; paper: 1, the losses are summed).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, contrastive_weight: float = 1.0,
                 ar_weight: float = 1.0):
        super().__init__()
        self.contrastive = FusedClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad,
                                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                                         use_horovod=use_horovod)
        self.world_size = world_size
        self.contrastive_weight = contrastive_weight
        self.ar_weight = ar_weight

    def ar_loss(self, nll_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """Mean NLL per token over the global batch. ``nll_sum``, ``num_tokens``: ``[B]``."""
        total = num_tokens.detach().sum().float()
        scale = 1.0
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            # DDP averages gradients over ranks; multiplying back makes the result sum(nll) / sum(tokens) globally.
            scale = float(self.world_size)
        return nll_sum.sum() * scale / total.clamp(min=1.0)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, ar_nll_sum: torch.Tensor | None = None,
                ar_num_tokens: torch.Tensor | None = None, output_dict: bool = False, **unused):
        losses = {}
        contrastive = self.contrastive(image_features, text_features, logit_scale, logit_bias)
        losses["contrastive_loss"] = self.contrastive_weight * contrastive
        if ar_nll_sum is not None and self.ar_weight:
            losses["ar_loss"] = self.ar_weight * self.ar_loss(ar_nll_sum, ar_num_tokens)
        if output_dict:
            return losses
        return sum(losses.values())
