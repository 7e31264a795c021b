"""Right-padded sequence assembly: ``[prefix | body (variable length) | suffix]`` for a whole batch at once.

Every row is laid out left to right with no gaps, so positions are ``arange`` and the last valid token is the
suffix's last token: the summary token. The same index map serves token ids and embeddings.
"""
from __future__ import annotations

import torch


def layout(prefix_len: int, body_width: int, suffix_len: int, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source index and validity of each output position.

    Args:
        prefix_len: P, tokens before the body (same count for every row).
        body_width: Lb, padded width of the body.
        suffix_len: S, tokens after the body (same for every row).
        lengths: ``[B]`` valid body tokens per row (``<= body_width``).

    Returns:
        ``index [B, T]`` into the concatenation ``[prefix (P) | body (Lb) | suffix (S)]`` and ``mask [B, T]``
        (1 for real tokens), with ``T = P + max(lengths) + S``.
    """
    width = int(lengths.max().item()) if lengths.numel() else 0
    total = prefix_len + width + suffix_len
    t = torch.arange(total, device=lengths.device).unsqueeze(0)
    body_end = prefix_len + lengths.unsqueeze(1)
    index = torch.where(t < body_end, t, prefix_len + body_width + (t - body_end))
    valid = t < body_end + suffix_len
    return torch.where(valid, index, torch.zeros_like(index)), valid.long()


def assemble(
    prefix: torch.Tensor, body: torch.Tensor, lengths: torch.Tensor, suffix: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate per row with no gaps, right padding at the end.

    Args:
        prefix: ``[B or 1, P, *F]``.
        body: ``[B, Lb, *F]`` (columns past ``lengths`` are ignored).
        lengths: ``[B]``.
        suffix: ``[B or 1, S, *F]``.

    Returns:
        ``seq [B, T, *F]`` (padding positions repeat the first prefix token; they are masked) and ``mask [B, T]``.
    """
    b = body.shape[0]
    feat = body.shape[2:]
    index, mask = layout(prefix.shape[1], body.shape[1], suffix.shape[1], lengths)
    src = torch.cat([prefix.expand(b, *prefix.shape[1:]), body, suffix.expand(b, *suffix.shape[1:])], dim=1)
    gather_index = index.view(b, -1, *([1] * len(feat))).expand(b, index.shape[1], *feat)
    return src.gather(1, gather_index), mask
