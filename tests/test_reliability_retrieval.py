"""Embeddings and indexes (issue 22): an index answers only over the exact vectors it was built from, resume
follows the inputs, every image is embedded with or without a caption, hits keep their own fields, and each bad
input ends in one stderr line naming the file (exit 2, no traceback). Model: vladva-tiny-llava (random, seeded)."""
from __future__ import annotations

import json
import os
import shutil
import tarfile

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from _helpers_retrieval import COLOURS, folder_bytes, image_folder, noise_image, png_bytes, write_tar
from conftest import perturb_trainables
from PIL import Image

import vladva_openclip  # noqa: F401  (registers the VladVA models)
from vladva_openclip.cli import main as vladva_main
from vladva_openclip.retrieval import (
    EmbeddingFolder,
    EmbedJobConfig,
    EmbedJobError,
    Query,
    Searcher,
    build_index,
    render_html,
    run_embed,
    run_search,
)
from vladva_openclip.retrieval.layout import EmbeddingFolderError, OutputFolder

faiss = pytest.importorskip("faiss", reason="faiss-cpu is in the dev extra: pip install -e '.[dev]'")

TINY = "vladva-tiny-llava"
FAST = {"model": TINY, "workers": 0, "progress": False, "dtype": "float32"}


@pytest.fixture(scope="module")
def built():
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY)


def _embed(built, src, out, **kw):
    model, preprocess, tokenizer = built
    return run_embed(EmbedJobConfig(str(src), str(out), **{**FAST, **kw}), model=model, preprocess=preprocess,
                     tokenizer=tokenizer)


def _colours(root, names=tuple(COLOURS)):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (48, 40), COLOURS[name]).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a {name} square")
    return root


@pytest.fixture(scope="module")
def indexed(built, tmp_path_factory):
    """Six colour images embedded (2 shards) and indexed (flat): ``root/imgs``, ``root/emb``, ``root/index``."""
    root = tmp_path_factory.mktemp("indexed")
    _colours(root / "imgs")
    _embed(built, root / "imgs", root / "emb", shard_size=3)
    build_index(root / "emb", root / "index")
    return root


def _copy(indexed, dst):
    shutil.copytree(indexed, dst, symlinks=True)
    return dst


def _query(built, text="a red square"):
    model, _, tokenizer = built
    with torch.no_grad():
        return model.encode_text(tokenizer([text]), normalize=True)


