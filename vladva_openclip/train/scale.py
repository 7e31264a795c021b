"""What the trainer decides and says about scale before the first step: the default precision of VladVA models,
the cost of a float32 base, and the planned memory per GPU (``vladva_openclip.plan``)."""
from __future__ import annotations

import argparse
import logging

import torch

_logger = logging.getLogger(__name__)

GiB = 1024 ** 3
LARGE_BASE = 1_000_000_000  # parameters above which an fp32 base earns a warning


def flag_given(argv: list[str], flag: str) -> bool:
    """``flag`` appears in ``argv`` (``--flag value`` or ``--flag=value``)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def default_precision() -> str:
    """``--precision`` for a VladVA model when none is given: ``amp_bf16`` (bf16 frozen base, fp32 trainables,
    bf16 autocast) on a CUDA device that supports bf16; open_clip_train's ``amp`` elsewhere (the run then says
    what the fp32 base costs, :func:`report_base_precision`)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        _logger.info("no --precision given: amp_bf16 (the frozen base in bfloat16, LoRA/prompts/logit_scale in "
                     "float32); --precision amp would keep an fp32 base at twice the memory")
        return "amp_bf16"
    return "amp"


def report_base_precision(model: torch.nn.Module, precision: str, precision_given: bool) -> None:
    """One line on the base's dtype and memory when it is float32: always when the precision was defaulted, as a
    warning for a base over 1B parameters."""
    base = [p for p in model.parameters() if not p.requires_grad]
    if not base or base[0].dtype != torch.float32:
        return
    n = sum(p.numel() for p in base)
    cost = f"{n * 4 / GiB:.1f} GiB per GPU for {n / 1e9:.2f} B parameters ({n * 2 / GiB:.1f} GiB in bf16)"
    if n > LARGE_BASE:
        _logger.warning("--precision %s keeps the frozen base in float32: %s; pass --precision amp_bf16 for a "
                        "bf16 base", precision, cost)
    elif not precision_given:
        _logger.info("no --precision given and no bf16 CUDA device: the frozen base is float32 (%s)", cost)


def log_plan(model: torch.nn.Module, args: argparse.Namespace, vargs: argparse.Namespace) -> None:
    """Rank 0, before training: the planned memory per GPU; a warning when it exceeds the device's memory. Never
    stops the run (a plan that cannot be made is reported and skipped)."""
    from ..plan import PlanRequest, build_meta_model, device_memory, plan_model
    from .args import model_kwargs

    try:
        request = PlanRequest(
            model=args.model, batch_size=int(args.batch_size), max_short_len=getattr(args, "max_short_len", None),
            max_long_len=getattr(args, "max_long_len", None), precision=args.precision,
            grad_checkpointing=bool(args.grad_checkpointing), accum_freq=int(args.accum_freq),
            world_size=int(args.world_size), ar=bool(vargs.ar_weight) and not vargs.text_pairs,
            overrides=model_kwargs(vargs))
        meta = build_meta_model(request)
        memory = device_memory(getattr(args, "device", None))
        result = plan_model(meta, request, memory)
    except Exception as err:  # noqa: BLE001 - planning is advice: it must never stop a run
        _logger.warning("could not plan the memory of this run (%s: %s)", type(err).__name__, err)
        return
    _logger.info("planned memory per GPU: %.2f GiB (weights %.2f, optimizer+grads %.2f, activations %.2f); "
                 "`vladva plan` shows the breakdown", result.total_bytes / GiB, result.weights_bytes / GiB,
                 (result.optimizer_bytes + result.grads_bytes + result.ddp_buckets_bytes) / GiB,
                 result.activation_bytes / GiB)
    if memory and result.total_bytes > memory:
        hint = "" if args.grad_checkpointing else " add --grad-checkpointing,"
        _logger.warning("the planned %.1f GiB per GPU exceed the device's %.1f GiB: the run will likely run out of "
                        "memory;%s lower --batch-size (largest that fits: %s) and raise --accum-freq",
                        result.total_bytes / GiB, memory / GiB, hint, result.max_batch_size)
