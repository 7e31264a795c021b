"""Every analysis on the embedded default, in one command (what RESULTS.md reports)::

    vladva analyze miniature --out results/analysis      # or: python -m vladva_openclip.analysis.miniature

The models: the shipped generative captioner used zero-shot with handcrafted prompts (``base``), its VladVA
fine-tune (LoRA + soft prompts + contrastive + AR loss, ``vladva``), an image-text contrastive-only fine-tune (LoRA
+ soft prompts, no AR loss, ``contrastive``) and E5-V's own recipe (LoRA, text-only contrastive on
caption/paraphrase pairs, ``e5v``), all trained by ``vladva-train`` exactly as ``vladva demo`` trains (its world,
caption styles, budget and seed; :mod:`vladva_openclip.demo.pipeline`). Outputs: ``prompts/`` (the search on the captioner),
``prompts_vladva/`` (the same search on the VladVA fine-tune's weights), ``next_token/``, ``attention/``,
``retention/``, ``summary.json`` (deterministic) and ``timings.json`` under ``--out``; the world, training runs
and adapters go to ``--work``. Retention captions unseen scenes of another world seed; the reference descriptions
are in the fine-tunes' long-caption style, with the other style as a second reference set.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..synth.captions import LONG_STYLES
from .models import ModelRef, load_models
from .outputs import write_json

__all__ = ["PRESETS", "MiniatureConfig", "preset", "run_miniature"]

_logger = logging.getLogger(__name__)

MODEL_NAME = "vladva-tiny-llava"
BASE_TAG = "synth_captioner"
#: label -> demo variant fine-tuned from the captioner
FINETUNES = {"vladva": "vladva", "contrastive": "lora-soft-prompt", "e5v": "e5v"}
STAMP = "miniature_training.json"


@dataclass
class MiniatureConfig:
    """Settings of the miniature run.

    Attributes:
        out: results folder; work: world, runs and adapters (reused when their settings match).
        n_train, epochs, batch_size, lr, warmup, seed, world_seed: the fine-tunings (``vladva demo``'s defaults).
        n_test: test scenes of the world; the prompt search uses its retrieval split (2 captions per image).
        n_prompts: first N of the shipped 50 candidates (None: all).
        next_token_inputs, attention_images: how many images (and captions) those views show.
        retention_scenes, retention_world_seed, retention_split: the scenes captioned (a world seed no model has
            seen; the train split has only colour-shape pairs the captioner learned).
        threads: torch CPU threads (None: the demo's default, one).
    """

    out: Path = Path("results/analysis")
    work: Path = Path("vladva_analysis_work")
    n_train: int = 4096
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 10
    seed: int = 0
    world_seed: int = 0
    n_test: int = 200
    n_prompts: int | None = None
    next_token_inputs: int = 4
    attention_images: int = 4
    retention_scenes: int = 64
    retention_world_seed: int = 7
    retention_split: str = "train"
    threads: int | None = None
    progress: bool = True


PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {"n_train": 2048, "epochs": 6, "n_test": 100, "retention_scenes": 32},
    "test": {"n_train": 64, "epochs": 1, "batch_size": 32, "warmup": 1, "n_test": 12, "n_prompts": 4,
             "next_token_inputs": 2, "attention_images": 1, "retention_scenes": 2},
}


def preset(name: str, **overrides: Any) -> MiniatureConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    known = {f.name for f in fields(MiniatureConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise TypeError(f"unknown settings {bad}")
    return MiniatureConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def _demo_config(cfg: MiniatureConfig):
    """The demo's own configuration (world, caption styles, caption lengths, threads) with this run's budget."""
    from ..demo.pipeline import preset as demo_preset

    budget = {k: getattr(cfg, k) for k in ("n_train", "n_test", "world_seed", "batch_size", "epochs", "lr",
                                            "warmup", "seed", "threads") if getattr(cfg, k) is not None}
    return demo_preset("default", out=cfg.work / "demo", pretrained=BASE_TAG, baseline=False, e5v=False,
                       generative=False, progress=cfg.progress, **budget)


def _base_file_digest(tag: str) -> str:
    """Hash of the shipped base the fine-tunes start from (a retrained captioner must retrain them)."""
    from ..registry import get_pretrained_cfg

    folder = Path(get_pretrained_cfg(MODEL_NAME, tag)["file"])
    digest = hashlib.blake2b(digest_size=16)
    with open(folder / "base_model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def training_key(demo_cfg, variant_key: str) -> str:
    """Everything that decides a fine-tune's weights (the demo's settings, the base's weights, the variant): a
    change retrains."""
    import vladva_openclip

    settings = {k: str(v) for k, v in demo_cfg.result_settings().items()}
    ident = {"demo": settings, "variant": variant_key, "version": vladva_openclip.__version__,
             "base": _base_file_digest(demo_cfg.pretrained)}
    return hashlib.blake2b(json.dumps(ident, sort_keys=True).encode(), digest_size=8).hexdigest()


def _stamp(adapter: Path) -> dict[str, Any]:
    path = adapter / STAMP
    return json.loads(path.read_text()) if path.is_file() else {}


def _fine_tuned_adapter(key: str, variant_key: str, cfg: MiniatureConfig, demo_cfg,
                        tables: dict[str, Path]) -> tuple[Path, dict[str, Any]]:
    """The fine-tune as an adapter directory with the captioner's base inside (``pretrained=`` loads it whole),
    and its training record; trained with ``vladva-train`` unless an adapter with the same training key is
    already there."""
    from .. import save_adapter
    from ..demo.pipeline import load_variant, train_variant
    from ..demo.variants import get_variant

    out = cfg.work / "adapters" / key
    wanted = training_key(demo_cfg, variant_key)
    record = _stamp(out)
    if record.get("training_key") == wanted:
        _logger.info("reusing the %s fine-tune in %s", key, out)
        return out, {**record, "reused": True}
    variant = get_variant(variant_key)
    table = tables["text_pairs" if variant.text_pairs else "vladva"]
    start = time.perf_counter()
    ckpt = train_variant(variant, table, demo_cfg, cfg.work / "runs", f"analysis-{key}")
    seconds = round(time.perf_counter() - start, 1)
    model, _, _ = load_variant(variant, demo_cfg, ckpt)
    save_adapter(model, out, include_base=True)
    record = {"training_key": wanted, "variant": variant_key, "label": variant.label,
              "train_seconds": seconds, "threads": torch.get_num_threads()}
    (out / STAMP).write_text(json.dumps(record, indent=1) + "\n")
    return out, {**record, "reused": False}


def model_refs(adapters: dict[str, Path]) -> list[ModelRef]:
    """base (the captioner, handcrafted prompts, no LoRA), then the fine-tunes."""
    base = ModelRef("base", MODEL_NAME, BASE_TAG, {"use_lora": False, "image_prompt_mode": "handcrafted",
                                                    "text_prompt_mode": "handcrafted"})
    return [base, *(ModelRef(k, MODEL_NAME, str(p)) for k, p in adapters.items())]


def _weights_digest(model) -> str:
    """Names the captioner's weights, so a summary computed on another shipped captioner shows it."""
    from ..eval.cache import weights_fingerprint

    return weights_fingerprint(model.lvlm)


def _prompt_headline(result) -> dict[str, Any]:
    """The recommended pair, the correlations with mean R@1, and where the recommendation lands in R@1."""
    mean_r1 = sorted((r.t2i_r1 + r.i2t_r1) / 2 for r in result.rows)
    best = result.ranked[0]
    return {"recommended": asdict(result.recommended), "score": result.score_name,
            "spearman_with_mean_R@1": {k: v["mean_R@1"] for k, v in result.correlations.items()},
            "mean_R@1": {"max": mean_r1[-1], "median": mean_r1[len(mean_r1) // 2], "min": mean_r1[0],
                         "recommended": (best.t2i_r1 + best.i2t_r1) / 2}}


@torch.no_grad()
def own_prompt_retrieval(model, preprocess, data, batch_size: int = 50) -> dict[str, float]:
    """R@1 both ways with the model's own prompts (a fine-tune's trained soft prompts): the reference the
    handcrafted candidates of the prompt search are compared with."""
    import torch.nn.functional as F

    from ..eval.metrics import retrieval_metrics
    from .data import image_batches

    images = torch.cat([F.normalize(model.encode_image(x), dim=-1)
                        for _, x in image_batches(data.images, preprocess, batch_size)])
    texts = torch.cat([F.normalize(model.encode_text(model.tokenizer(data.captions[i:i + batch_size])), dim=-1)
                       for i in range(0, len(data.captions), batch_size)])
    r = retrieval_metrics(images, texts, data.caption_image, ks=(1,))
    return {"t2i_R@1": r["t2i_R@1"], "i2t_R@1": r["i2t_R@1"]}


def run_miniature(cfg: MiniatureConfig) -> dict[str, Any]:
    """Train (or reuse) the fine-tunes, run the four analyses, write everything under ``cfg.out``:
    ``summary.json`` holds only numbers that are a function of the settings; wall-clock times go to
    ``timings.json``."""
    from ..demo.pipeline import fixed_threads

    demo_cfg = _demo_config(cfg)
    with fixed_threads(demo_cfg.threads):
        return _run(cfg, demo_cfg)


def _training_data(cfg: MiniatureConfig, demo_cfg):
    """(evaluation sets on disk, packed training tables); the training split is rendered only if some fine-tune
    has to be trained."""
    from ..demo.pipeline import build_demo_world, prepare_demo_data

    todo = [k for k, v in FINETUNES.items()
            if _stamp(cfg.work / "adapters" / k).get("training_key") != training_key(demo_cfg, v)]
    if not todo:
        return build_demo_world(demo_cfg, write_train=False), {}
    data = prepare_demo_data(demo_cfg)
    return data.paths, data.tables


def _run(cfg: MiniatureConfig, demo_cfg) -> dict[str, Any]:
    import open_clip

    from .attention import attention_maps
    from .data import load_analysis_data
    from .next_token import next_tokens
    from .prompt_search import PromptSearchConfig, apply_prompt_pair, search_prompts
    from .prompt_sets import default_prompt_pairs
    from .retention import RetentionConfig, caption_retention, world_scenes

    seconds: dict[str, float] = {}
    start = time.perf_counter()

    def timed(key: str, fn):
        t = time.perf_counter()
        result = fn()
        seconds[key] = round(time.perf_counter() - t, 1)
        _logger.info("miniature: %s done in %.0f s", key, seconds[key])
        return result

    paths, tables = timed("world", lambda: _training_data(cfg, demo_cfg))
    trained = {k: _fine_tuned_adapter(k, v, cfg, demo_cfg, tables) for k, v in FINETUNES.items()}
    adapters = {k: path for k, (path, _) in trained.items()}
    models = load_models(model_refs(adapters))
    data = load_analysis_data(paths.retrieval_json, paths.retrieval_json.parent)
    out = Path(cfg.out)

    pairs = default_prompt_pairs()[: cfg.n_prompts]
    base_model, base_pre = models["base"]
    prompts = timed("prompts", lambda: search_prompts(
        base_model, base_pre, data, pairs, PromptSearchConfig(batch_size=50, progress=cfg.progress),
        model_id=f"{MODEL_NAME}:{BASE_TAG}"))
    files = {"prompts": prompts.save(out / "prompts")}
    # The same search on the VladVA fine-tune's weights (each candidate replacing its trained soft prompts): there
    # retrieval is far from chance, so whether entropy and rank predict it can show.
    ft_model, ft_pre = models["vladva"]
    prompts_ft = timed("prompts_vladva", lambda: search_prompts(
        ft_model, ft_pre, data, pairs, PromptSearchConfig(batch_size=50, progress=cfg.progress),
        model_id=f"{MODEL_NAME}:vladva-fine-tune"))
    files["prompts_vladva"] = prompts_ft.save(out / "prompts_vladva")
    applied = apply_prompt_pair(base_model, prompts.recommended, cfg.work / "applied_prompts")
    check = open_clip.create_model(MODEL_NAME, pretrained=str(applied))
    applied_ok = (check.cfg.image_prompt.text, check.cfg.text_prompt.text) == (prompts.recommended.image,
                                                                              prompts.recommended.text)

    n = cfg.next_token_inputs
    tokens = timed("next_token", lambda: next_tokens(models, data, image_indices=list(range(n)),
                                                      caption_indices=list(range(0, 2 * n, 2)), k=10))
    files["next_token"] = tokens.save(out / "next_token")
    attn = timed("attention", lambda: attention_maps(models, data,
                                                      image_indices=list(range(cfg.attention_images))))
    files["attention"] = attn.save(out / "attention")
    # References in the fine-tunes' long-caption style, and in the other style as a second set (a model that only
    # adapted its style and one that forgot how to describe differ there).
    style = demo_cfg.long_captions
    scenes = world_scenes(cfg.retention_scenes, cfg.retention_world_seed, cfg.retention_split, long_captions=style,
                          extra_styles=[s for s in LONG_STYLES if s != style])
    retention = timed("retention", lambda: caption_retention(models, scenes, RetentionConfig(progress=cfg.progress)))
    files["retention"] = retention.save(out / "retention")

    seconds["total"] = round(time.perf_counter() - start, 1)
    write_json(out / "timings.json", {
        "seconds": seconds, "fine_tune_seconds": {k: r.get("train_seconds") for k, (_, r) in trained.items()},
        "fine_tunes_reused": {k: r["reused"] for k, (_, r) in trained.items()},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "machine": platform.machine()}})
    headline = {
        "prompts": {**_prompt_headline(prompts), "applied_adapter_loads_with_the_pair": applied_ok},
        "prompts_vladva": _prompt_headline(prompts_ft),
        "own_prompt_retrieval": {k: own_prompt_retrieval(m, p, data) for k, (m, p) in models.items()},
        "next_token": tokens.summary,
        "attention": attn.summary(),
        "retention": retention.summary,
    }
    summary = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()
                          if k not in ("out", "work", "progress")},
               "models": {r.label: {"name": r.name, "pretrained": Path(r.pretrained).name if r.pretrained else None,
                                    "kwargs": r.kwargs} for r in model_refs(adapters)},
               "fine_tunes": {k: {"variant": v, "label": trained[k][1].get("label")} for k, v in FINETUNES.items()},
               "demo_settings": {k: str(v) for k, v in demo_cfg.result_settings().items()},
               "captioner_weights": _weights_digest(models["base"][0]),
               "headline": headline,
               "files": {k: {n: str(Path(p).relative_to(out)) for n, p in v.items()} for k, v in files.items()}}
    write_json(out / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vladva_openclip.analysis.miniature", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=MiniatureConfig.out)
    p.add_argument("--work", type=Path, default=MiniatureConfig.work)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = preset(args.preset, out=args.out, work=args.work, threads=args.threads, progress=args.progress)
    print(json.dumps(run_miniature(replace(cfg))["headline"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
