"""Training data pipeline: packed (short, long) captions, table/webdataset/synthetic datasets, faults, order."""
from __future__ import annotations

import logging
import random
import types
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from open_clip_train.data import DataInfo
from PIL import Image

from vladva_openclip.synth import ShardWriter, World, WorldConfig, build_world, png_bytes
from vladva_openclip.train._common import CaptionPacker, sample_seed, seeded_transform
from vladva_openclip.train.data import (
    CaptionTableDataset,
    SkipCounter,
    VladVADataInfo,
    get_data,
    pack_captions,
    resolve_dataset_type,
)

PAD = 0
SHORT_LEN, LONG_LEN = 8, 24
IMG = 16


class FakeTokenizer:
    """The project's tokenizer protocol: texts -> LongTensor [B, context_length], right-padded with pad_token_id."""

    pad_token_id = PAD

    def __call__(self, texts, context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or 16
        out = torch.full((len(texts), length), PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [1] + [zlib.crc32(w.encode()) % 997 + 3 for w in text.lower().split()] + [2]
            ids = ids[:length]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


TOK = FakeTokenizer()


def preprocess(img: Image.Image) -> torch.Tensor:
    """Resize to IMG x IMG and scale to [0, 1]: a stand-in for the model's transform, [3, IMG, IMG]."""
    arr = np.asarray(img.convert("RGB").resize((IMG, IMG), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def augment(img: Image.Image) -> torch.Tensor:
    """A random train transform drawing from torch's, Python's and NumPy's global RNGs."""
    return preprocess(img) + torch.rand(()) + random.random() + float(np.random.rand())


def make_args(**kw) -> types.SimpleNamespace:
    base = dict(
        train_data=None, val_data=None, dataset_type="auto", csv_img_key="filepath", csv_caption_key="short_caption",
        csv_separator="\t", batch_size=4, workers=0, seed=0, distributed=False, world_size=1, rank=0,
        train_num_samples=None, val_num_samples=None, dataset_resampled=False, train_data_upsampling_factors=None,
        imagenet_val=None, imagenet_v2=None, long_caption_key="long_caption", wds_caption_key="txt",
        wds_long_caption_key="long.txt", max_short_len=SHORT_LEN, max_long_len=LONG_LEN, synthetic_size=12,
        synthetic_image_size=32,
    )
    base.update(kw)
    return types.SimpleNamespace(**base)


def expected_texts(short: str, long: str | None) -> torch.Tensor:
    out = torch.full((2, LONG_LEN), PAD, dtype=torch.long)
    out[0, :SHORT_LEN] = TOK([short], context_length=SHORT_LEN)[0]
    if long:
        out[1] = TOK([long], context_length=LONG_LEN)[0]
    return out


def epoch_captions(info: DataInfo, epoch: int) -> list[tuple[int, ...]]:
    """Each sample's short-caption ids (as tuples) in the order one epoch delivers them."""
    info.set_epoch(epoch)
    out = []
    for images, texts in info.dataloader:
        assert images.shape[1:] == (3, IMG, IMG) and texts.shape[1:] == (2, LONG_LEN)
        out += [tuple(t[0].tolist()) for t in texts]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), n_train=16, n_test=0, seed=0, shard_size=4,
                       write_eval=False, progress=False)


# ------------------------------------------------------------------------------------------------ packing

def test_pack_captions_layout():
    short = torch.tensor([5, 6, 7, PAD])
    long = torch.tensor([9, 8, 7, 6, 5])
    packed = pack_captions(short, long, 8, PAD)
    assert packed.dtype == torch.long and packed.shape == (2, 8)
    assert packed[0].tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert packed[1].tolist() == [9, 8, 7, 6, 5, 0, 0, 0]
    no_long = pack_captions(short, None, 8, pad_id=-1)
    assert no_long[1].tolist() == [-1] * 8 and no_long[0].tolist() == [5, 6, 7, 0, -1, -1, -1, -1]


def test_pack_captions_rejects_bad_input():
    with pytest.raises(ValueError, match="short caption has 9 tokens"):
        pack_captions(torch.ones(9, dtype=torch.long), None, 8, PAD)
    with pytest.raises(ValueError, match="1-D"):
        pack_captions(torch.ones(1, 4, dtype=torch.long), None, 8, PAD)


def test_packer_uses_both_context_lengths():
    packer = CaptionPacker(TOK, SHORT_LEN, LONG_LEN)
    short = "one two three four five six seven eight nine ten"
    long = " ".join(["word"] * 40)
    packed = packer(short, long)
    assert torch.equal(packed, expected_texts(short, long))
    assert (packed[0, SHORT_LEN:] == PAD).all() and (packed[1] != PAD).all()
    with pytest.raises(ValueError, match="max_short_len"):
        CaptionPacker(TOK, 32, 16)


# ------------------------------------------------------------------------------------------------ tables

def test_csv_and_tsv_give_the_same_samples(world, tmp_path):
    df = pd.read_csv(world.train_csv, sep="\t")
    df["filepath"] = [str(world.train_csv.parent / p) for p in df.filepath]  # absolute paths in the CSV copy
    csv_path = tmp_path / "train.csv"
    df.to_csv(csv_path, index=False)
    tsv = get_data(make_args(val_data=str(world.train_csv)), (preprocess, preprocess), tokenizer=TOK)["val"]
    csv = get_data(make_args(val_data=str(csv_path), csv_separator=","), (preprocess, preprocess), tokenizer=TOK)["val"]
    assert isinstance(tsv, VladVADataInfo) and isinstance(tsv, DataInfo)
    n = 0
    for (i1, t1), (i2, t2) in zip(tsv.dataloader, csv.dataloader):
        assert torch.equal(i1, i2) and torch.equal(t1, t2)
        for k in range(len(t1)):
            row = df.iloc[n + k]
            assert torch.equal(t1[k], expected_texts(row.short_caption, row.long_caption))
        n += len(t1)
    assert n == 16 == tsv.dataloader.num_samples


def test_missing_long_caption_gives_all_pad_row(world, tmp_path):
    df = pd.read_csv(world.train_csv, sep="\t").head(4)
    df["filepath"] = [str(world.train_csv.parent / p) for p in df.filepath]
    df.loc[1, "long_caption"] = ""
    df.loc[2, "long_caption"] = np.nan
    df.loc[3, "long_caption"] = "NA"  # a caption, not a missing value
    path = tmp_path / "t.tsv"
    df.to_csv(path, sep="\t", index=False)
    ds = get_data(make_args(val_data=str(path)), (preprocess, preprocess), tokenizer=TOK)["val"].dataloader.dataset
    for i in range(4):
        texts = ds[i][1]
        assert (texts[1] == PAD).all() == (i in (1, 2))
        assert (texts[0] != PAD).any()
    assert torch.equal(ds[3][1][1], expected_texts("x", "NA")[1])
    df.drop(columns=["long_caption"]).to_csv(path, sep="\t", index=False)
    ds = get_data(make_args(val_data=str(path)), (preprocess, preprocess), tokenizer=TOK)["val"].dataloader.dataset
    assert all((ds[i][1][1] == PAD).all() for i in range(4))


def test_missing_column_error_names_the_fix(world):
    with pytest.raises(ValueError, match="--csv-caption-key"):
        get_data(make_args(train_data=str(world.train_csv), csv_caption_key="title"), (preprocess, preprocess),
                 tokenizer=TOK)


def _table_with_faults(world: Path, tmp_path: Path, n: int = 8) -> Path:
    df = pd.read_csv(world.train_csv, sep="\t").head(n).copy()
    df["filepath"] = [str(world.train_csv.parent / p) for p in df.filepath]
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # PNG magic, then junk
    df.loc[2, "filepath"] = str(garbage)
    df.loc[5, "filepath"] = str(tmp_path / "does_not_exist.png")
    path = tmp_path / "faulty.tsv"
    df.to_csv(path, sep="\t", index=False)
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_and_missing_images_are_skipped_and_counted(world, tmp_path, caplog, workers):
    path = _table_with_faults(world, tmp_path)
    info = get_data(make_args(train_data=str(path), workers=workers), (preprocess, preprocess), tokenizer=TOK)["train"]
    assert info.skips.value == 0
    with caplog.at_level(logging.WARNING):
        sizes = [len(images) for images, _ in info.dataloader]
    assert sizes == [4, 4]  # full batches: each bad row is replaced by the next good one
    assert info.skips.value == 2  # counted across worker processes
    assert info.skip_report() == 2
    if workers == 0:  # worker-process log records do not reach caplog
        assert "garbage.png" in caplog.text and "does_not_exist.png" in caplog.text


def test_replacement_is_the_next_good_row(world, tmp_path):
    path = _table_with_faults(world, tmp_path)
    skips = SkipCounter("t")
    ds = CaptionTableDataset(path, preprocess, CaptionPacker(TOK, SHORT_LEN, LONG_LEN), skips,
                             caption_key="short_caption")
    assert torch.equal(ds[2][1], ds[3][1]) and torch.equal(ds[5][1], ds[6][1])
    assert skips.value == 2


def test_all_images_broken_raises(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    pd.DataFrame({"filepath": ["bad.png"] * 3, "short_caption": ["a"] * 3}).to_csv(tmp_path / "t.tsv", sep="\t",
                                                                                  index=False)
    info = get_data(make_args(train_data=str(tmp_path / "t.tsv"), batch_size=1), (preprocess, preprocess),
                    tokenizer=TOK)["train"]
    with pytest.raises(RuntimeError, match="consecutive images failed"):
        next(iter(info.dataloader))


def test_table_order_reproducible_per_epoch(world):
    args = make_args(train_data=str(world.train_csv), seed=3)
    a = get_data(args, (preprocess, preprocess), tokenizer=TOK)["train"]
    b = get_data(args, (preprocess, preprocess), epoch=1, tokenizer=TOK)["train"]  # a "resumed" run
    e0, e0_again, e1 = epoch_captions(a, 0), epoch_captions(a, 0), epoch_captions(a, 1)
    assert e0 == e0_again and e0 != e1 and sorted(e0) == sorted(e1)
    assert epoch_captions(b, 1) == e1
    other_seed = get_data(make_args(train_data=str(world.train_csv), seed=4), (preprocess, preprocess),
                          tokenizer=TOK)["train"]
    assert epoch_captions(other_seed, 0) != e0


def test_distributed_ranks_partition_the_table(world):
    seen = []
    for rank in (0, 1):
        args = make_args(train_data=str(world.train_csv), distributed=True, world_size=2, rank=rank, batch_size=2)
        info = get_data(args, (preprocess, preprocess), tokenizer=TOK)["train"]
        assert info.dataloader.num_batches == 4
        seen.append(epoch_captions(info, 0))
    assert len(seen[0]) == len(seen[1]) == 8
    all_rows = epoch_captions(get_data(make_args(val_data=str(world.train_csv)), (preprocess, preprocess),
                                       tokenizer=TOK)["val"], 0)
    assert sorted(seen[0] + seen[1]) == sorted(all_rows)


# ------------------------------------------------------------------------------------------------ webdataset

def test_wds_round_trip_matches_table(world):
    args = make_args(val_data=world.train_shards, dataset_type="webdataset")
    wds_val = get_data(args, (preprocess, preprocess), tokenizer=TOK)["val"]
    assert wds_val.dataloader.num_samples == 16  # from sizes.json
    table = get_data(make_args(val_data=str(world.train_csv)), (preprocess, preprocess), tokenizer=TOK)["val"]
    wi, wt = map(torch.cat, zip(*wds_val.dataloader))
    ti, tt = map(torch.cat, zip(*table.dataloader))
    assert wt.shape == tt.shape == (16, 2, LONG_LEN)
    assert torch.equal(wi, ti) and torch.equal(wt, tt)


def test_wds_train_batches_full_and_reproducible(world):
    args = make_args(train_data=world.train_shards, seed=5)  # auto -> webdataset from the .tar extension
    info = get_data(args, (preprocess, preprocess), tokenizer=TOK)["train"]
    assert info.dataloader.num_batches == 4 == len(info.dataloader) and info.dataloader.num_samples == 16
    e0, e0_again, e1 = epoch_captions(info, 0), epoch_captions(info, 0), epoch_captions(info, 1)
    assert len(e0) == 16 and e0 == e0_again and e0 != e1
    assert sorted(e0) == sorted(e1)  # one pass over 16 samples per epoch
    resumed = get_data(args, (preprocess, preprocess), epoch=1, tokenizer=TOK)["train"]
    assert epoch_captions(resumed, 1) == e1


def test_wds_workers_and_ranks_partition_shards(world):
    seen, shards = [], []
    for rank in (0, 1):
        args = make_args(train_data=world.train_shards, workers=2, world_size=2, rank=rank, distributed=True,
                         batch_size=2)
        info = get_data(args, (preprocess, preprocess), tokenizer=TOK)["train"]
        assert info.dataloader.num_batches == 4 == len(info.dataloader)  # ceil(16 / (2*2)); 2 per worker
        ds = info.dataloader.dataset
        shards += [ds.shards_for(0, w, 2) for w in (0, 1)]
        seen.append(epoch_captions(info, 0))
    assert all(len(s) == 1 for s in shards)
    assert sorted(u for s in shards for u in s) == sorted(str(p) for p in world.train_shard_files)
    assert len(seen[0]) == len(seen[1]) == 8
    all_rows = epoch_captions(get_data(make_args(val_data=str(world.train_csv)), (preprocess, preprocess),
                                       tokenizer=TOK)["val"], 0)
    assert sorted(seen[0] + seen[1]) == sorted(all_rows)  # every sample exactly once across 2 ranks x 2 workers


def test_wds_too_few_shards_is_a_clear_error(world):
    with pytest.raises(ValueError, match="shards cannot feed"):
        get_data(make_args(train_data=world.train_shards, workers=4, world_size=2, rank=0, distributed=True),
                 (preprocess, preprocess), tokenizer=TOK)


def test_wds_resampled_is_deterministic(world):
    args = make_args(train_data=world.train_shards, dataset_resampled=True, train_num_samples=12)
    info = get_data(args, (preprocess, preprocess), tokenizer=TOK)["train"]
    assert info.dataloader.num_batches == 3
    assert epoch_captions(info, 2) == epoch_captions(info, 2) != epoch_captions(info, 3)


def test_wds_corrupt_sample_skipped(tmp_path, caplog):
    w = World(WorldConfig(seed=1))
    with ShardWriter(tmp_path, shard_size=100) as writer:
        for i in range(9):
            s = w.sample("train", i)
            png = b"garbage" if i == 4 else png_bytes(w.render(s.scene))
            fields = {"png": png, "txt": s.short} if i == 7 else {"png": png, "txt": s.short, "long.txt": s.long}
            writer.write(f"{i:06d}", fields)
        writer.write("nolabel", {"png": png_bytes(w.render(w.sample("train", 20).scene))})  # no caption
    args = make_args(train_data=writer.brace_pattern(), batch_size=4, train_num_samples=8)
    info = get_data(args, (preprocess, preprocess), tokenizer=TOK)["train"]
    with caplog.at_level(logging.WARNING):
        batches = list(info.dataloader)
    assert [len(x) for x, _ in batches] == [4, 4]
    assert info.skips.value == 2
    assert "000004" in caplog.text and "nolabel" in caplog.text
    no_long = torch.cat([(t[:, 1] == PAD).all(dim=1) for _, t in batches])
    assert no_long.sum() == 1  # sample 7 has no long.txt: all-pad row 1, still trained on


def test_wds_without_any_usable_sample_raises(tmp_path):
    with ShardWriter(tmp_path, shard_size=100) as writer:
        for i in range(3):
            writer.write(f"{i:06d}", {"png": b"junk", "txt": "a caption"})
    info = get_data(make_args(train_data=writer.brace_pattern(), train_num_samples=4), (preprocess, preprocess),
                    tokenizer=TOK)["train"]
    with pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(info.dataloader))
    assert info.skips.value == 3


# ------------------------------------------------------------------------------------------------ synthetic

def test_synthetic_deterministic_by_seed():
    fns = (preprocess, preprocess)
    a = get_data(make_args(dataset_type="synthetic"), fns, tokenizer=TOK)["train"]
    b = get_data(make_args(dataset_type="synthetic"), fns, tokenizer=TOK)["train"]
    c = get_data(make_args(dataset_type="synthetic", seed=1), fns, tokenizer=TOK)["train"]
    assert a.dataloader.num_samples == 12 and a.dataloader.num_batches == 3 and a.skips.value == 0
    batches_a, batches_b = list(a.dataloader), list(b.dataloader)
    for (ia, ta), (ib, tb) in zip(batches_a, batches_b):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
    assert epoch_captions(a, 0) != epoch_captions(c, 0)
    assert epoch_captions(a, 0) != epoch_captions(a, 1) and sorted(epoch_captions(a, 0)) == sorted(
        epoch_captions(a, 1))
    # item i is scene i of the world's train split
    world = World(WorldConfig(seed=0, image_size=32))
    image, texts = a.dataloader.dataset[7]
    s = world.sample("train", 7)
    assert torch.equal(texts, expected_texts(s.short, s.long))
    assert torch.equal(image, preprocess(world.render(s.scene)))


def test_synthetic_val_uses_heldout_split():
    args = make_args(dataset_type="synthetic", val_data="synthetic", val_num_samples=6)
    data = get_data(args, (preprocess, preprocess), tokenizer=TOK)
    assert data["val"].dataloader.num_samples == 6 and data["val"].sampler is None
    s = World(WorldConfig(seed=0, image_size=32)).sample("test", 0)
    assert torch.equal(data["val"].dataloader.dataset[0][1], expected_texts(s.short, s.long))


# ------------------------------------------------------------------------------------------------ augmentation

@pytest.mark.parametrize("kind", ["table", "webdataset", "synthetic"])
def test_augmentation_is_seeded_by_sample_and_epoch(world, kind):
    """A resumed run (other global RNG state) gets the same augmented pixels; another epoch gets new ones; the
    global RNGs are left as they were."""
    args = {"table": make_args(train_data=str(world.train_csv)),
            "webdataset": make_args(train_data=world.train_shards, dataset_type="webdataset"),
            "synthetic": make_args(dataset_type="synthetic")}[kind]

    def epoch_images(epoch: int, rng_seed: int) -> torch.Tensor:
        torch.manual_seed(rng_seed)
        random.seed(rng_seed)
        np.random.seed(rng_seed)
        info = get_data(args, (augment, preprocess), epoch=epoch, tokenizer=TOK)["train"]
        info.set_epoch(epoch)
        return torch.cat([images for images, _ in info.dataloader])

    first = epoch_images(0, rng_seed=1)
    assert torch.equal(first, epoch_images(0, rng_seed=2))
    assert not torch.equal(first, epoch_images(1, rng_seed=1))


def test_seeded_transform_restores_global_rngs():
    img = Image.new("RGB", (20, 20), (200, 10, 10))

    def reseed():
        torch.manual_seed(5)
        random.seed(5)
        np.random.seed(5)

    reseed()
    expected = (torch.rand(2), random.random(), np.random.rand())
    reseed()
    out = seeded_transform(augment, img, 123)
    assert torch.equal(torch.rand(2), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert torch.equal(out, seeded_transform(augment, img, 123))
    assert not torch.equal(out, seeded_transform(augment, img, 124))
    assert sample_seed(0, 1, "a") == sample_seed(0, 1, "a") != sample_seed(0, 2, "a")


# ------------------------------------------------------------------------------------------------ dispatch

def test_dataset_type_resolution():
    assert resolve_dataset_type("a/b.tsv", "auto") == "csv"
    assert resolve_dataset_type("a/shard-{000..009}.tar", "auto") == "webdataset"
    assert resolve_dataset_type(None, "synthetic") == "synthetic"
    with pytest.raises(ValueError, match="cannot tell"):
        resolve_dataset_type("data.parquet", "auto")
    with pytest.raises(ValueError, match="unsupported"):
        resolve_dataset_type("x.csv", "parquet")


def test_get_data_requires_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        get_data(make_args(dataset_type="synthetic"), (preprocess, preprocess))


def test_imagenet_val_is_delegated_to_open_clip(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / cls / "x.png")
    data = get_data(make_args(dataset_type="synthetic", imagenet_val=str(tmp_path)), (preprocess, preprocess),
                    tokenizer=TOK)
    images, targets = next(iter(data["imagenet-val"].dataloader))
    assert images.shape == (2, 3, IMG, IMG) and targets.tolist() == [0, 1]
