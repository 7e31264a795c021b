"""vladva-eval: several models x several tasks in one run; JSON + Markdown results.

Options after a ``--task TYPE`` apply to that task, until the next ``--task``::

    vladva-eval --model vladva-llava7b:adapter.safetensors --model ViT-L-14:openai \\
        --task retrieval --data flickr30k/dataset_flickr30k.json --images flickr30k/images \\
        --task retrieval --data coco/dataset_coco.json --images coco --name coco \\
        --task sugarcrepe --data sugar_crepe/ --images coco/val2017 \\
        --task imagenet --data imagenet/val \\
        --device cuda --precision amp_bf16 --batch-size 64 --output-dir results/
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .api import ModelLoadError, evaluate_models, parse_model_spec, prepare_tasks
from .cache import default_cache_dir
from .embed import PRECISIONS
from .errors import EvalDataError
from .generative import check_generative_tasks
from .tasks import TASKS

__all__ = ["build_parser", "main"]

#: per-task options: flag -> (config field, converter, help)
_TASK_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "--data": ("data", str, "annotation file or folder (ImageFolder root for imagenet)"),
    "--images": ("images", str, "images folder (default: next to the annotations)"),
    "--name": ("name", str, "label in the results (default: from the task or file name)"),
    "--split": ("split", str, "Karpathy split (retrieval, default test) or saved-dataset split (winoground)"),
    "--subsets": ("subsets", lambda s: tuple(x for x in s.split(",") if x), "comma-separated SugarCrepe(++) subsets"),
    "--classnames": ("classnames", str, "imagenet: class-name file (JSON list or one per line)"),
    "--templates": ("templates", str, "imagenet: openai (80), simple (7), or a file"),
    "--domain": ("domain", str, "nocaps domain filter: in-domain, near-domain, out-domain"),
}


class _NewTask(argparse.Action):
    def __call__(self, parser, namespace, value, option_string=None):
        if value not in TASKS:
            parser.error(f"unknown task {value!r}; available: {', '.join(sorted(TASKS))}")
        namespace.tasks.append({"task": value})


class _TaskOption(argparse.Action):
    """Stores a value into the most recent --task."""

    def __init__(self, *args, field: str, convert: Any = str, **kwargs):
        super().__init__(*args, **kwargs)
        self.field, self.convert = field, convert

    def __call__(self, parser, namespace, value, option_string=None):
        if not namespace.tasks:
            parser.error(f"{option_string} must follow the --task it applies to")
        if self.field == "*":  # --set key=value (value parsed as JSON when it can be)
            key, sep, raw = value.partition("=")
            if not sep or not key:
                parser.error(f"--set expects KEY=VALUE, got {value!r}")
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                parsed = raw
            namespace.tasks[-1][key] = tuple(parsed) if isinstance(parsed, list) else parsed
        else:
            namespace.tasks[-1][self.field] = self.convert(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vladva-eval", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1])
    p.set_defaults(tasks=[])
    p.add_argument("--model", action="append", default=[], metavar="NAME[:PRETRAINED]", type=parse_model_spec,
                   help="open_clip model name, optionally with a pretrained tag or checkpoint file; repeatable")
    p.add_argument("--model-config-dir", action="append", default=[], metavar="DIR",
                   help="extra open_clip model-config JSON folder (open_clip.add_model_config); repeatable")
    t = p.add_argument_group("tasks (repeat --task; the options below apply to the last --task)")
    aliases: dict[str, list[str]] = {}
    for key, cls in TASKS.items():
        aliases.setdefault(cls.task_type, []).extend([key] if key != cls.task_type else [])
    types = "; ".join(k + (f" (or {', '.join(a)})" if a else "") for k, a in aliases.items())
    t.add_argument("--task", action=_NewTask, metavar="TYPE", help=f"start a task: {types}")
    for flag, (fld, conv, text) in _TASK_OPTIONS.items():
        t.add_argument(flag, action=_TaskOption, field=fld, convert=conv, metavar=fld.upper(), default=None,
                       dest=f"_task_{fld}", help=text)
    t.add_argument("--set", action=_TaskOption, field="*", metavar="KEY=VALUE", dest="_task_set", default=None,
                   help="any other task option, e.g. --set recall_k=[1,5,10]")
    t.add_argument("--tasks-file", metavar="JSON", help='a JSON list of {"task": TYPE, ...} added before --task')
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: %(default)s")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="amp/amp_bf16: autocast; fp16/bf16/pure_*: weights cast by open_clip. A VladVA base is "
                        "loaded straight in bf16 for amp_bf16/bf16/pure_bf16 (fp16 for fp16/pure_fp16)")
    p.add_argument("--batch-size", type=int, default=64, help="images or texts per forward (default: %(default)s)")
    p.add_argument("--scoring", choices=("embedding", "generative"), default="embedding",
                   help="embedding: cosine of the image and text embeddings; generative: the LVLM's own "
                        "log-likelihood of each caption given the image (VladVA models; sugarcrepe, sugarcrepe_pp "
                        "ITT and winoground only)")
    p.add_argument("--workers", type=int, default=4, help="image-decoding worker processes")
    p.add_argument("--cache-dir", default=str(default_cache_dir()), help="embedding cache (default: %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--skip-missing", action="store_true",
                   help="evaluate without missing or unreadable (corrupt) images instead of stopping; results.json "
                        "counts them per task (n_missing_images, n_unreadable_images)")
    p.add_argument("--output-dir", default="vladva_eval_results", help="results.json and results.md go here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="warnings only; do not print the table")
    return p


def read_tasks_file(path: str | Path) -> list[dict[str, Any]]:
    """``--tasks-file``: a JSON list of ``{"task": TYPE, ...}`` objects; AnnotationError naming the file and entry."""
    from ._jsonio import as_path, read_json
    from .errors import AnnotationError

    path = as_path(path, "--tasks-file")
    try:
        specs = read_json(path)
    except (OSError, UnicodeDecodeError) as err:
        raise AnnotationError(path, None, f"cannot be read as UTF-8 JSON ({err})") from None
    if not isinstance(specs, list):
        raise AnnotationError(path, None, f'expected a JSON list of {{"task": TYPE, ...}} objects, got a '
                                          f"{type(specs).__name__}")
    for i, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise AnnotationError(path, f"[{i}]", f'expected an object {{"task": TYPE, ...}}, got '
                                                  f"{type(spec).__name__}")
        if spec.get("task") not in TASKS:
            raise AnnotationError(path, f"[{i}]", f"unknown task type {spec.get('task')!r}; available: "
                                                  f"{', '.join(sorted(TASKS))}")
    return specs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    if not args.model:
        print("vladva-eval: give at least one --model", file=sys.stderr)
        return 2
    tasks: list[dict[str, Any]] = []
    if args.tasks_file:
        try:
            tasks.extend(read_tasks_file(args.tasks_file))
        except EvalDataError as err:
            print(f"vladva-eval: error: {err}", file=sys.stderr)
            return 2
    tasks.extend(args.tasks)
    if not tasks:
        print("vladva-eval: give at least one --task (or --tasks-file)", file=sys.stderr)
        return 2
    if args.skip_missing:
        for spec in tasks:
            config_cls = TASKS[spec["task"]].Config if spec.get("task") in TASKS else None
            if config_cls and "skip_missing" in {f.name for f in dataclasses.fields(config_cls)}:
                spec.setdefault("skip_missing", True)
    if args.model_config_dir:
        import open_clip

        for d in args.model_config_dir:
            open_clip.add_model_config(d)
    try:  # read every task's data before building any model: bad input fails fast, with a message
        prepared = prepare_tasks(tasks)
        if args.scoring == "generative":
            check_generative_tasks(prepared)
    except (EvalDataError, TypeError, ValueError) as err:
        print(f"vladva-eval: error: {err}", file=sys.stderr)
        return 2
    try:  # results.json is rewritten after every task, so whatever stops the run, the finished tasks are kept
        report = evaluate_models(args.model, prepared, device=args.device, precision=args.precision,
                                 batch_size=args.batch_size, num_workers=args.workers,
                                 cache_dir=None if args.no_cache else args.cache_dir, progress=not args.no_progress,
                                 output_dir=args.output_dir, scoring=args.scoring)
    except (ModelLoadError, EvalDataError) as err:
        results = Path(args.output_dir) / "results.json"
        if results.is_file():  # written by evaluate_models as the run stopped
            print(f"vladva-eval: results of the tasks that finished: {results}", file=sys.stderr)
        print(f"vladva-eval: error: {err}", file=sys.stderr)
        return 2
    json_path, md_path = report.save(args.output_dir)
    if not args.quiet:
        print(report.to_markdown())
        print(f"results: {json_path} and {md_path}")
    return 0
