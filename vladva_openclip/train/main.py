"""``vladva-train``: open_clip_train's own ``main()`` and ``train_one_epoch``, extended, not forked.

open_clip_train has no plugin hooks, so a handful of names in its modules are rebound for the duration of the
run (and restored after): the data (short + long captions), the loss (contrastive + AR), the optimizer groups
(LoRA / logit_scale / soft prompts, with a soft-prompt lr scale), checkpoint writing (atomic, trainables only,
optionally every N steps) and a guard that skips non-finite steps. Everything else — torchrun/SLURM, DDP,
gather-with-grad, local loss, two-pass accumulation, schedulers, logging, resume — is open_clip_train's.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import install
from ..loss import LOCAL_LOSS_ALONE
from ..progress import progress as tqdm
from ..registry import is_vladva_name
from ._common import TrainInputError
from .args import model_kwargs, split_args
from .checkpoints import (
    HEALTH_KEY,
    atomic_save,
    clean_stale_temp_files,
    clear_unusable,
    find_resume_checkpoint,
    health_record,
    mark_unusable,
    safe_pt_load,
    unusable_reason,
)
from .scale import default_precision, flag_given, log_plan, report_base_precision

_logger = logging.getLogger(__name__)


class RunState:
    """What the rebound functions share during one run."""

    def __init__(self, vargs: argparse.Namespace):
        self.vargs = vargs
        self.args: argparse.Namespace | None = None  # open_clip_train's namespace (with the VladVA flags merged)
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.resume_batches = 0  # batches of the resumed epoch already trained
        self.restore_save_most_recent = False
        self.precision_given = True  # --precision on the command line (else the VladVA default was chosen)
        self.step_save_deferred = False  # a step checkpoint fell due during a non-finite streak
        self.temp_files_cleaned = False
        self.on_step: Callable[[], None] | None = None  # main()'s between-steps callback
        # checkpoints whose weights no finite optimizer step has used yet: (path, finite steps when saved)
        self.unconfirmed: list[tuple[str, int]] = []

    def _finite_steps(self) -> int:
        return int(getattr(self.optimizer, "finite_steps", 0))

    def health(self) -> dict[str, int]:
        return health_record(getattr(self.optimizer, "nonfinite_in_a_row", 0),
                             getattr(self.optimizer, "skipped_steps", 0))

    def checkpoint_written(self, path: str | os.PathLike) -> None:
        """Remember ``path`` until a finite step shows that its weights give a finite loss."""
        done = self._finite_steps()
        self.unconfirmed = [(p, n) for p, n in self.unconfirmed if n == done]
        self.unconfirmed.append((os.fspath(path), done))

    def mark_blown_up(self) -> None:
        """The streak limit was hit: every checkpoint saved since the last finite step holds the weights that gave
        only non-finite losses, so ``--resume latest`` must not pick it."""
        done = self._finite_steps()
        limit = getattr(self.optimizer, "max_in_a_row", "?")
        for path, n in self.unconfirmed:
            if n == done:
                mark_unusable(path, f"its weights gave {limit} non-finite losses in a row")
        self.unconfirmed = []


# ---- checkpoint writing ----------------------------------------------------------------------------------------
class _TorchWithAtomicSave(types.ModuleType):
    """Stands in for ``torch`` inside open_clip_train.main only, so its checkpoint writes become atomic and carry
    the run's health (a checkpoint saved during a non-finite streak is not resumed from)."""

    def __init__(self, state: RunState, latest_name: str):
        super().__init__("torch")
        self._state = state
        self._latest_name = latest_name

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def save(self, obj: Any, path: str | os.PathLike) -> None:
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = {**obj, HEALTH_KEY: self._state.health()}
        atomic_save(obj, path)
        if os.path.basename(path) == "tmp.pt":
            # --save-most-recent: open_clip_train renames tmp.pt to epoch_latest.pt right after this save
            path = os.path.join(os.path.dirname(path), self._latest_name)
            clear_unusable(path)
        self._state.checkpoint_written(path)


