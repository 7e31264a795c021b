"""``FusedClipLoss``: a drop-in for ``open_clip.loss.ClipLoss`` backed by :func:`.contrastive.contrastive_loss`."""
from __future__ import annotations

import torch
from torch import Tensor

from .contrastive import contrastive_loss


class FusedClipLoss(torch.nn.Module):
    """open_clip's ``ClipLoss`` (same constructor and ``forward``) without the N x N logit matrices.

    With ``world_size > 1`` the features are gathered with ``open_clip.loss.gather_features`` exactly as ClipLoss
    does, then:

    * ``local_loss=True``: this rank's rows against the gathered ones, labels offset by ``rank * local_batch``;
    * ``local_loss=False``: the global loss over the gathered features (every rank computes the same value).

    ``cache_labels`` is accepted for compatibility; there is no label tensor to cache. ``impl`` and
    ``chunk_size`` are passed to :func:`.contrastive.contrastive_loss`. The loss is float32.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, impl: str = "auto",
                 chunk_size: int | None = None):
        super().__init__()
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.impl = impl
        self.chunk_size = chunk_size

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None = None, output_dict: bool = False) -> Tensor | dict[str, Tensor]:
        """image_features, text_features: [n, D] (this rank's rows); logit_scale: exponentiated scalar."""
        kwargs = {"logit_bias": logit_bias, "chunk_size": self.chunk_size, "impl": self.impl}
        if self.world_size > 1:
            from open_clip.loss import gather_features

            all_image, all_text = gather_features(
                image_features, text_features, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                rank=self.rank, world_size=self.world_size, use_horovod=self.use_horovod)
            if self.local_loss:
                loss = contrastive_loss(image_features, text_features, logit_scale, label_offset=
                                        self.rank * image_features.shape[0], all_image_features=all_image,
                                        all_text_features=all_text, **kwargs)
            else:
                loss = contrastive_loss(all_image, all_text, logit_scale, **kwargs)
        else:
            loss = contrastive_loss(image_features, text_features, logit_scale, **kwargs)
        return {"contrastive_loss": loss} if output_dict else loss
