"""Launched by tests/test_train.py with ``torchrun --nproc_per_node 2``: each rank holds half of a global batch.

Checks that the gathered contrastive + AR loss and the DDP-averaged gradients equal those of one process on the
whole batch, for open_clip's gather modes. Rank 0 writes the comparison to the JSON file named by argv[1].
"""
import json
import os
import sys

import torch
import torch.distributed as dist


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def main(out_path: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    import open_clip

    import vladva_openclip  # noqa: F401
    from vladva_openclip.loss import VladVALoss

    torch.manual_seed(0)
    model = open_clip.create_model("vladva-tiny-llava")
    with torch.no_grad():  # non-trivial adapters so every gradient is non-zero
        gen = torch.Generator().manual_seed(1)
        for p in model.trainable_state_dict().values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    tok = open_clip.get_tokenizer("vladva-tiny-llava")
    n = 6
    s = model.cfg.image_size
    images = torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(2))
    short = tok([f"caption number {i} with {'more ' * i}words" for i in range(n)], context_length=16)
    long = tok([f"a long caption {'detail ' * (2 * i)}" if i % 3 else "" for i in range(n)], context_length=16)
    packed = torch.stack([short, long], 1)
    report = {}
    # The two modes open_clip recommends for exact gradients (without gather_with_grad, DDP scales them by 1/world).
    for mode in ("gather_with_grad", "local_loss+gather_with_grad"):
        local_loss = "local_loss" in mode
        gather_with_grad = "gather_with_grad" in mode
        # Single process, whole batch (computed on every rank; identical).
        model.zero_grad(set_to_none=True)
        ref_out = model(images, packed)
        ref_losses = VladVALoss()(**ref_out, output_dict=True)
        sum(ref_losses.values()).backward()
        ref_grads = grads_of(model)
        # Distributed: this rank's half, gathered inside the loss, gradients averaged like DDP.
        model.zero_grad(set_to_none=True)
        part = slice(rank * n // world, (rank + 1) * n // world)
        out = model(images[part], packed[part])
        loss_fn = VladVALoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
        losses = loss_fn(**out, output_dict=True)
        sum(losses.values()).backward()
        grads = grads_of(model)
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        # The contrastive loss value with local loss is this rank's rows' mean; averaged over ranks it is global.
        vals = {k: v.detach().clone() for k, v in losses.items()}
        for v in vals.values():
            dist.all_reduce(v)
            v /= world
        err = max(float((grads[k] - ref_grads[k]).abs().max() / (ref_grads[k].abs().max() + 1e-12)) for k in ref_grads)
        report[mode] = {
            "loss_ref": {k: float(v) for k, v in ref_losses.items()},
            "loss_dist": {k: float(v) for k, v in vals.items()},
            "max_rel_grad_err": err,
            "n_grads": len(grads),
        }
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
