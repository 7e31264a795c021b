"""vladva embed: clip-retrieval's layout, shards equal to encode_image/encode_text, skipped images, webdataset,
resuming after a kill (byte-identical), refusing other settings, and torchrun with 2 processes (gloo)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from _helpers_eval import fixture_tiny_clip, fixture_tiny_clip_config_dir  # noqa: F401  (fixtures)
from _helpers_retrieval import folder_bytes, free_port, image_folder, noise_image, png_bytes, write_tar
from PIL import Image

import vladva_openclip  # noqa: F401  (registers the VladVA models)
from vladva_openclip.retrieval import EmbeddingFolder, EmbedJobConfig, EmbedJobError, run_embed

REPO = Path(__file__).resolve().parents[1]
TINY = "vladva-tiny-llava"


@pytest.fixture(scope="module")
def tiny_llava():
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY)


def _reference(model, preprocess, tokenizer, paths, captions):
    """One item at a time through the model's own encode_image / encode_text."""
    with torch.no_grad():
        img = torch.cat([model.encode_image(preprocess(Image.open(p).convert("RGB"))[None], normalize=True)
                         for p in paths])
        txt = torch.cat([model.encode_text(tokenizer([c]), normalize=True) for c in captions])
    return img.numpy(), txt.numpy()


@pytest.mark.parametrize("which", ["vladva", "clip"])
def test_shards_equal_encode_image_and_encode_text(which, tiny_llava, tiny_clip, tmp_path):
    model, preprocess, tokenizer = tiny_llava if which == "vladva" else tiny_clip
    paths = image_folder(tmp_path / "imgs", 7, corrupt=(3,))
    out = tmp_path / "emb"
    manifest = run_embed(EmbedJobConfig(str(tmp_path / "imgs"), str(out), model=which, shard_size=3, batch_size=2,
                                        workers=0, dtype="float32", progress=False),
                         model=model, preprocess=preprocess, tokenizer=tokenizer)
    # clip-retrieval's names: 3 shards -> one digit; the three folders; float32 as asked
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]
    assert sorted(p.name for p in (out / "text_emb").iterdir()) == ["text_emb_0.npy", "text_emb_1.npy",
                                                                     "text_emb_2.npy"]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [f"metadata_{k}.parquet" for k in range(3)]
    meta = pd.concat([pd.read_parquet(out / "metadata" / f"metadata_{k}.parquet") for k in range(3)])
    assert list(meta.columns) == ["image_path", "caption", "row"]
    good = [i for i in range(7) if i != 3]
    assert meta["row"].tolist() == good
    assert meta["image_path"].tolist() == [os.path.abspath(paths[i]) for i in good]
    img = np.concatenate([np.load(out / "img_emb" / f"img_emb_{k}.npy") for k in range(3)])
    txt = np.concatenate([np.load(out / "text_emb" / f"text_emb_{k}.npy") for k in range(3)])
    assert img.dtype == np.float32 and txt.dtype == np.float32
    ref_img, ref_txt = _reference(model, preprocess, tokenizer, [paths[i] for i in good], meta["caption"].tolist())
    np.testing.assert_allclose(img, ref_img, atol=2e-5)
    np.testing.assert_allclose(txt, ref_txt, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1.0, atol=1e-5)
    # the corrupt image is skipped, counted and listed with its reason
    assert manifest["counts"]["skipped"] == 1 and manifest["counts"]["embedded"] == 6
    (skip,) = manifest["skipped"]
    assert skip["row"] == 3 and skip["key"].endswith("im03.png") and "cannot identify image" in skip["reason"]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["skipped"] == manifest["skipped"] and on_disk["model"]["name"] == which
    assert on_disk["embed_dim"] == img.shape[1] and on_disk["dtype"] == "float32"
    assert "Normalize" in on_disk["preprocessing"]["transform"]

    if which == "vladva":  # float16 (the default, as clip-retrieval) is the float32 result rounded
        out16 = tmp_path / "emb16"
        run_embed(EmbedJobConfig(str(tmp_path / "imgs"), str(out16), model=which, shard_size=3, batch_size=2,
                                 workers=0, progress=False), model=model, preprocess=preprocess, tokenizer=tokenizer)
        img16 = np.concatenate([np.load(out16 / "img_emb" / f"img_emb_{k}.npy") for k in range(3)])
        assert img16.dtype == np.float16
        np.testing.assert_array_equal(img16, img.astype(np.float16))


