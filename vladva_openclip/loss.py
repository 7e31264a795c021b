"""VladVA's training loss: contrastive InfoNCE on short captions + next-token loss on long captions.

``VladVALoss`` keeps open_clip ``ClipLoss``'s constructor and call signature, so open_clip_train's
``train_one_epoch`` uses it unchanged: ``losses = loss(**model_out, output_dict=True)``; ``sum(losses.values())``.
The model returns per-sample ``ar_nll_sum`` and ``ar_num_tokens`` (``[B]``); dividing the summed NLL by the summed
token count of the whole (accumulated, and across ranks, gathered) batch keeps the AR loss exact under
open_clip's two-pass accumulation and DDP.

Scaling under DDP (which AVERAGES gradients over the ``W`` ranks). Let ``L`` be the loss of the global batch and
``g_r`` the part of ``dL/dθ`` that flows through rank r's own rows, so the true gradient is ``sum_r g_r``. Every
term must therefore hand DDP ``W * g_r`` on rank r:

* contrastive, ``--gather-with-grad`` (with or without ``--local-loss``): the gathered features' backward sums
  every rank's gradient into the owner's rows, which is already ``W * g_r``;
* contrastive without ``--gather-with-grad``: the other ranks' features are constants, so rank r gets only
  ``g_r``; the features' gradient is multiplied by ``W`` here (``logit_scale`` is not: every rank computes the
  whole loss, so its gradient is already complete on each rank);
* ``--local-loss`` without ``--gather-with-grad`` loses the cross-rank terms altogether: refused;
* AR: ``sum(rank's NLL) / sum(global tokens)`` times ``W``.

The VALUES returned are the global batch's true losses (what gets logged), whatever the world size and
``accum_freq``: the gradient-carrying terms are added as ``x - x.detach()`` (exactly zero) to the logged value.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .kernels import FusedClipLoss

LOCAL_LOSS_ALONE = ("--local-loss without --gather-with-grad drops every gradient that crosses ranks (the "
                    "contrastive loss would train on a fraction of its terms); add --gather-with-grad, or drop "
                    "--local-loss")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` with its gradient multiplied by ``scale`` (``x`` itself when ``scale == 1``)."""
    return x if scale == 1 else _ScaleGrad.apply(x, scale)


def _distributed(world_size: int) -> bool:
    return world_size > 1 and dist.is_available() and dist.is_initialized()


def _with_value(value: torch.Tensor, grad_term: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``value`` whose gradient is ``grad_term``'s (``grad_term - grad_term.detach()`` is 0)."""
    return value.detach().to(grad_term.dtype) + (grad_term - grad_term.detach())


class VladVALoss(nn.Module):
    """``contrastive_weight * InfoNCE(image, short caption) + ar_weight * NLL(long caption | image, prompt)``.

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: as open_clip's ClipLoss.
            ``local_loss`` without ``gather_with_grad`` on several ranks is refused (ValueError).
        contrastive_weight: weight of the contrastive term. The term is ClipLoss's MEAN of the two directions;
            the paper's formula sums them, so ``contrastive_weight=2`` reproduces the paper's scale.
        ar_weight: weight of the next-token term (mean NLL per token; paper: 1, the losses are summed).
        accum_freq: open_clip_train's ``--accum-freq``. With N > 1 the loss is called N times per optimizer step
            (one gradient pass per micro-batch, the others' features cached without gradient): the returned
            values are then the whole step's (the AR NLL of the passes so far, over the step's tokens) and
            ``logit_scale``'s gradient is divided by N (every pass differentiates the whole loss with respect to it).
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, contrastive_weight: float = 1.0,
                 ar_weight: float = 1.0, accum_freq: int = 1):
        super().__init__()
        if local_loss and not gather_with_grad and world_size > 1:
            raise ValueError(LOCAL_LOSS_ALONE)
        if accum_freq < 1:
            raise ValueError(f"accum_freq must be >= 1, got {accum_freq}")
        self.contrastive = FusedClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad,
                                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                                         use_horovod=use_horovod)
        self.world_size = world_size
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.contrastive_weight = contrastive_weight
        self.ar_weight = ar_weight
        self.accum_freq = accum_freq
        self._passes = 0  # gradient passes of the current optimizer step (accum_freq > 1)
        self._nll_seen: torch.Tensor | None = None  # their summed NLL (global)

    def _feature_grad_scale(self) -> float:
        # Without gather_with_grad, rank r's features get only the loss's gradient through its own rows: W * that
        # is what DDP's average turns into the 1-process gradient.
        return float(self.world_size) if (self.world_size > 1 and not self.gather_with_grad) else 1.0

    def contrastive_loss(self, image_features: torch.Tensor, text_features: torch.Tensor,
                         logit_scale: torch.Tensor, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """The global batch's contrastive loss, with gradients scaled for DDP (see the module docstring)."""
        scale = self._feature_grad_scale()
        image_features, text_features = scale_grad(image_features, scale), scale_grad(text_features, scale)
        if self.accum_freq > 1 and torch.is_grad_enabled():
            logit_scale = scale_grad(logit_scale, 1.0 / self.accum_freq)
            if logit_bias is not None:
                logit_bias = scale_grad(logit_bias, 1.0 / self.accum_freq)
        loss = self.contrastive(image_features, text_features, logit_scale, logit_bias)
        if self.local_loss and _distributed(self.world_size):
            # This rank's rows only; the global value is the mean over ranks (equal row counts).
            value = loss.detach().clone()
            dist.all_reduce(value)
            loss = _with_value(value / self.world_size, loss)
        return loss

    def ar_loss(self, nll_sum: torch.Tensor, num_tokens: torch.Tensor) -> torch.Tensor:
        """Mean NLL per token over the global batch. ``nll_sum``, ``num_tokens``: ``[B]`` (this rank's rows, with
        zeros for the rows open_clip's accumulation cached without gradient)."""
        stats = torch.stack([num_tokens.detach().sum().float(), nll_sum.detach().sum().float()])
        scale = 1.0
        if _distributed(self.world_size):
            dist.all_reduce(stats)
            scale = float(self.world_size)  # DDP averages gradients over ranks
        total = stats[0].clamp(min=1.0)
        grad_term = nll_sum.sum() * scale / total
        seen = stats[1]
        if self.accum_freq > 1 and torch.is_grad_enabled():
            # Pass j of N: the cached rows hold zeros, so this pass's NLL is that of micro-batch j only. The step's
            # value is the sum over its passes; the last pass (the one open_clip logs) reports the whole step.
            seen = seen if self._passes == 0 or self._nll_seen is None else self._nll_seen + seen
            self._passes += 1
            self._nll_seen = seen
            if self._passes == self.accum_freq:
                self._passes, self._nll_seen = 0, None
        return _with_value(seen / total, grad_term)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None, ar_nll_sum: torch.Tensor | None = None,
                ar_num_tokens: torch.Tensor | None = None, output_dict: bool = False, **unused):
        losses = {}
        contrastive = self.contrastive_loss(image_features, text_features, logit_scale, logit_bias)
        losses["contrastive_loss"] = self.contrastive_weight * contrastive
        if ar_nll_sum is not None and self.ar_weight:
            losses["ar_loss"] = self.ar_weight * self.ar_loss(ar_nll_sum, ar_num_tokens)
        if output_dict:
            return losses
        return sum(losses.values())