def one_error_line(capsys, command: str, *needles: str) -> str:
    """The run's stderr has exactly one error line, no traceback, and the line holds every needle."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"{command}: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


# ---- the index is tied to the exact vectors ------------------------------------------------------------------
def test_index_refuses_vectors_re_embedded_by_another_model(built, indexed, tmp_path, capsys):
    root = _copy(indexed, tmp_path / "r")
    other = open_clip.create_model(TINY).eval()
    perturb_trainables(other, seed=5, scale=0.3)
    _embed((other, built[1], built[2]), root / "imgs", root / "emb", shard_size=3, overwrite=True,
           pretrained="other")
    with pytest.raises(ValueError, match=r"other vectors.*img_emb/img_emb_0\.npy changed.*vladva index"):
        Searcher(root / "index")
    assert vladva_main(["search", str(root / "index"), "--text", "a red square"]) == 2
    one_error_line(capsys, "vladva search", root / "index", "changed", "vladva index")


def test_index_refuses_a_manifest_naming_another_model(indexed, tmp_path):
    root = _copy(indexed, tmp_path / "r")
    manifest = json.loads((root / "emb" / "manifest.json").read_text())
    manifest["model"]["pretrained"] = "some-other-adapter"
    (root / "emb" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest changed \(pretrained None -> 'some-other-adapter'\)"):
        Searcher(root / "index")


def test_moved_index_never_answers_from_the_folder_now_at_the_old_path(built, indexed, tmp_path):
    root = _copy(indexed, tmp_path / "r")
    build_index(root / "emb", root / "index")  # recorded at root/emb (absolute) and ../emb (relative)
    shutil.move(root / "index", tmp_path / "elsewhere" / "index")
    assert Searcher(tmp_path / "elsewhere" / "index").folder.root == root / "emb"  # same vectors: fine
    # the old path now holds another collection with the same shard counts
    shutil.rmtree(root / "emb")
    other_imgs = tmp_path / "noise"
    image_folder(other_imgs, 6)
    _embed(built, other_imgs, root / "emb", shard_size=3)
    assert EmbeddingFolder(root / "emb").counts == [3, 3]
    with pytest.raises(ValueError, match="other vectors"):
        Searcher(tmp_path / "elsewhere" / "index")
    shutil.rmtree(root / "emb")
    with pytest.raises(ValueError, match="are gone"):
        Searcher(tmp_path / "elsewhere" / "index")


def test_index_and_embeddings_moved_together_still_work(built, indexed, tmp_path):
    # copied file by file with new mtimes: the content hashes decide, and they match
    moved = tmp_path / "moved"
    shutil.copytree(indexed, moved, copy_function=shutil.copy)
    searcher = Searcher(moved / "index")
    assert searcher.folder.root == moved / "emb"
    (hits,) = searcher.search(_query(built), 2)
    reference = Searcher(indexed / "emb").search(_query(built), 2)[0]
    assert [h["id"] for h in hits] == [h["id"] for h in reference]


# ---- resume is tied to the inputs ----------------------------------------------------------------------------
def test_resume_after_an_input_change_re_embeds_the_changed_shard(built, tmp_path):
    imgs = tmp_path / "imgs"
    image_folder(imgs, 6)

    class Stop(Exception):
        pass

    def stop_after_first(record):
        raise Stop

    model, preprocess, tokenizer = built
    cfg = dict(FAST, shard_size=2)
    with pytest.raises(Stop):
        run_embed(EmbedJobConfig(str(imgs), str(tmp_path / "out"), **cfg), model=model, preprocess=preprocess,
                  tokenizer=tokenizer, on_shard=stop_after_first)
    # replace an image of the finished shard 0 by another under a new name (same row count, same sort position)
    (imgs / "im01.png").unlink()
    (imgs / "im01.txt").unlink()
    noise_image(99).save(imgs / "im01b.png")
    (imgs / "im01b.txt").write_text("the replacement")
    redone = []
    manifest = run_embed(EmbedJobConfig(str(imgs), str(tmp_path / "out"), **cfg), model=model,
                         preprocess=preprocess, tokenizer=tokenizer, on_shard=lambda r: redone.append(r["shard"]))
    assert redone == [0, 1, 2]  # shard 0 again: its inputs changed
    meta = pd.read_parquet(tmp_path / "out" / "metadata" / "metadata_0.parquet")
    assert [os.path.basename(p) for p in meta["image_path"]] == ["im00.png", "im01b.png"]
    assert manifest["counts"]["embedded"] == 6
    _embed(built, imgs, tmp_path / "fresh", shard_size=2)
    assert folder_bytes(tmp_path / "out") == folder_bytes(tmp_path / "fresh")


# ---- every image is embedded, with or without a caption ------------------------------------------------------
def test_webdataset_text_mode_keeps_images_without_captions(built, tmp_path):
    write_tar(tmp_path / "wds" / "000.tar", [("a0", png_bytes(noise_image(0)), "first caption"),
                                             ("a1", png_bytes(noise_image(1)), None),
                                             ("a2", png_bytes(noise_image(2)), "third caption"),
                                             ("a3", png_bytes(noise_image(3)), None)])
    out = tmp_path / "emb"
    manifest = _embed(built, tmp_path / "wds" / "000.tar", out)
    assert manifest["texts"] is True  # decided from the first sample
    meta = pd.read_parquet(out / "metadata" / "metadata_0.parquet")
    assert meta["image_path"].tolist() == ["a0", "a1", "a2", "a3"]
    assert [c if isinstance(c, str) else None for c in meta["caption"]] == ["first caption", None, "third caption",
                                                                             None]
    image, text = np.load(out / "img_emb" / "img_emb_0.npy"), np.load(out / "text_emb" / "text_emb_0.npy")
    assert image.shape == text.shape == (4, 64)
    model, preprocess, tokenizer = built
    with torch.no_grad():
        ref = model.encode_image(preprocess(noise_image(3))[None], normalize=True).numpy()[0]
        cap = model.encode_text(tokenizer(["third caption"]), normalize=True).numpy()[0]
    np.testing.assert_allclose(image[3], ref, atol=2e-5)
    np.testing.assert_allclose(text[2], cap, atol=2e-5)
    assert not text[[1, 3]].any()  # caption-less rows: all-zero text vectors
    assert manifest["counts"]["captionless"] == 2 and manifest["counts"]["texts"] == 2
    assert manifest["counts"]["images"] == 4 and manifest["skipped"] == []
    # caption search never returns the caption-less rows, exact or through an index
    build_index(out, tmp_path / "index", kind="text")
    assert json.loads((tmp_path / "index" / "text.index.json").read_text())["blank_rows"] == 2
    for source in (out, tmp_path / "index"):
        (hits,) = Searcher(source, "text").search(_query(built, "first caption"), 4)
        assert [h["metadata"]["image_path"] for h in hits][:1] == ["a0"]
        assert sorted(h["metadata"]["image_path"] for h in hits) == ["a0", "a2"]


def test_folder_with_texts_keeps_images_without_captions(built, tmp_path):
    image_folder(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "im02.txt").unlink()
    out = tmp_path / "emb"
    manifest = _embed(built, tmp_path / "imgs", out, texts=True)
    meta = pd.read_parquet(out / "metadata" / "metadata_0.parquet")
    assert meta["row"].tolist() == [0, 1, 2, 3] and pd.isna(meta["caption"][2])
    assert np.load(out / "img_emb" / "img_emb_0.npy").shape == (4, 64)
    assert not np.load(out / "text_emb" / "text_emb_0.npy")[2].any()
    assert manifest["counts"]["captionless"] == 1 and manifest["counts"]["embedded"] == 4


def test_non_utf8_caption_is_counted_and_named_and_its_image_kept(built, tmp_path, caplog):
    image_folder(tmp_path / "imgs", 3)
    (tmp_path / "imgs" / "im01.txt").write_bytes(b"caf\xe9 latin-1 text")
    manifest = _embed(built, tmp_path / "imgs", tmp_path / "emb", texts=True)
    bad = str(tmp_path / "imgs" / "im01.txt")
    assert manifest["caption_errors"] == [{"path": bad, "reason": "not UTF-8 text (byte 3)"}]
    assert manifest["counts"]["caption_errors"] == 1 and manifest["counts"]["embedded"] == 3
    assert bad in caplog.text
    meta = pd.read_parquet(tmp_path / "emb" / "metadata" / "metadata_0.parquet")
    assert pd.isna(meta["caption"][1]) and meta["caption"][0] == "picture 0"


# ---- hit fields stay the project's own -----------------------------------------------------------------------
def test_metadata_columns_named_like_hit_fields_stay_under_metadata(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    OutputFolder(tmp_path / "emb", 1).write_shard(0, {"image": vectors}, pd.DataFrame({
        "id": ["x", "y", "z", "w", "v"], "rank": [9, 9, 9, 9, 9], "score": ["high", "low", "n/a", "", "1"],
        "caption": [1.5, None, 3, 4, 5], "image_path": [1, 2, 3, 4, 5]}), {})
    (hits,) = Searcher(tmp_path / "emb").search(torch.from_numpy(vectors[2:3]), 3)
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["id"] == 2
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[0]["metadata"] == {"id": "z", "rank": 9, "score": "n/a", "caption": 3.0, "image_path": 3}
    page = render_html({"source": "s", "mode": "m", "model": {}, "queries": [
        {"type": "text", "query": "q", "results": hits}]})
    assert "score 1.0000" in page and "n/a" not in page  # the hit's score, not the column
    # and a results file whose hits carry text where numbers belong still renders
    assert "score high" in render_html({"queries": [{"type": "text", "query": "q", "results": [
        {"rank": "1", "score": "high", "id": 0, "metadata": {"image_path": ["a", "list"]}}]}]})


# ---- bad inputs: one line, exit 2 ----------------------------------------------------------------------------
def test_index_of_shards_with_different_dimensions(tmp_path, capsys):
    out = OutputFolder(tmp_path / "emb", 2)
    for k, dim in ((0, 8), (1, 16)):
        out.write_shard(k, {"image": np.eye(2, dim, dtype=np.float32)}, pd.DataFrame({"row": [0, 1]}), {})
    assert vladva_main(["index", str(tmp_path / "emb"), "-o", str(tmp_path / "index")]) == 2
    one_error_line(capsys, "vladva index", tmp_path / "emb", "different dimensions", "img_emb_1.npy")


def test_one_dimensional_shard(tmp_path, capsys):
    (tmp_path / "emb" / "img_emb").mkdir(parents=True)
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", np.ones(8, dtype=np.float32))
    assert vladva_main(["index", str(tmp_path / "emb"), "-o", str(tmp_path / "index")]) == 2
    one_error_line(capsys, "vladva index", tmp_path / "emb" / "img_emb" / "img_emb_0.npy", "1-D", "2-D")


def test_k_zero(indexed, capsys):
    assert vladva_main(["search", str(indexed / "index"), "--text", "red", "-k", "0"]) == 2
    one_error_line(capsys, "vladva search", "-k must be >= 1")


def test_ivfpq_on_too_few_vectors(indexed, tmp_path, capsys):
    assert vladva_main(["index", str(indexed / "emb"), "-o", str(tmp_path / "ix"), "--index-type", "ivfpq"]) == 2
    one_error_line(capsys, "vladva index", indexed / "emb", "at least 256 vectors", "--index-type flat")


def test_truncated_index_file(indexed, tmp_path, capsys):
    root = _copy(indexed, tmp_path / "r")
    data = (root / "index" / "image.index").read_bytes()
    (root / "index" / "image.index").write_bytes(data[: len(data) // 2])
    assert vladva_main(["search", str(root / "index"), "--text", "red"]) == 2
    one_error_line(capsys, "vladva search", root / "index" / "image.index", "truncated", "vladva index")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"embeddings": {"root": "/x"}}'])
def test_malformed_index_json(indexed, tmp_path, capsys, content):
    root = _copy(indexed, tmp_path / "r")
    (root / "index" / "image.index.json").write_text(content)
    assert vladva_main(["search", str(root / "index"), "--text", "red"]) == 2
    one_error_line(capsys, "vladva search", root / "index" / "image.index.json", "vladva index")


def test_json_output_is_a_folder(indexed, tmp_path, capsys):
    assert vladva_main(["search", str(indexed / "index"), "--text", "red", "--json", str(tmp_path)]) == 2
    one_error_line(capsys, "vladva search", f"--json {tmp_path} is a folder")


def test_embed_output_is_an_existing_file(tmp_path, capsys):
    image_folder(tmp_path / "imgs", 2)
    (tmp_path / "taken").write_text("a file")
    assert vladva_main(["embed", str(tmp_path / "imgs"), "-o", str(tmp_path / "taken"), "--model", TINY,
                        "--workers", "0", "--no-progress"]) == 2
    one_error_line(capsys, "vladva embed", tmp_path / "taken", "is a file")
    assert (tmp_path / "taken").read_text() == "a file"


def test_html_on_a_truncated_tar(built, tmp_path, capsys):
    tar = write_tar(tmp_path / "wds" / "000.tar", [(f"k{i}", png_bytes(noise_image(i, (256, 256))), f"cap {i}")
                                                   for i in range(3)])
    _embed(built, tar, tmp_path / "emb")
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    assert vladva_main(["search", str(tmp_path / "emb"), "--text", "cap 2", "-k", "3", "--json",
                        str(tmp_path / "hits.json"), "--html", str(tmp_path / "page.html")]) == 2
    one_error_line(capsys, "vladva search", tar, "truncated or corrupt", "without --html")
    assert not (tmp_path / "page.html").exists()


def test_unfinished_embedding_folder_is_not_indexed(indexed, tmp_path, capsys):
    root = _copy(indexed, tmp_path / "r")
    (root / "emb" / ".embed_state" / "shard_1.json").unlink()  # as a kill between the data files and the marker
    assert vladva_main(["index", str(root / "emb"), "-o", str(tmp_path / "ix")]) == 2
    one_error_line(capsys, "vladva index", root / "emb" / "img_emb" / "img_emb_1.npy", "no shard marker")
    (root / "emb" / "manifest.json").unlink()
    with pytest.raises(EmbeddingFolderError, match="unfinished"):
        EmbeddingFolder(root / "emb")
    # a clip-retrieval folder (no job file) needs each shard's metadata
    foreign = _copy(indexed / "emb", tmp_path / "foreign")
    shutil.rmtree(foreign / ".embed_state")
    (foreign / "metadata" / "metadata_0.parquet").unlink()
    with pytest.raises(EmbeddingFolderError, match=r"img_emb_0\.npy has no metadata file"):
        EmbeddingFolder(foreign)


def test_non_finite_vectors_are_refused_at_index_time(indexed, tmp_path, capsys):
    root = _copy(indexed, tmp_path / "r")
    emb = root / "emb" / "img_emb" / "img_emb_1.npy"
    vectors = np.load(emb)
    vectors[2, 5] = np.nan
    vectors[0, 0] = -np.inf
    np.save(emb, vectors)
    assert vladva_main(["index", str(root / "emb"), "-o", str(tmp_path / "ix")]) == 2
    one_error_line(capsys, "vladva index", emb, "row 0 and 1 more rows", "NaN/inf")
    with pytest.raises(ValueError, match="NaN/inf"):  # exact search refuses them too
        Searcher(root / "emb")


def test_embedding_skips_and_counts_non_finite_rows(built, tmp_path):
    image_folder(tmp_path / "imgs", 4)
    model = built[0]
    original = model.encode_image

    def poisoned(pixels, normalize=False):
        out = original(pixels, normalize=normalize)
        out[pixels[:, 0, 0, 0] == pixels[:, 0, 0, 0].max()] = float("nan")  # one row of the batch
        return out

    model.encode_image = poisoned
    try:
        manifest = _embed(built, tmp_path / "imgs", tmp_path / "emb", batch_size=4)
    finally:
        del model.encode_image
    assert manifest["counts"]["embedded"] == 3 and manifest["counts"]["skipped"] == 1
    assert "non-finite" in manifest["skipped"][0]["reason"]
    assert np.isfinite(np.load(tmp_path / "emb" / "img_emb" / "img_emb_0.npy")).all()
    # the CLI's JSON is standard JSON (a strict parser reads it)
    assert vladva_main(["search", str(tmp_path / "emb"), "--text", "picture", "-k", "10",
                        "--json", str(tmp_path / "hits.json")]) == 0

    def strict(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    doc = json.loads((tmp_path / "hits.json").read_text(), parse_constant=strict)
    assert len(doc["queries"][0]["results"]) == 3


# ---- the page shows only images under the input roots --------------------------------------------------------
def test_page_shows_only_images_under_the_input_roots(tmp_path, monkeypatch):
    root = _colours(tmp_path / "collection", ("red", "green"))
    Image.new("RGB", (48, 40), COLOURS["blue"]).save(tmp_path / "secret.png")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    Image.new("RGB", (48, 40), COLOURS["yellow"]).save(cwd / "red.png")  # same name, another image
    monkeypatch.chdir(cwd)

    def page(paths, roots):
        hits = [{"rank": i + 1, "score": 0.5, "id": i, "metadata": {"image_path": p}} for i, p in enumerate(paths)]
        return render_html({"image_roots": roots, "queries": [{"type": "text", "query": "q", "results": hits}]})

    def colours_shown(text):
        import base64
        import io
        import re

        out = []
        for b64 in re.findall(r'src="data:image/jpeg;base64,([^"]+)"', text):
            rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))[20, 20].astype(int)
            out.append(next(n for n, c in COLOURS.items() if np.abs(rgb - c).max() < 16))
        return out

    roots = [str(root)]
    # relative: resolved against the root, not the working directory; absolute inside the root: shown
    assert colours_shown(page(["red.png", str(root / "green.png")], roots)) == ["red", "green"]
    # outside the roots (absolute, climbing out, or through a symlink): never shown
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    assert colours_shown(page([str(tmp_path / "secret.png"), "../secret.png", "link.png"], roots)) == []
    # no recorded roots (a folder without a manifest): no images at all
    assert colours_shown(page([str(root / "red.png")], [])) == []


def test_webdataset_shards_are_stored_absolute_and_found_from_anywhere(built, tmp_path, monkeypatch):
    write_tar(tmp_path / "data" / "000.tar", [("k0", png_bytes(Image.new("RGB", (8, 8), COLOURS["red"])), "red")])
    monkeypatch.chdir(tmp_path / "data")
    _embed(built, "000.tar", tmp_path / "emb")  # typed relative
    meta = pd.read_parquet(tmp_path / "emb" / "metadata" / "metadata_0.parquet")
    assert meta["shard"].tolist() == [str(tmp_path / "data" / "000.tar")]
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    assert manifest["image_roots"] == [str(tmp_path / "data")]
    monkeypatch.chdir(tmp_path)
    results = run_search(tmp_path / "emb", [Query("text", "red")], k=1, built=built)
    assert render_html(results).count('src="data:image/jpeg;base64,') == 1


def test_other_settings_refusal_lists_only_real_differences(built, tmp_path):
    image_folder(tmp_path / "imgs", 2)
    _embed(built, tmp_path / "imgs", tmp_path / "out")
    with pytest.raises(EmbedJobError) as err:
        _embed(built, tmp_path / "imgs", tmp_path / "out", dtype="float16")
    assert "differences: dtype)" in str(err.value)  # preprocessing (tuples vs JSON lists) is not one


def test_tar_of_the_page_must_lie_under_the_roots(tmp_path, monkeypatch):
    tar = write_tar(tmp_path / "data" / "a.tar", [("k", png_bytes(Image.new("RGB", (8, 8), COLOURS["red"])), "x")])
    other = tmp_path / "b.tar"
    shutil.copy(tar, other)
    assert tarfile.is_tarfile(other)
    hit = {"rank": 1, "score": 0.1, "id": 0, "metadata": {"image_path": "k", "shard": str(other)}}
    results = {"image_roots": [str(tmp_path / "data")], "queries": [{"type": "text", "query": "q",
                                                                     "results": [hit]}]}
    assert 'src="data:' not in render_html(results)
    hit["metadata"]["shard"] = str(tar)
    assert render_html(results).count('src="data:') == 1
    # a relative shard (older manifests) resolves against the roots, not the working directory
    monkeypatch.chdir(tmp_path)
    hit["metadata"]["shard"] = "a.tar"
    assert render_html(results).count('src="data:') == 1
    hit["metadata"]["shard"] = "b.tar"  # exists in the working directory only
    assert 'src="data:' not in render_html(results)
