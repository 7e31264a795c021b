"""Next-token loss on the long captions, computed only at the labelled positions.

Only the ~100 caption positions of a ~700-token sequence go through ``lm_head``, in row chunks (never a
``B x T x V`` tensor), with fp32 log-sum-exp. VladVA keeps ``lm_head`` frozen, so the gradient with respect to the
hidden states is computed inside the forward, chunk by chunk (``[M, H]``, as small as the hidden states): backward
is then one multiply, with no second ``lm_head`` pass. A trainable ``lm_head`` falls back to recomputing each
chunk's logits in backward. The result is per-sample sums and
token counts so that the loss stays exact under gradient accumulation: ``sum(nll) / sum(tokens)`` over the
global batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits, targets, reduction="none")


class _FrozenHeadNLL(torch.autograd.Function):
    """Per-token NLL through a frozen ``lm_head``; ``d nll_i / d hidden_i = (softmax_i - onehot_i) @ W`` is formed in
    the forward (each token's NLL depends on its own row only, so backward just scales that row by its upstream
    gradient). Saves the checkpointed path's second logits matmul and log-softmax: ~40 % of the loss's time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            logits = F.linear(h, weight).float()
            target_logit = logits.gather(1, t.unsqueeze(1))
            top = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: one exp serves the log-sum-exp and the softmax
            total = probs.sum(dim=1, keepdim=True)
            nll[start:start + chunk] = (total.log() + top - target_logit).squeeze(1)
            probs.div_(total)
            probs[torch.arange(probs.shape[0], device=probs.device), t] -= 1.0
            grad[start:start + chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_nll.unsqueeze(1).to(grad.dtype), None, None, None


def token_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per-token negative log-likelihood.

    Args:
        hidden: ``[M, H]`` final hidden states at the positions that predict ``targets``.
        weight: ``[V, H]`` lm_head weight.
        targets: ``[M]`` token ids.
        chunk: rows per lm_head call; peak extra memory is ``chunk x V`` fp32.

    Returns:
        ``[M]`` fp32.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    if torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad:
        return _FrozenHeadNLL.apply(hidden, weight, targets, chunk)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            parts.append(checkpoint(_chunk_nll, h, weight, t, use_reentrant=False))
        else:
            parts.append(_chunk_nll(h, weight, t))
    return torch.cat(parts)


def caption_targets(
    captions: torch.Tensor, lengths: torch.Tensor, eos_token_id: int, complete: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets ``[B, Lc+1]`` (caption then EOS) and their mask ``[B, Lc+1]``.

    Rows with no caption have no targets at all; rows with ``complete[b] == False`` (a caption cut by the
    tokenizer) have no EOS target: the model must never learn to stop mid-sentence.
    """
    b, width = captions.shape
    targets = torch.cat([captions, captions.new_full((b, 1), eos_token_id)], dim=1)
    col = torch.arange(width + 1, device=captions.device).unsqueeze(0)
    eos_col = lengths.unsqueeze(1)
    targets = torch.where(col == eos_col, torch.full_like(targets, eos_token_id), targets)
    last = eos_col if complete is None else eos_col - (~complete.bool()).long().unsqueeze(1)
    mask = (col <= last) & (lengths.unsqueeze(1) > 0)
    return targets, mask