def test_table_with_missing_and_corrupt_images(tiny_llava, tmp_path):
    model, preprocess, tokenizer = tiny_llava
    image_folder(tmp_path / "imgs", 5, captions=False, corrupt=(2,))
    table = pd.DataFrame({"filepath": ["imgs/im00.png", "imgs/im01.png", "imgs/im02.png", "imgs/gone.png",
                                       str(tmp_path / "imgs" / "im04.png")],
                          "title": ["a", "b b", "c", "d", "e e e"]})
    table.to_csv(tmp_path / "data.tsv", sep="\t", index=False)
    out = tmp_path / "emb"
    manifest = run_embed(EmbedJobConfig(str(tmp_path / "data.tsv"), str(out), shard_size=10, workers=0,
                                        progress=False, model=TINY), model=model, preprocess=preprocess,
                         tokenizer=tokenizer)
    meta = pd.read_parquet(out / "metadata" / "metadata_0.parquet")
    assert meta["row"].tolist() == [0, 1, 4] and meta["caption"].tolist() == ["a", "b b", "e e e"]
    assert meta["image_path"].tolist()[0] == str(tmp_path / "imgs" / "im00.png")  # relative to the table
    assert {s["row"]: s["reason"].split(":")[0] for s in manifest["skipped"]} == {
        2: "UnidentifiedImageError", 3: "FileNotFoundError"}
    assert np.load(out / "img_emb" / "img_emb_0.npy").shape == (3, 64)
    assert np.load(out / "text_emb" / "text_emb_0.npy").shape == (3, 64)


def test_captions_only_many_shards_and_length_buckets(tiny_llava, tmp_path):
    """11 shards -> two-digit names (clip-retrieval's zero padding); texts go in length-sorted batches."""
    model, preprocess, tokenizer = tiny_llava
    captions = [("word " * (i % 5 + 1)).strip() + f" {i}" for i in range(11)]
    pd.DataFrame({"filepath": [f"x{i}.png" for i in range(11)], "caption": captions}).to_csv(
        tmp_path / "t.csv", index=False)
    calls = []

    def spy(texts, *a, **kw):
        calls.append(list(texts))
        return tokenizer(texts, *a, **kw)

    out = tmp_path / "emb"
    run_embed(EmbedJobConfig(str(tmp_path / "t.csv"), str(out), images=False, shard_size=1, batch_size=4,
                             workers=0, progress=False, model=TINY), model=model, preprocess=preprocess, tokenizer=spy)
    assert not (out / "img_emb").exists()
    assert sorted(p.name for p in (out / "text_emb").iterdir()) == [f"text_emb_{k:02d}.npy" for k in range(11)]
    assert pd.read_parquet(out / "metadata" / "metadata_07.parquet")["caption"].tolist() == [captions[7]]

    calls.clear()
    out2 = tmp_path / "emb2"
    run_embed(EmbedJobConfig(str(tmp_path / "t.csv"), str(out2), images=False, shard_size=11, batch_size=4,
                             workers=0, progress=False, model=TINY), model=model, preprocess=preprocess, tokenizer=spy)
    lengths = [[len(t) for t in batch] for batch in calls]
    assert [n for b in lengths for n in b] == sorted((len(c) for c in captions), reverse=True)
    np.testing.assert_allclose(np.load(out2 / "text_emb" / "text_emb_0.npy")[7],
                               np.load(out / "text_emb" / "text_emb_07.npy")[0], atol=2e-3)  # float16 on disk


def test_webdataset_shards_one_output_shard_per_tar(tiny_llava, tmp_path):
    model, preprocess, tokenizer = tiny_llava
    write_tar(tmp_path / "wds" / "000.tar", [("a0", png_bytes(noise_image(0)), "first"),
                                             ("a1", b"broken bytes", "second"),
                                             ("a2", png_bytes(noise_image(2)), "third one")])
    write_tar(tmp_path / "wds" / "001.tar", [("b0", None, "no image here"), ("b1", png_bytes(noise_image(5)), "x"),
                                             ("b2", png_bytes(noise_image(6)), "y y")])
    out = tmp_path / "emb"
    manifest = run_embed(EmbedJobConfig(str(tmp_path / "wds" / "{000..001}.tar"), str(out), workers=2,
                                        batch_size=1, progress=False, model=TINY, dtype="float32"),
                         model=model, preprocess=preprocess, tokenizer=tokenizer)
    m0 = pd.read_parquet(out / "metadata" / "metadata_0.parquet")
    m1 = pd.read_parquet(out / "metadata" / "metadata_1.parquet")
    assert list(m0.columns) == ["image_path", "caption", "row", "shard"]
    assert m0["image_path"].tolist() == ["a0", "a2"] and m0["row"].tolist() == [0, 2]  # in tar order
    assert m1["image_path"].tolist() == ["b1", "b2"] and m1["caption"].tolist() == ["x", "y y"]
    assert m1["shard"].tolist() == [str(tmp_path / "wds" / "001.tar")] * 2
    assert sorted((s["key"], s["output_shard"]) for s in manifest["skipped"]) == [("a1", 0), ("b0", 1)]
    with torch.no_grad():
        expected = model.encode_image(preprocess(noise_image(5))[None], normalize=True).numpy()
    np.testing.assert_allclose(np.load(out / "img_emb" / "img_emb_1.npy")[0], expected[0], atol=2e-5)


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from vladva_openclip.retrieval import EmbedJobConfig, run_embed
    done = []
    def on_shard(record):
        done.append(record["shard"])
        if len(done) == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no cleanup, no finally blocks
    run_embed(EmbedJobConfig(sys.argv[1], sys.argv[2], model="vladva-tiny-llava", shard_size=2, batch_size=2,
                             workers=0, progress=False), on_shard=on_shard)
