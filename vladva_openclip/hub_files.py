"""The files that make an adapter directory a hub repository: ``open_clip_config.json`` and the model card.

Kept apart from :mod:`.hub` (name resolution, download, upload) so that :mod:`.adapters` can write them when it saves
(``save_adapter(..., model_card=True)``) while :mod:`.hub` builds on :mod:`.adapters`: no import runs both ways.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIG_NAME = "open_clip_config.json"
CARD_NAME = "README.md"
HUB_FORMAT_VERSION = 1


def open_clip_config(model) -> dict[str, Any]:
    """The ``open_clip_config.json`` of ``model``'s repository (open_clip's layout plus a ``vladva`` block)."""
    from .registry import get_vladva_config

    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    preprocess = {k: pp[k] for k in ("size", "mode", "mean", "std", "interpolation", "resize_mode", "fill_color")
                  if k in pp}
    return {"model_cfg": get_vladva_config(model.model_name), "preprocess_cfg": preprocess,
            "vladva": {"model_name": model.model_name, "format_version": HUB_FORMAT_VERSION}}


def _training_flags(training: Mapping[str, Any] | str | os.PathLike | None) -> dict[str, Any]:
    """A mapping as is, or open_clip_train's ``params.txt`` (``name: value`` lines) read from a path."""
    if training is None:
        return {}
    if isinstance(training, Mapping):
        return dict(training)
    flags = {}
    for line in Path(training).read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            flags[key.strip()] = value.strip()
    return flags


def _results_markdown(results: Any, label: str) -> str:
    """A vladva-eval report as Markdown: a Report, its results.json (path or dict), or evaluate()'s dict."""
    from .eval.report import Report

    if results is None:
        return ""
    if isinstance(results, (str, os.PathLike)):
        results = json.loads(Path(results).read_text(encoding="utf-8"))
    if isinstance(results, Report):
        return results.to_markdown()
    report = Report()
    if "results" in results:  # results.json: {"results": {model: {task name: {...}}}}
        for model_label, tasks in results["results"].items():
            for name, r in tasks.items():
                report.add(model_label, {"name": name, **r})
    else:  # evaluate(): {task name: {"task", "name", "metrics", ...}}
        for r in results.values():
            report.add(label, r)
    return report.to_markdown()


def _md_table(rows: Mapping[str, Any]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    return ["| | |", "|---|---|", *(f"| {cell(k)} | {cell(v)} |" for k, v in rows.items())]


def model_card(model, *, repo_id: str | None = None, training: Mapping[str, Any] | str | os.PathLike | None = None,
               results: Any = None, license: str | None = None) -> str:
    """The README.md of an adapter repository: YAML front matter for the Hub, then usage, base model, recipe,
    training flags and (if given) the evaluation table."""
    import math

    cfg = model.cfg
    name = model.model_name
    ref = f"hf-hub:{repo_id}" if repo_id else name
    front = ["---", "library_name: open_clip", "pipeline_tag: zero-shot-image-classification",
             "tags: [vladva, clip, open_clip, lora, vision-language]"]
    if cfg.base_model:
        front.append(f"base_model: {cfg.base_model}")
    if license:
        front.append(f"license: {license}")
    front.append("---")
    recipe = {
        "model": f"`{name}` ({cfg.backbone} backbone, embedding dim {model.embed_dim}, image size {cfg.image_size})",
        "method": "VladVA (arXiv 2412.04378): contrastive loss on short captions + next-token loss on long captions",
        "embedding": "final hidden state of the last token after the prompt",
        "LoRA": (f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, targets "
                 f"`{cfg.lora.target_modules}`" if cfg.lora.enabled else "off (prompts only)"),
        "image prompt": f"{cfg.image_prompt.text!r} ({cfg.image_prompt.mode})",
        "text prompt": f"{cfg.text_prompt.text!r} ({cfg.text_prompt.mode})",
        "logit scale": f"{math.exp(float(model.logit_scale.detach())):.2f}",
    }
    lines = [*front, "", f"# {repo_id or name}", "",
             (f"A VladVA adapter for `{cfg.base_model or name}`: the generative LVLM turned into a CLIP-like "
              "embedding model, used through open_clip's API with `vladva_openclip`."), "", "## Usage", "",
             "```python", "import open_clip", "import vladva_openclip  # registers the VladVA models with open_clip",
             "", f'model, _, preprocess = open_clip.create_model_and_transforms("{ref}")',
             f'tokenizer = open_clip.get_tokenizer("{ref}")', "```", ""]
    if repo_id:
        lines += [f'Or by model name: `open_clip.create_model("{name}", pretrained="hf-hub:{repo_id}")`.', ""]
    lines += ["## Base model", "",
              f"`{cfg.base_model}` (loaded from the Hugging Face Hub or `VLADVA_BASE_DIR`; this repository holds "
              "only the adapter: LoRA in peft's format, soft prompts and the logit scale)." if cfg.base_model else
              f"`{name}`'s base weights are built from its registered configuration.", "",
              "## Recipe", "", *_md_table(recipe), ""]
    flags = _training_flags(training)
    if flags:
        lines += ["## Training flags", "", *_md_table(flags), ""]
    table = _results_markdown(results, repo_id or name)
    if table:
        lines += ["## Evaluation (vladva-eval)", "", table.rstrip(), ""]
    return "\n".join(lines) + "\n"


def write_hub_files(model, path: str | os.PathLike, *, repo_id: str | None = None,
                    training: Mapping[str, Any] | str | os.PathLike | None = None, results: Any = None,
                    license: str | None = None) -> None:
    """Add ``open_clip_config.json`` and ``README.md`` to the adapter directory ``path``."""
    path = Path(path)
    (path / CONFIG_NAME).write_text(json.dumps(open_clip_config(model), indent=2) + "\n", encoding="utf-8")
    (path / CARD_NAME).write_text(model_card(model, repo_id=repo_id, training=training, results=results,
                                             license=license), encoding="utf-8")
