"""Next-token loss on the long captions, computed only at the labelled positions.

Only the ~100 caption positions of a ~700-token sequence go through ``lm_head``, in row chunks whose logits are
recomputed in backward (never a ``B x T x V`` tensor), with fp32 log-sum-exp. The result is per-sample sums and
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