""")


@pytest.mark.slow
def test_killed_and_resumed_job_gives_byte_identical_shards(tmp_path):
    image_folder(tmp_path / "imgs", 8, corrupt=(5,))
    ref, out = tmp_path / "ref", tmp_path / "out"
    cfg = {"model": TINY, "shard_size": 2, "batch_size": 2, "workers": 0, "progress": False}
    run_embed(EmbedJobConfig(str(tmp_path / "imgs"), str(ref), **cfg))

    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path / "imgs"), str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(p.name for p in (out / ".embed_state").glob("shard_*.json")) == ["shard_0.json", "shard_1.json"]
    assert not (out / "manifest.json").exists()
    # what a kill in the middle of shard 2 leaves: a temporary file and a data file without its marker
    (out / "img_emb" / ".img_emb_2.npy.abc.tmp").write_bytes(b"partial")
    (out / "img_emb" / "img_emb_2.npy").write_bytes(b"\x93NUMPY truncated")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "img_emb").glob("img_emb_[01].npy")}

    redone = []
    manifest = run_embed(EmbedJobConfig(str(tmp_path / "imgs"), str(out), **cfg),
                         on_shard=lambda r: redone.append(r["shard"]))
    assert redone == [2, 3]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "img_emb").glob("img_emb_[01].npy")} == before
    assert folder_bytes(out) == folder_bytes(ref)
    assert not list(out.rglob("*.tmp"))
    assert manifest["counts"]["embedded"] == 7 and [s["row"] for s in manifest["skipped"]] == [5]

    # a rerun of a finished job redoes nothing
    redone.clear()
    run_embed(EmbedJobConfig(str(tmp_path / "imgs"), str(out), **cfg), on_shard=lambda r: redone.append(r["shard"]))
    assert redone == []


def test_other_settings_in_the_same_folder_are_refused_unless_overwrite(tmp_path):
    image_folder(tmp_path / "imgs", 3)
    out = tmp_path / "out"
    cfg = {"model": TINY, "shard_size": 2, "workers": 0, "progress": False}
    run_embed(EmbedJobConfig(str(tmp_path / "imgs"), str(out), **cfg))
    with pytest.raises(EmbedJobError, match="dtype"):
        run_embed(EmbedJobConfig(str(tmp_path / "imgs"), str(out), dtype="float32", **cfg))
    run_embed(EmbedJobConfig(str(tmp_path / "imgs"), str(out), dtype="float32", overwrite=True, **cfg))
    assert np.load(out / "img_emb" / "img_emb_0.npy").dtype == np.float32
    assert len(EmbeddingFolder(out)) == 3


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_processes_write_the_same_shards_as_one(tmp_path):
    image_folder(tmp_path / "imgs", 10, corrupt=(4,))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"out{nproc}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(free_port()), "-m", "vladva_openclip.cli", "embed", str(tmp_path / "imgs"), "-o", str(out),
               "--model", TINY, "--shard-size", "3", "--batch-size", "2", "--workers", "0", "--no-progress"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[nproc] = out
    assert folder_bytes(outputs[2]) == folder_bytes(outputs[1])
    assert len(folder_bytes(outputs[1])) == 4 * 3  # 4 shards x (img, text, metadata)
    m1, m2 = (json.loads((outputs[n] / "manifest.json").read_text()) for n in (1, 2))
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert [s["rank"] for s in m2["shards"]] == [0, 1, 0, 1]  # shard k on rank k % world_size
    assert m2["counts"] == m1["counts"] and m2["skipped"] == m1["skipped"]
