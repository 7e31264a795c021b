"""vladva search: index vs raw embeddings, text and image queries, JSON with metadata, and the HTML page rendered
in headless Chromium (Debian's package) with the hits' thumbnails found again in the screenshot."""
import json
import os
import shutil
import subprocess

import numpy as np
import open_clip
import pytest
import torch
from _helpers_retrieval import COLOURS, png_bytes, write_tar
from PIL import Image

import vladva_openclip  # noqa: F401
from vladva_openclip.cli import main as vladva_main
from vladva_openclip.retrieval import EmbedJobConfig, Query, build_index, render_html, run_embed, run_search

TINY = "vladva-tiny-llava"


@pytest.fixture(scope="module")
def built():
    model, _, preprocess = open_clip.create_model_and_transforms(TINY)
    return model.eval(), preprocess, open_clip.get_tokenizer(TINY)


@pytest.fixture(scope="module")
def colour_set(built, tmp_path_factory):
    """Six solid-colour images captioned with their colour name, embedded (float32) and indexed (flat)."""
    root = tmp_path_factory.mktemp("colours")
    (root / "imgs").mkdir()
    for name, rgb in COLOURS.items():
        Image.new("RGB", (48, 40), rgb).save(root / "imgs" / f"{name}.png")
        (root / "imgs" / f"{name}.txt").write_text(f"a {name} square")
    run_embed(EmbedJobConfig(str(root / "imgs"), str(root / "emb"), model=TINY, workers=0, progress=False,
                             dtype="float32"), model=built[0], preprocess=built[1], tokenizer=built[2])
    build_index(root / "emb", root / "index")
    return root


def test_index_and_raw_embeddings_give_the_same_hits(colour_set, built):
    queries = [Query("text", "a red square"), Query("image", str(colour_set / "imgs" / "blue.png"))]
    via_index = run_search(colour_set / "index", queries, k=4, built=built)
    raw = run_search(colour_set / "emb", queries, k=4, built=built)
    assert via_index["mode"] == "faiss Flat" and raw["mode"].startswith("exact")
    for a, b in zip(via_index["queries"], raw["queries"]):
        assert [h["id"] for h in a["results"]] == [h["id"] for h in b["results"]]
        np.testing.assert_allclose([h["score"] for h in a["results"]], [h["score"] for h in b["results"]],
                                   atol=1e-5)
    # an image query finds its own image first, with cosine 1, and carries its metadata
    top = raw["queries"][1]["results"][0]
    assert top["metadata"]["image_path"].endswith("blue.png") and top["metadata"]["caption"] == "a blue square"
    assert top["score"] == pytest.approx(1.0, abs=1e-4) and top["rank"] == 1 and "row" in top["metadata"]
    # the scores are the model's cosine similarities
    model, preprocess, tokenizer = built
    with torch.no_grad():
        q = model.encode_text(tokenizer(["a red square"]), normalize=True)
        hit = via_index["queries"][0]["results"][0]
        img = model.encode_image(preprocess(Image.open(hit["metadata"]["image_path"]))[None], normalize=True)
    assert hit["score"] == pytest.approx(float(q @ img.T), abs=1e-4)


def test_cli_json_uses_the_manifest_model_and_searches_captions(colour_set, tmp_path, capsys):
    out = tmp_path / "hits.json"
    assert vladva_main(["search", str(colour_set / "emb"), "--text", "a green square", "--kind", "text", "-k", "2",
                        "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["model"]["name"] == TINY and doc["kind"] == "text" and doc["k"] == 2
    (q,) = doc["queries"]
    assert q["type"] == "text" and len(q["results"]) == 2
    assert q["results"][0]["metadata"]["caption"] == "a green square"  # identical text: cosine 1 with its own caption
    assert vladva_main(["search", str(colour_set / "emb")]) == 2
    assert "no queries" in capsys.readouterr().err


def test_page_escapes_text_and_reads_webdataset_thumbnails(tmp_path):
    tar = write_tar(tmp_path / "000.tar", [("k1", png_bytes(Image.new("RGB", (8, 8), (255, 0, 0))), "x")])
    results = {"source": "s", "mode": "m", "model": {"name": "n"}, "image_roots": [str(tmp_path)], "queries": [
        {"type": "text", "query": "<script>alert(1)</script>", "results": [
            {"rank": 1, "score": 0.5, "id": 0, "metadata": {"image_path": "k1", "caption": "a & b", "shard": str(tar)}},
            {"rank": 2, "score": 0.4, "id": 1, "metadata": {"image_path": "/nowhere/x.png", "caption": None}}]}]}
    page = render_html(results)
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &amp; b" in page
    assert page.count('src="data:image/jpeg;base64,') == 1 and "image unavailable" in page


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    return exe


def test_search_page_renders_the_thumbnails_in_chromium(colour_set, tmp_path):
    exe = _chromium()
    page, shot = tmp_path / "page.html", tmp_path / "shot.png"
    assert vladva_main(["search", str(colour_set / "index"), "--image", str(colour_set / "imgs" / "red.png"),
                        "-k", "6", "--json", str(tmp_path / "hits.json"), "--html", str(page)]) == 0
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--force-device-scale-factor=1",
           "--window-size=1400,900", f"--screenshot={shot}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    for name, rgb in COLOURS.items():
        near = (np.abs(pixels - np.array(rgb)).max(axis=-1) <= 12).sum()
        # each hit's thumbnail is drawn in a 192 x 192 box (object-fit: contain, 48 x 40 image -> 192 x 160)
        assert near >= 0.8 * 192 * 160, f"{name} thumbnail not visible in the screenshot ({near} pixels)"
    hits = json.loads((tmp_path / "hits.json").read_text())["queries"][0]["results"]
    assert {os.path.basename(h["metadata"]["image_path"]) for h in hits} == {f"{c}.png" for c in COLOURS}
