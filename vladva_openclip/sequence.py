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


def concat_rows(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate variable-length pieces per row with no gaps, right padding at the end.

    The general form of :func:`assemble` (whose prefix and suffix have one length for every row): used where the
    image part itself has a length of its own per row (LLaVA-NeXT's anyres tokens).

    Args:
        parts: ``(values [B or 1, W_k, *F], lengths [B] or [1])`` per piece; columns past a row's length are ignored.

    Returns:
        ``seq [B, T, *F]`` (padding positions repeat the first column; they are masked) and ``mask [B, T]``,
        ``T = max(sum of lengths)``.
    """
    b = max(max(v.shape[0], n.shape[0]) for v, n in parts)
    feat = parts[0][0].shape[2:]
    src = torch.cat([v.expand(b, *v.shape[1:]) for v, _ in parts], dim=1)
    lengths = torch.stack([n.to(src.device).expand(b) for _, n in parts], dim=1)  # [B, n]
    ends = lengths.cumsum(1)
    starts = ends - lengths
    widths = torch.tensor([v.shape[1] for v, _ in parts], device=src.device)
    offsets = widths.cumsum(0) - widths
    total = ends[:, -1]
    t = torch.arange(int(total.max()) if b else 0, device=src.device).unsqueeze(0)  # [1, T]
    part = (t.unsqueeze(-1) >= ends.unsqueeze(1)).sum(-1).clamp(max=len(parts) - 1)  # [B, T]
    index = offsets[part] + t - starts.gather(1, part)
    valid = t < total.unsqueeze(1)
    index = torch.where(valid, index, torch.zeros_like(index))
    gather_index = index.view(b, -1, *([1] * len(feat))).expand(b, index.shape[1], *feat)
    return src.gather(1, gather_index), valid.long()
