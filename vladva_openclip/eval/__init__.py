"""Evaluation harness: zero-shot retrieval, SugarCrepe, SugarCrepe++, Winoground and zero-shot classification for
any open_clip model (VladVA or CLIP), with cached embeddings, tie-safe metrics and paper-style reports.

Python::

    from vladva_openclip.eval import evaluate, RetrievalTask, WinogroundTask
    results = evaluate(model, preprocess, tokenizer,
                       [RetrievalTask(data="dataset_flickr30k.json", images="flickr30k-images"),
                        {"task": "winoground", "data": "winoground/examples.jsonl"}],
                       device="cuda", precision="amp_bf16", batch_size=64, cache_dir="~/.cache/emb")
    results["flickr30k"]["metrics"]["t2i_R@1"]

Command line: ``vladva-eval --help`` (or ``python -m vladva_openclip.eval``); CLIP_benchmark with the plugin
registered: ``vladva-clip-benchmark eval ...``.
"""
from .api import ModelLoadError, ModelSpec, evaluate, evaluate_models, load_model, parse_model_spec, prepare_tasks
from .embed import EmbedConfig, Embedder
from .errors import AnnotationError, EmptyDatasetError, EvalDataError, MissingImagesError
from .report import Report
from .tasks import (
                    TASKS,
                    Column,
                    RetrievalTask,
                    SugarCrepePPTask,
                    SugarCrepeTask,
                    Task,
                    WinogroundTask,
                    ZeroShotClassificationTask,
                    build_task,
                    register_task,
)

__all__ = [
                    "TASKS",
                    "AnnotationError",
                    "Column",
                    "EmbedConfig",
                    "Embedder",
                    "EmptyDatasetError",
                    "EvalDataError",
                    "MissingImagesError",
                    "ModelLoadError",
                    "ModelSpec",
                    "Report",
                    "RetrievalTask",
                    "SugarCrepePPTask",
                    "SugarCrepeTask",
                    "Task",
                    "WinogroundTask",
                    "ZeroShotClassificationTask",
                    "build_task",
                    "evaluate",
                    "evaluate_models",
                    "load_model",
                    "parse_model_spec",
                    "prepare_tasks",
                    "register_task",
]