def check_learning_rate(lr: float | None, lr_scales: list[float], weight_decay: float) -> None:
    """Reject a learning rate the optimizer cannot apply: AdamW multiplies float32 weights by ``lr * scale`` (and
    ``1 - lr * scale * weight_decay``), which overflows past float32's largest value before any loss is seen."""
    if lr is None:  # open_clip_train fills in its default
        return
    if not math.isfinite(lr) or lr < 0:
        raise TrainInputError(f"--lr {lr:g} is not a usable learning rate: it must be a finite number >= 0")
    biggest = float(torch.finfo(torch.float32).max)
    for scale in lr_scales:
        effective = lr * scale * max(1.0, weight_decay)
        if not math.isfinite(effective) or effective > biggest:
            scaled = f" x lr scale {scale:g}" if scale != 1.0 else ""
            raise TrainInputError(
                f"--lr {lr:g}{scaled} (weight decay {weight_decay:g}) is larger than float32 can hold "
                f"({biggest:.3g}): the optimizer step would overflow. Use a learning rate in the usual range "
                "(1e-5 to 1e-3 for LoRA fine-tuning)")


# ---- optimizer -------------------------------------------------------------------------------------------------
class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not finite (a non-finite loss), and gives up after
    ``max_in_a_row`` such steps in a row."""

    def __init__(self, params, max_in_a_row: int = 5, **kwargs):
        super().__init__(params, **kwargs)
        self.max_in_a_row = max_in_a_row
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self.finite_steps = 0  # steps taken (finite gradients), in this process

    def _grads_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        if not self._grads_finite():
            self.nonfinite_in_a_row += 1
            self.skipped_steps += 1
            self.zero_grad(set_to_none=True)
            _logger.warning("non-finite loss or gradients: step skipped (%d in a row, limit %d)",
                            self.nonfinite_in_a_row, self.max_in_a_row)
            if self.nonfinite_in_a_row >= self.max_in_a_row:
                raise FloatingPointError(
                    f"{self.nonfinite_in_a_row} non-finite losses in a row; stopping. Lower the learning rate or "
                    f"check the data, then resume from the last checkpoint (--resume latest, which passes over the "
                    f"checkpoints holding the weights that gave these losses)")
            return None
        self.nonfinite_in_a_row = 0
        out = super().step(closure)
        self.finite_steps += 1
        return out


def param_groups(model: torch.nn.Module, weight_decay: float, soft_prompt_lr_scale: float) -> list[dict]:
    """LoRA (weight decay), logit_scale and soft prompts (no decay, own lr scale). Group 0 has lr scale 1, because
    open_clip_train logs ``param_groups[0]['lr']``."""
    groups = model.trainable_groups()
    spec = [("lora", weight_decay, 1.0), ("logit_scale", 0.0, 1.0), ("soft_prompt", 0.0, soft_prompt_lr_scale)]
    out = [{"params": [p for _, p in groups[role]], "weight_decay": wd, "lr_scale": scale, "name": role}
           for role, wd, scale in spec if groups[role]]
    return out


def assign_learning_rate(optimizer: torch.optim.Optimizer, new_lr: float) -> None:
    """open_clip_train's scheduler hook, honouring each group's ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = new_lr * group.get("lr_scale", 1.0)


# ---- data loader wrapper ---------------------------------------------------------------------------------------
class ResumableLoader:
    """Wraps an epoch's dataloader: skips the batches a resumed run already trained on, and calls
    ``on_step_boundary(batches_done)`` between batches (after the previous optimizer step finished)."""

    def __init__(self, loader, skip: int, on_step_boundary: Callable[[int], None] | None,
                 progress: str | None = None):
        self.loader = loader
        self.skip = skip
        self.on_step_boundary = on_step_boundary
        self.progress = progress  # a tqdm description, or None for no bar
        self.num_batches = loader.num_batches
        self.num_samples = loader.num_samples

    def __len__(self) -> int:
        return len(self.loader) - self.skip

    def __iter__(self) -> Iterator:
        it = iter(self.loader)
        for _ in range(self.skip):
            next(it, None)
        bar = tqdm(total=len(self.loader), initial=self.skip, desc=self.progress, unit="batch", leave=False,
                   disable=self.progress is None)
        try:
            for done, batch in enumerate(it, start=self.skip):
                if done > self.skip and self.on_step_boundary is not None:
                    self.on_step_boundary(done)
                yield batch
                bar.update(1)
        finally:
            bar.close()


