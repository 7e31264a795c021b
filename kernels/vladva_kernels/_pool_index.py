"""What the last-token pooling's torch path and Triton backend share: the normalisation epsilon and the last-index
search. A floor below both (:mod:`.pooling` and :mod:`.pooling_triton` import it), so neither imports the other.
"""
from __future__ import annotations

import torch
from torch import Tensor

NORM_EPS = 1e-12  # as F.normalize


def _last_index(mask: Tensor) -> Tensor:
    """[B, T] -> [B] int64: the highest position with a nonzero entry, -1 for an all-zero row (no host sync)."""
    if mask.shape[1] == 0:
        return torch.full((mask.shape[0],), -1, dtype=torch.long, device=mask.device)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask != 0, positions, -1).amax(dim=1)
