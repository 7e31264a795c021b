"""Build a whole synthetic world on disk in one call: training data (table + shards) and evaluation sets.

Layout under ``out_dir``::

    world.json                              config and counts (provenance)
    train/train.tsv                         filepath, short_caption, long_caption (+ caption, paraphrase with
                                            text_pairs=True); paths relative to train/
    train/images/000000.png ...
    train/shards/shard-000000.tar ...       png, txt (short), long.txt (long); sizes.json
    eval/test.tsv                           held-out split, same columns (a --val-data for training)
    eval/images/test_000000.png ...         the test images, shared by every eval set below
    eval/dataset_synth.json                 Karpathy retrieval file (filepath "images", split "test")
    eval/sugar_crepe/<subset>.json          SugarCrepe format, filenames relative to eval/images
    eval/sugar_crepe_pp/<subset>.json       SugarCrepe++ format, filenames relative to eval/images
    eval/winoground/examples.jsonl          Winoground format
    eval/winoground/images/ex_<id>_img_<k>.png
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..progress import progress as tqdm
from .config import WorldConfig
from .negatives import SUGARCREPE_PP_SUBSETS, SUGARCREPE_SUBSETS
from .render import png_bytes
from .world import World
from .writers import (
    ShardWriter,
    write_karpathy_json,
    write_sugarcrepe,
    write_sugarcrepe_pp,
    write_table,
    write_winoground_jsonl,
)

_logger = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("filepath", "short_caption", "long_caption")
#: extra training-table columns with ``text_pairs=True``: a detailed caption and its paraphrase (E5-V-style pairs)
PAIR_COLUMNS = ("caption", "paraphrase")


@dataclass
class WorldPaths:
    """Where :func:`build_world` put everything (None for parts that were not written).

    ``train_shards`` is a brace pattern usable as open_clip's ``--train-data`` for ``--dataset-type webdataset``.
    """

    root: Path
    config_json: Path
    train_csv: Path | None = None
    train_images: Path | None = None
    train_shards: str | None = None
    train_shard_files: list[Path] = field(default_factory=list)
    test_csv: Path | None = None
    eval_images: Path | None = None
    retrieval_json: Path | None = None
    sugarcrepe_dir: Path | None = None
    sugarcrepe_pp_dir: Path | None = None
    winoground_dir: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)


def _table_row(columns: tuple[str, str, str], filepath: str, short: str, long: str) -> dict[str, str]:
    return dict(zip(columns, (filepath, short, long)))


def build_world(
    out_dir: str | Path,
    n_train: int = 1000,
    n_test: int = 200,
    seed: int | None = None,
    *,
    config: WorldConfig | None = None,
    n_winoground: int | None = None,
    shard_size: int = 1000,
    write_csv: bool = True,
    write_wds: bool = True,
    write_eval: bool = True,
    sep: str = "\t",
    columns: tuple[str, str, str] = DEFAULT_COLUMNS,
    text_pairs: bool = False,
    progress: bool = True,
) -> WorldPaths:
    """Render ``n_train`` training and ``n_test`` test scenes and write the files listed in the module docstring.

    Args:
        seed: overrides ``config.seed`` when given.
        n_winoground: Winoground pairs (default ``max(1, n_test // 2)``); 0 skips the set.
        sep: separator of the tables (``"\\t"`` matches open_clip's default ``--csv-separator``).
        columns: names of the (image path, short caption, long caption) columns.
        text_pairs: add :data:`PAIR_COLUMNS` to the training table (:meth:`World.text_pair`).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"sample counts must be >= 0, got n_train={n_train}, n_test={n_test}")
    if len(set(columns)) != 3:
        raise ValueError(f"columns must be three distinct names, got {columns}")
    config = config or WorldConfig()
    if seed is not None:
        config = config.with_(seed=seed)
    world = World(config)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    ext = "csv" if sep == "," else "tsv"
    paths = WorldPaths(root=root, config_json=root / "world.json")

    if n_train and (write_csv or write_wds):
        paths.counts["train"] = n_train
        train_dir = root / "train"
        rows = []
        writer = ShardWriter(train_dir / "shards", shard_size) if write_wds else None
        if write_csv:
            paths.train_images = train_dir / "images"
            paths.train_images.mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(n_train), desc="synth train", disable=not progress):
            s = world.sample("train", i)
            png = png_bytes(world.render(s.scene))
            if write_csv:
                name = f"{i:06d}.png"
                (paths.train_images / name).write_bytes(png)
                rows.append(_table_row(columns, f"images/{name}", s.short, s.long))
                if text_pairs:
                    rows[-1].update(zip(PAIR_COLUMNS, world.text_pair("train", i)))
            if writer is not None:
                writer.write(f"{i:06d}", {"png": png, "txt": s.short, "long.txt": s.long})
        if write_csv:
            paths.train_csv = write_table(rows, train_dir / f"train.{ext}", sep=sep)
        if writer is not None:
            writer.close()
            paths.train_shards = writer.brace_pattern()
            paths.train_shard_files = list(writer.shards)

    if write_eval and n_test:
        _write_eval(world, root / "eval", n_test, sep, ext, columns, paths, progress)
        n_wino = max(1, n_test // 2) if n_winoground is None else n_winoground
        if n_wino:
            _write_winoground(world, root / "eval" / "winoground", n_wino, paths, progress)

    paths.config_json.write_text(json.dumps({"config": asdict(config), "counts": paths.counts}, indent=1))
    _logger.info("synthetic world written to %s: %s", root, paths.counts)
    return paths


def _write_eval(world: World, eval_dir: Path, n_test: int, sep: str, ext: str, columns: tuple[str, str, str],
                paths: WorldPaths, progress: bool) -> None:
    images = eval_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, retrieval = [], []
    crepe: dict[str, list] = {k: [] for k in SUGARCREPE_SUBSETS}
    crepe_pp: dict[str, list] = {k: [] for k in SUGARCREPE_PP_SUBSETS}
    for i in tqdm(range(n_test), desc="synth test", disable=not progress):
        s = world.sample("test", i)
        name = f"test_{i:06d}.png"
        (images / name).write_bytes(png_bytes(world.render(s.scene)))
        rows.append(_table_row(columns, f"images/{name}", s.short, s.long))
        retrieval.append(("images", name, world.retrieval_captions(s)))
        para = world.paraphrase(s)
        for kind, neg in world.negatives(s).items():
            crepe[kind].append((name, s.short, neg))
            if kind in crepe_pp:
                crepe_pp[kind].append((name, s.short, para, neg))
    paths.eval_images = images
    paths.test_csv = write_table(rows, eval_dir / f"test.{ext}", sep=sep)
    paths.retrieval_json = write_karpathy_json(eval_dir / "dataset_synth.json", retrieval)
    write_sugarcrepe(eval_dir / "sugar_crepe", crepe)
    write_sugarcrepe_pp(eval_dir / "sugar_crepe_pp", crepe_pp)
    paths.sugarcrepe_dir, paths.sugarcrepe_pp_dir = eval_dir / "sugar_crepe", eval_dir / "sugar_crepe_pp"
    paths.counts["test"] = n_test
    paths.counts.update({f"sugar_crepe/{k}": len(v) for k, v in crepe.items()})


def _write_winoground(world: World, wino_dir: Path, n: int, paths: WorldPaths, progress: bool) -> None:
    images = wino_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(n), desc="synth winoground", disable=not progress):
        ex = world.winoground(i)
        for k in (0, 1):
            (images / f"{ex.image_name(k)}.png").write_bytes(png_bytes(world.render(ex.scenes[k])))
        records.append(ex.record())
    write_winoground_jsonl(wino_dir / "examples.jsonl", records)
    paths.winoground_dir = wino_dir
    paths.counts["winoground"] = n
