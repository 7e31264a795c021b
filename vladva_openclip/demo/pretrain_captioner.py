"""Generative pretraining of the tiny LLaVA on the synthetic world: the stand-in for LLaVA-1.5's own pretraining.

VladVA starts from a *generative* LVLM. The real ones learned to describe images from millions of pairs; the tiny
model learns the same task here, next-token captioning of the world's long descriptions given the image and the
instruction ``"Describe the image in detail."``, with every weight of the LVLM trained (vision tower, projector,
LLM). The result is saved with :func:`vladva_openclip.save_base` and ships as the ``synth_captioner`` tag of
``vladva-tiny-llava``. The shipped weights come from two stages, each reproducible bit for bit on the same machine
type with the code that ran it (same seed, same threads; ``pretraining.json`` holds both records, the first under
``previous_stage``):

1. 6,000 steps from random weights on the ``full`` long captions, each tokenized on its own (the captioner shipped
   until the whole-string tokenization of answers arrived: ``synth_captioner`` and this script at commit ed90e76);
2. 2,500 steps from stage 1 at lr 1e-3 on the ``compact`` long captions, tokenized as answers after the image
   prompt (the current recipe)::

    python -m vladva_openclip.demo.pretrain_captioner --init DIR_OF_STAGE_1 --steps 2500 --lr 0.001 \\
        --eval-every 500 --out vladva_openclip/assets/pretrained/vladva-tiny-llava/synth_captioner

From random weights on the compact captions alone (6,000 steps), the captioner stalled: validation NLL 0.40 and
only ~66 % of scenes preferring their own caption over another scene's after 4,000 steps (it had not learned to read
the image), where stage 1 reaches 100 % by step 3,000; the second stage keeps stage 1's grounding.

The captioner sees scenes from its own world seed (``--world-seed``, default 1000), so the demo's fine-tuning
scenes (world seed 0) are new images of the same distribution, and the test split (with its held-out
colour-shape pairs) is never seen.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..progress import progress as tqdm
from ..synth import World, WorldConfig

_logger = logging.getLogger(__name__)

MODEL_NAME = "vladva-tiny-llava"
CAPTION_PROMPT = "Describe the image in detail."
PROVENANCE_FILE = "pretraining.json"


@dataclass
class CaptionerConfig:
    """Settings of one pretraining run.

    Attributes:
        out: directory written with ``save_base`` (replaced if it exists) plus ``pretraining.json``.
        steps: optimizer steps; batch_size: scenes per step; lr: AdamW peak learning rate (linear warmup over
            ``warmup`` steps, cosine decay to ``lr * min_lr_ratio``).
        n_train: distinct training scenes (rendered once, cycled in a seeded random order).
        n_val: held-out scenes (the world's test split) for the validation loss and the caption samples.
        world_seed: seed of the world the scenes come from; seed: model-side randomness (data order).
        long_captions: the world's long-caption style (``compact``: every fact of the scene, ~53 tokens; ``full``
            adds filler sentences, ~83 tokens).
        max_long_len: caption tokens kept (compact captions: at most ~95 with the EOS target; a longer one is cut
            and gets no EOS target).
        threads: torch CPU threads (results are bitwise reproducible for the same count; one thread is also the
            fastest choice on a 2-core machine that runs anything else).
        init: start from this base (a ``vladva-tiny-llava`` pretrained tag or directory) instead of random weights:
            a second stage that adapts a trained captioner to another caption style or tokenization.
    """

    out: Path
    steps: int = 6000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup: int = 40
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    n_train: int = 60000
    n_val: int = 128
    world_seed: int = 1000
    seed: int = 0
    long_captions: str = "compact"
    max_long_len: int = 96
    threads: int | None = 1
    init: str | None = None
    eval_every: int = 1000
    n_samples: int = 4
    progress: bool = True
    history: list[dict] = field(default_factory=list, repr=False)


def render_split(world: World, split: str, n: int, progress: bool = True,
                 start: int = 0) -> tuple[torch.Tensor, list[str], list[str]]:
    """Samples ``start .. start+n-1`` of a split: (images ``[n, 3, S, S]`` uint8, short captions, long captions)."""
    size = world.config.image_size
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    shorts, longs = [], []
    for i in tqdm(range(n), desc=f"render {split}", disable=not progress, leave=False):
        s = world.sample(split, start + i)
        pixels = torch.frombuffer(bytearray(world.render(s.scene).tobytes()), dtype=torch.uint8)
        images[i] = pixels.view(size, size, 3).permute(2, 0, 1)
        shorts.append(s.short)
        longs.append(s.long)
    return images, shorts, longs


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` -> the model's input (what its preprocess makes of an S-pixel image: /255, Normalize)."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def build_captioner(pretrained: str | None = None):
    """The tiny LLaVA set up for captioning: no LoRA, the caption instruction as the image prompt."""
    import open_clip

    from .. import install

    install()
    return open_clip.create_model_and_transforms(MODEL_NAME, pretrained=pretrained, use_lora=False,
                                                 image_prompt=CAPTION_PROMPT, image_prompt_mode="handcrafted")


def lr_at(step: int, cfg: CaptionerConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def caption_nll(model, images: torch.Tensor, ids: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Per-sample next-token NLL sums and token counts (``[N]`` each) of the captions ``ids`` given ``images``."""
    was_training = model.training
    model.eval()
    sums, counts = [], []
    for i in range(0, images.shape[0], batch_size):
        _, nll, n = model.image_features_and_ar(images[i:i + batch_size], ids[i:i + batch_size])
        sums.append(nll)
        counts.append(n)
    model.train(was_training)
    return torch.cat(sums), torch.cat(counts)


