"""Why the embedding models miss word order: the same pairs scored by embeddings and by the LVLM's own likelihood.

For the captioner and for fine-tunes of it (checkpoints of an ablation run), every SugarCrepe / SugarCrepe++ /
Winoground pair is scored twice: by cosine of the summary-token embeddings (``scoring="embedding"``) and by the
model's log-likelihood of the caption given the image (``scoring="generative"``, :mod:`vladva_openclip.eval.generative`).

- likelihood right, embedding wrong: the embedding path loses what the LVLM knows;
- both wrong: the LVLM never had it.

Two evaluation worlds: the demo's test split, where every scene holds a colour-shape pair never seen in training
(compositional generalisation), and a control in which the test scenes come from the training distribution
(``heldout=()``), which separates "cannot bind" from "prefers the familiar pair".

    python -m vladva_openclip.demo.diagnose --runs ablation_out/seed0/runs --out results/generative.json
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from .pipeline import DemoConfig, fixed_threads, generative_tasks, load_variant, parse_settings
from .variants import get_variant

_logger = logging.getLogger(__name__)

#: columns of the diagnostic: (task, metric)
METRICS: tuple[tuple[str, str], ...] = (
    ("sugarcrepe", "replace"), ("sugarcrepe", "swap_obj"), ("sugarcrepe", "swap_att"), ("sugarcrepe", "add"),
    ("sugarcrepe_pp", "avg_itt"), ("winoground", "text"), ("winoground", "image"), ("winoground", "group"),
)


def _worlds(cfg: DemoConfig, out: Path):
    from ..synth import build_world

    base = cfg.world_config()
    return {"held-out pairs (the demo's test split)": build_world(out / "heldout", n_train=0, n_test=cfg.n_test,
                                                                   config=base, write_wds=False, progress=False),
            "control: training distribution": build_world(out / "iid", n_train=0, n_test=cfg.n_test,
                                                          config=base.with_(heldout=()), write_wds=False,
                                                          progress=False)}


def _models(cfg: DemoConfig, runs: Path | None, variants: tuple[str, ...]):
    """(label, model, preprocess, tokenizer, generative model or None) per model to diagnose."""
    from .pretrain_captioner import build_captioner

    zs = get_variant("zero-shot")
    captioner, _, cap_pre = build_captioner(cfg.pretrained)
    yield ("captioner", *load_variant(zs, cfg), (captioner.eval(), cap_pre, captioner.tokenizer))
    for key in variants:
        ckpt = runs / key / "checkpoints" / f"epoch_{cfg.epochs}.pt" if runs else None
        if ckpt is None or not ckpt.is_file():
            _logger.warning("no checkpoint for %s under %s: skipped", key, runs)
            continue
        model, pre, tok = load_variant(get_variant(key), cfg, ckpt)
        yield (get_variant(key).label, model, pre, tok, (model, pre, tok))


def diagnose(cfg: DemoConfig, runs: Path | None, out_dir: Path,
             variants: tuple[str, ...] = ("lora-soft-prompt", "vladva")) -> dict[str, Any]:
    """Every model x world x scoring on the pair tasks; ``{"rows": [...]}`` with the :data:`METRICS`."""
    from ..eval.api import evaluate

    rows = []
    start = time.perf_counter()
    with fixed_threads(cfg.threads):
        worlds = _worlds(cfg, out_dir)
        for label, model, pre, tok, gen in _models(cfg, runs, variants):
            for world, paths in worlds.items():
                tasks = generative_tasks(paths)  # the pair tasks, scored both ways
                for scoring, parts in (("embedding", (model, pre, tok)), ("generative", gen)):
                    res = evaluate(*parts, tasks, device="cpu", batch_size=cfg.eval_batch_size, progress=False,
                                   scoring=scoring)
                    rows.append({"model": label, "world": world, "scoring": scoring,
                                 **{f"{t} {m}": res[t]["metrics"].get(m) for t, m in METRICS}})
                    _logger.info("%s / %s / %s: %s", label, world, scoring, rows[-1])
    return {"config": cfg.result_settings(), "runs": str(runs) if runs else None,
            "seconds": round(time.perf_counter() - start, 1), "metrics": [f"{t} {m}" for t, m in METRICS],
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    headers = ["SC replace", "SC swap obj", "SC swap att", "SC add", "SC++ ITT", "Wino text", "Wino image",
               "Wino group"]
    lines = ["| Model | eval scenes | scoring | " + " | ".join(headers) + " |",
             "|---|---|---|" + "---:|" * len(headers)]
    for r in result["rows"]:
        cells = ["–" if r[m] is None else f"{r[m]:.1f}" for m in result["metrics"]]
        lines.append(f"| {r['model']} | {r['world']} | {r['scoring']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=None,
                   help="an ablation seed's runs/ folder (its fine-tunes' checkpoints); none: the captioner only")
    p.add_argument("--variants", nargs="+", default=["lora-soft-prompt", "vladva"])
    p.add_argument("--seed", type=int, default=0, help="world and training seed of those runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="a demo setting of those runs")
    p.add_argument("--work", type=Path, default=Path("diagnose_work"))
    p.add_argument("--out", type=Path, default=Path("generative.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = parse_settings(args.set)
    cfg = DemoConfig(world_seed=args.seed, seed=args.seed, progress=False, **overrides)
    torch.manual_seed(0)
    result = diagnose(cfg, args.runs, args.work, tuple(args.variants))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