_DDP = torch.nn.parallel.DistributedDataParallel


class _VladVADDP(_DDP):
    """open_clip_train's DDP, with two fixes:

    * it passes ``device_ids=[device]`` even for CPU, which DDP rejects; CPU (gloo) needs None;
    * a mode that leaves a trainable parameter out of the graph (``--text-pairs``: the image soft prompt) would stop
      DDP at the second step ("Expected to have finished reduction in the prior iteration") after a first step with
      unsynchronised gradients: such models get ``find_unused_parameters=True`` (the model says which,
      ``unused_trainables()``).
    """

    def __init__(self, module, device_ids=None, **kwargs):
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        unused = module.unused_trainables() if callable(getattr(module, "unused_trainables", None)) else []
        if unused and not kwargs.get("static_graph"):
            kwargs.setdefault("find_unused_parameters", True)
            _logger.info("DDP: %d trainable tensor(s) unused in this mode (%s); find_unused_parameters on",
                         len(unused), ", ".join(unused[:3]))
        super().__init__(module, device_ids=device_ids, **kwargs)


# ---- the rebound functions ---------------------------------------------------------------------------------------
def _make_hooks(state: RunState, ocm, ocs, oct) -> dict[tuple[Any, str], Any]:
    from ..loss import VladVALoss
    from . import data as vdata

    original_parse = ocm.parse_args
    original_create = ocm.create_model_and_transforms
    original_train_one_epoch = ocm.train_one_epoch
    original_get_latest = ocm.get_latest_checkpoint
    vargs = state.vargs

    def parse_args(argv):
        args = original_parse(argv)
        for key, value in vars(vargs).items():
            setattr(args, key, value)
        check_learning_rate(args.lr, [1.0, vargs.soft_prompt_lr_scale], args.wd)
        if args.local_loss and not args.gather_with_grad:
            raise TrainInputError(LOCAL_LOSS_ALONE)
        if is_vladva_name(args.model) and not flag_given(argv, "--precision"):
            args.precision = default_precision()
        state.precision_given = flag_given(argv, "--precision")
        if args.resume == "latest" and args.remote_sync is None and args.save_most_recent:
            # With --save-most-recent, open_clip_train looks only at epoch_latest.pt and would miss the step
            # checkpoints; hidden for its lookup (which then calls get_latest_checkpoint below), restored when the
            # model is created, before anything is saved.
            args.save_most_recent = False
            state.restore_save_most_recent = True
        state.args = args
        return args

    def get_latest_checkpoint(path: str, remote: bool):
        if remote:
            return original_get_latest(path, remote)
        return find_resume_checkpoint(path, accum_freq=getattr(state.args, "accum_freq", 1))

    def create_model_and_transforms(model_name, *a, **kw):
        if state.restore_save_most_recent:
            state.args.save_most_recent = True
            state.restore_save_most_recent = False
        if is_vladva_name(model_name):
            kw.update(model_kwargs(vargs))
            kw.setdefault("init_seed", getattr(state.args, "seed", None))  # LoRA init follows --seed
        out = original_create(model_name, *a, **kw)
        state.model = out[0]
        if is_vladva_name(model_name):
            report_base_precision(state.model, kw.get("precision", "fp32"), state.precision_given)
            state.model.trainable_state_only = True  # checkpoints hold only what trains
            # --ar-weight 0: the long-caption pass would cost a forward over every long caption for nothing
            state.model.compute_ar = bool(vargs.ar_weight) and not vargs.text_pairs
            # --accum-freq: the gradient pass reuses the caching pass's vision-tower output (same input tensor)
            state.model.reuse_vision_features = int(getattr(state.args, "accum_freq", 1) or 1) > 1
            state.model.text_pairs = bool(vargs.text_pairs)
            for flag in ("max_short_len", "max_long_len"):  # the model's own defaults (real models: the paper's)
                if getattr(state.args, flag, None) is None:
                    setattr(state.args, flag, getattr(state.model.cfg, flag))
            if not kw.get("aug_cfg"):
                # LVLMs are fine-tuned on their processor's deterministic resize (as LLaVA's is); it also makes a
                # resumed run see exactly the pixels the interrupted one would have seen. --aug-cfg opts back in.
                out = (out[0], out[2], out[2])
        return out

    def create_loss(args):
        if not is_vladva_name(args.model):
            from open_clip import create_loss as oc_create_loss
            return oc_create_loss(args)
        if ocm.is_master(args) and state.model is not None:
            log_plan(state.model, args, vargs)
        return VladVALoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                          rank=args.rank, world_size=args.world_size, use_horovod=args.horovod,
                          contrastive_weight=vargs.contrastive_weight, ar_weight=vargs.ar_weight,
                          accum_freq=args.accum_freq)

    def adamw(groups, **kw):
        model = state.model
        if model is None or not hasattr(model, "trainable_groups"):
            return torch.optim.AdamW(groups, **kw)
        wd = max((g.get("weight_decay", 0.0) for g in groups), default=0.0)
        state.optimizer = GuardedAdamW(param_groups(model, wd, vargs.soft_prompt_lr_scale),
                                       max_in_a_row=vargs.max_nonfinite_steps, **kw)
        return state.optimizer

    def pt_load(path, map_location=None):
        try:
            ckpt = safe_pt_load(path, map_location=map_location)
        except FileNotFoundError as err:
            raise TrainInputError(f"--resume {path}: no such checkpoint file") from err
        except Exception as err:  # (truncated, not a checkpoint, or holding pickled code)
            raise TrainInputError(
                f"cannot read checkpoint {path} ({type(err).__name__}: {str(err).splitlines()[0]}): it is "
                "truncated or not a training checkpoint. Pass an earlier checkpoint to --resume, or use --resume "
                "latest, which passes over unreadable ones") from err
        reason = unusable_reason(path) if os.path.isfile(path) else None
        if reason:  # named explicitly with --resume: the user's choice, but say what the run found
            _logger.warning("resuming from %s although it is marked unusable: %s", path, reason)
        if isinstance(ckpt, dict):
            state.resume_batches = int(ckpt.get("batches_done", 0))
            state.checkpoint_written(path)  # a streak right after resuming condemns these weights too
        return ckpt

    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        skip, state.resume_batches = state.resume_batches, 0
        every = vargs.save_every_n_steps * args.accum_freq
        if args.save_logs and not state.temp_files_cleaned:
            state.temp_files_cleaned = True
            clean_stale_temp_files(args.checkpoint_path)

        def between_steps(batches_done: int) -> None:
            if state.on_step is not None:
                state.on_step()
            save_step(batches_done)

        def save_step(batches_done: int) -> None:
            if not every or not args.save_logs or batches_done % args.accum_freq:
                return
            if batches_done % every and not state.step_save_deferred:
                return
            if getattr(optimizer, "nonfinite_in_a_row", 0):
                # These weights may be the ones that make every loss NaN: wait until a step is finite again.
                if not state.step_save_deferred:
                    _logger.warning("step checkpoint at batch %d of epoch %d postponed: non-finite steps in "
                                    "progress", batches_done, epoch)
                state.step_save_deferred = True
                return
            state.step_save_deferred = False
            ckpt = {"epoch": epoch, "name": args.name, "state_dict": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "batches_done": batches_done, HEALTH_KEY: state.health()}
            if scaler is not None:
                ckpt["scaler"] = scaler.state_dict()
            # Sorts (natural order) after epoch_{epoch}.pt and before epoch_{epoch+1}.pt: --resume latest finds it.
            path = os.path.join(args.checkpoint_path, f"epoch_{epoch}_step_{batches_done // args.accum_freq}.pt")
            atomic_save(ckpt, path)
            state.checkpoint_written(path)
            _logger.info("saved step checkpoint %s", path)

        train = data["train"]
        original_loader = train.dataloader
        # The bar only on rank 0 and only when asked: open_clip_train's log lines are what cluster logs want.
        bar = f"epoch {epoch}" if vargs.progress and ocm.is_master(args) else None
        train.dataloader = ResumableLoader(original_loader, skip, between_steps, progress=bar)
        offset = skip // args.accum_freq
        shifted = (lambda step: scheduler(step + offset)) if (scheduler is not None and offset) else scheduler
        if skip:
            _logger.info("resuming epoch %d after %d batches", epoch, skip)
        try:
            return original_train_one_epoch(model, data, loss, epoch, optimizer, scaler, shifted, dist_model, args,
                                            tb_writer=tb_writer)
        except FloatingPointError:
            if args.save_logs:
                state.mark_blown_up()
            raise
        finally:
            train.dataloader = original_loader
            report = getattr(train, "skip_report", None)
            if callable(report):
                report()
            report_empty_captions(original_loader)

    hooks = {
        (ocm, "parse_args"): parse_args,
        (ocm, "get_latest_checkpoint"): get_latest_checkpoint,
        (ocm, "create_model_and_transforms"): create_model_and_transforms,
        (ocm, "create_loss"): create_loss,
        (ocm, "get_data"): vdata.get_data,
        (ocm, "optim"): types.SimpleNamespace(AdamW=adamw),
        (ocm, "pt_load"): pt_load,
        (ocm, "train_one_epoch"): train_one_epoch,
        (ocm, "torch"): _TorchWithAtomicSave(state, ocm.LATEST_CHECKPOINT_NAME),
        (ocs, "assign_learning_rate"): assign_learning_rate,
    }
    hooks[(torch.nn.parallel, "DistributedDataParallel")] = _VladVADDP
    return hooks