def validation_metrics(model, images: torch.Tensor, ids: torch.Tensor) -> dict[str, float]:
    """``nll``: mean NLL per caption token (nats). ``grounding``: % of scenes whose own caption is more likely
    than the next scene's caption under their image (50 % = the captioner ignores the image)."""
    own, n = caption_nll(model, images, ids)
    other, n_other = caption_nll(model, images, ids.roll(1, dims=0))
    return {"nll": round(float(own.sum() / n.sum()), 4),
            "grounding": round(100.0 * float((own / n < other / n_other).float().mean()), 1)}


def pretrain_captioner(cfg: CaptionerConfig) -> dict:
    """Train the captioner and save it; returns the provenance record (also written to ``pretraining.json``)."""
    from .. import save_base

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    world = World(WorldConfig(seed=cfg.world_seed, long_captions=cfg.long_captions))
    images, _, longs = render_split(world, "train", cfg.n_train, cfg.progress)
    # Two validation sets: unseen scenes of the training distribution, and the test split, where every scene has
    # a colour-shape pair the training split never shows (the captioner must compose "red" and "triangle").
    val_images, _, val_longs = render_split(world, "test", cfg.n_val, cfg.progress)
    iid_images, _, iid_longs = render_split(world, "train", cfg.n_val, cfg.progress, start=cfg.n_train)
    model, _, _ = build_captioner(cfg.init)
    tokenizer = model.tokenizer
    mean, std = model.visual.image_mean, model.visual.image_std
    ids = tokenizer.long_captions(longs, context_length=cfg.max_long_len)
    val_x = normalise(val_images, mean, std)
    val_ids = tokenizer.long_captions(val_longs, context_length=cfg.max_long_len)
    iid_x = normalise(iid_images, mean, std)
    iid_ids = tokenizer.long_captions(iid_longs, context_length=cfg.max_long_len)
    render_s = time.perf_counter() - start

    def validate(step: int, **extra) -> dict:
        rec = {"step": step, **extra}
        for name, (x, y) in (("unseen_scenes", (iid_x, iid_ids)), ("heldout_pairs", (val_x, val_ids))):
            rec.update({f"val_{k}_{name}": v for k, v in validation_metrics(model, x, y).items()})
        _logger.info("step %d: %s", step, rec)
        return rec

    for p in model.lvlm.parameters():  # full pretraining: the vision tower, projector and LLM all learn
        p.requires_grad_(True)
    params = [p for p in model.lvlm.parameters()]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.empty(0, dtype=torch.long)
    _logger.info("captioner pretraining: %d steps x %d scenes", cfg.steps, cfg.batch_size)
    history = [validate(0)]
    model.train()
    train_start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc="pretrain captioner", disable=not cfg.progress)
    running = None
    for step in bar:
        if order.numel() < cfg.batch_size:
            order = torch.cat([order, torch.randperm(cfg.n_train, generator=gen)])
        idx, order = order[: cfg.batch_size], order[cfg.batch_size:]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        _, nll, n = model.image_features_and_ar(normalise(images[idx], mean, std), ids[idx])
        loss = nll.sum() / n.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        bar.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            history.append(validate(step + 1, train_nll=round(running, 4)))
    train_s = time.perf_counter() - train_start

    model.eval()
    samples = model.generate(val_x[: cfg.n_samples], CAPTION_PROMPT, max_new_tokens=cfg.max_long_len)
    for p in model.lvlm.parameters():
        p.requires_grad_(False)
    out = save_base(model, cfg.out)
    record = {
        "model": MODEL_NAME, "what": "generative pretraining (next-token captioning of the synthetic world's long "
                                      "captions), all LVLM weights trained",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "history"},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seconds": {"render": round(render_s, 1), "train": round(train_s, 1),
                    "total": round(time.perf_counter() - start, 1)},
        "history": history,
        "samples": [{"reference": r, "generated": g} for r, g in zip(val_longs[: cfg.n_samples], samples)],
    }
    previous = _previous_stage(cfg.init)
    if previous is not None:  # the whole recipe travels with the weights
        record["previous_stage"] = previous
    (out / PROVENANCE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    _logger.info("saved the captioner to %s (%.0f s training)", out, train_s)
    return record


def _previous_stage(init: str | None) -> dict | None:
    """The provenance record of the base a stage started from (a directory's or a registered tag's)."""
    if not init:
        return None
    path = Path(init)
    if not path.is_dir():
        from ..registry import get_pretrained_cfg

        cfg = get_pretrained_cfg(MODEL_NAME, init)
        path = Path(cfg["file"]) if cfg and cfg.get("file") else path
    record = path / PROVENANCE_FILE
    return json.loads(record.read_text()) if record.is_file() else None


def parse_args(argv: list[str] | None = None) -> CaptionerConfig:
    defaults = CaptionerConfig(out=Path("."))
    p = argparse.ArgumentParser(prog="vladva pretrain-captioner", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="output directory (replaced)")
    for name in ("steps", "batch_size", "warmup", "n_train", "n_val", "world_seed", "seed", "max_long_len",
                 "threads", "eval_every", "n_samples"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    p.add_argument("--long-captions", default=defaults.long_captions, help="the world's long-caption style")
    p.add_argument("--init", default=None, help="start from this base (pretrained tag or directory)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return CaptionerConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    record = pretrain_captioner(parse_args(argv))
    print(json.dumps({"seconds": record["seconds"], "history": record["history"]}, indent=1))
    for s in record["samples"]:
        print(f"\nreference: {s['reference']}\ngenerated: {s['generated']}")


if __name__ == "__main__":
    main()