@contextlib.contextmanager
def patched(hooks: dict[tuple[Any, str], Any]):
    saved = {key: getattr(*key) for key in hooks}
    try:
        for (module, attr), value in hooks.items():
            setattr(module, attr, value)
        yield
    finally:
        for (module, attr), value in saved.items():
            setattr(module, attr, value)


@contextlib.contextmanager
def restored_root_logging() -> Iterator[None]:
    """Undo what open_clip_train's ``setup_logging`` does to the process's logging when the block ends.

    It adds root handlers (its log file, the console) and sets EVERY existing logger to its level: a second run in
    the same process (tests, notebooks, the demo) would otherwise write into the first run's log file too, and
    libraries such as transformers would stay at INFO (printing each model config) for the rest of the process.
    """
    root = logging.getLogger()
    handlers = list(root.handlers)
    levels = {name: lg.level for name, lg in logging.root.manager.loggerDict.items()
              if isinstance(lg, logging.Logger)}
    root_level = root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(root_level)
        for name, lg in logging.root.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                lg.setLevel(levels.get(name, logging.NOTSET))


def main(argv: list[str] | None = None, on_step: Callable[[], None] | None = None) -> int | None:
    """Run open_clip_train's main() with the VladVA extensions; ``argv`` as on the command line.

    ``on_step`` (for programs that run the trainer in-process) is called in the training thread between optimizer
    steps: the place to change per-thread settings such as torch's thread count."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # torchrun needs a separator before flags like --logs (prefix of its --logs-specs)
        argv = argv[1:]
    vargs, rest = split_args(argv)
    import open_clip_train.main as ocm
    import open_clip_train.scheduler as ocs
    import open_clip_train.train as oct

    install()  # rebinds the aliases open_clip_train imported by name
    state = RunState(vargs)
    state.on_step = on_step
    with restored_root_logging(), patched(_make_hooks(state, ocm, ocs, oct)):
        try:
            return ocm.main(rest)
        except TrainInputError as err:  # bad flags or data: the message says what and how to fix it
            _report_fatal(str(err))
            return 2
        except FloatingPointError as err:  # the non-finite guard stopped the run (checkpoints are marked)
            _report_fatal(str(err))
            return 1


def _report_fatal(message: str) -> None:
    """One line on stderr, and the same line in the run's log file if it has one (not on the console twice)."""
    print(f"vladva-train: error: {message}", file=sys.stderr)
    record = _logger.makeRecord(_logger.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def report_empty_captions(loader) -> None:
    """Log how many samples so far had an empty short caption (the packer warns only at the first one)."""
    dataset = getattr(loader, "dataset", None)
    packer = getattr(dataset, "packer", None) or getattr(getattr(dataset, "process", None), "packer", None)
    report = getattr(packer, "report_empty", None)
    if callable(report):
        report()


if __name__ == "__main__":
    sys.exit(main() or 0)
