"""Stock tools of the CLIP ecosystem reach VladVA models through ``vladva-run`` (unchanged open_clip_train and
CLIP_benchmark, the plugin registered first), and what stock open_clip_train writes loads with ``pretrained=``: a full
state dict, with or without DDP's ``module.`` prefix, of which only the trainable part is loaded and the frozen rest
is checked against the base."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import vladva_openclip

TINY = "vladva-tiny-llava"


def run_tool(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vladva_openclip.run", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900, check=False)


@pytest.fixture(scope="module")
def stock_checkpoint(tmp_path_factory) -> Path:
    """Two steps of stock ``python -m open_clip_train.main`` (its CSV loader, its ClipLoss) on a VladVA model."""
    root = tmp_path_factory.mktemp("stock_train")
    rows = ["filepath\ttitle"]
    for i in range(8):
        path = root / f"img{i}.png"
        Image.new("RGB", (40, 40), (i * 30, 100, 200 - i * 20)).save(path)
        rows.append(f"{path}\ta shape number {i}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    result = run_tool(["open_clip_train.main", "--model", TINY, "--train-data", str(root / "train.csv"),
                       "--dataset-type", "csv", "--batch-size", "4", "--workers", "0", "--epochs", "1",
                       "--lr", "5e-2", "--warmup", "0", "--precision", "fp32", "--logs", str(root / "logs"),
                       "--name", "stock", "--report-to", "", "--seed", "0"], cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    ckpt = root / "logs" / "stock" / "checkpoints" / "epoch_1.pt"
    assert ckpt.is_file(), result.stderr[-3000:]
    return ckpt


@pytest.mark.slow
def test_stock_open_clip_train_checkpoint_loads_with_pretrained(stock_checkpoint, tmp_path, caplog):
    state = torch.load(stock_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    fresh = open_clip.create_model(TINY)
    trainable = fresh.trainable_state_dict()
    assert set(state) > set(trainable)  # the full state dict, frozen base included
    assert any(not torch.equal(state[k], v) for k, v in trainable.items())  # the run trained something

    with caplog.at_level(logging.INFO, logger="vladva_openclip"):
        model = open_clip.create_model(TINY, pretrained=str(stock_checkpoint))
    assert "frozen tensors equal this model's base" in caplog.text
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, state[k]), k
    # the same as loading the whole dict into a fresh model
    whole = open_clip.create_model(TINY)
    whole.load_state_dict(state)
    tokens = open_clip.get_tokenizer(TINY)(["a shape number 3"])
    with torch.no_grad():
        assert torch.equal(model.eval().encode_text(tokens), whole.eval().encode_text(tokens))

    # DDP's module. prefix, as a multi-GPU open_clip_train run saves it
    prefixed = tmp_path / "ddp.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, prefixed)
    ddp = open_clip.create_model(TINY, pretrained=str(prefixed))
    assert all(torch.equal(v, state[k]) for k, v in ddp.trainable_state_dict().items())


@pytest.mark.slow
def test_a_frozen_difference_is_reported_and_the_base_kept(stock_checkpoint, tmp_path, caplog):
    state = torch.load(stock_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    frozen = next(k for k in state if k.endswith("embed_tokens.weight"))
    changed = dict(state)
    changed[frozen] = state[frozen] + 0.5
    path = tmp_path / "other_base.pt"
    torch.save({"state_dict": changed}, path)
    with caplog.at_level(logging.WARNING, logger="vladva_openclip"):
        model = open_clip.create_model(TINY, pretrained=str(path))
    assert frozen in caplog.text and "kept the base's own values" in caplog.text and "1 of its" in caplog.text
    assert torch.equal(model.state_dict()[frozen], state[frozen])  # the base's value, not the checkpoint's
    assert all(torch.equal(v, state[k]) for k, v in model.trainable_state_dict().items())

    # a frozen tensor of another shape is another architecture: refused
    bad = dict(state)
    bad[frozen] = torch.zeros(3, 3)
    torch.save({"state_dict": bad}, path)
    with pytest.raises(vladva_openclip.AdapterError, match="another base model"):
        open_clip.create_model(TINY, pretrained=str(path))


@pytest.mark.slow
def test_stock_clip_benchmark_cli_through_vladva_run(tmp_path):
    """The real ``clip_benchmark`` console script, unchanged, on a VladVA name: its numbers equal vladva-eval's."""
    pytest.importorskip("clip_benchmark")
    from _helpers_eval import photo_images, save_images, write_json, write_wds_retrieval

    from vladva_openclip.eval import RetrievalTask, evaluate

    captions = [["a red disc"], ["a green square", "a square"], ["a blue triangle"], ["two yellow dots"],
                ["a white cross"], ["a black ring"]]
    images = photo_images(len(captions))
    names = [f"s{i}.png" for i in range(len(images))]
    save_images(tmp_path / "img", images, names)
    write_wds_retrieval(tmp_path / "wds", images, captions)
    out = tmp_path / "cb.json"
    result = run_tool(["clip_benchmark", "eval", "--dataset", "wds/tiny", "--dataset_root", str(tmp_path / "wds"),
                       "--task", "zeroshot_retrieval", "--model", TINY, "--pretrained", "synth_captioner",
                       "--recall_k", "1", "5", "--no_amp", "--num_workers", "0", "--batch_size", "4",
                       "--output", str(out), "--quiet"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    theirs = json.loads(out.read_text())["metrics"]

    ann = write_json(tmp_path / "img" / "tiny_test.json",
                     [{"image": n, "caption": c} for n, c in zip(names, captions)])
    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained="synth_captioner")
    ours = evaluate(model, preprocess, open_clip.get_tokenizer(TINY), [RetrievalTask(data=ann, recall_k=(1, 5))],
                    progress=False)["tiny_test"]["metrics"]
    for k in (1, 5):
        # CLIP_benchmark writes float32 fractions
        assert 100 * theirs[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"t2i_R@{k}"], abs=1e-4)
        assert 100 * theirs[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"i2t_R@{k}"], abs=1e-4)


def test_vladva_run_usage_and_unknown_tool():
    result = subprocess.run([sys.executable, "-m", "vladva_openclip.run"], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 2 and "usage: vladva-run TOOL" in result.stderr
    result = subprocess.run([sys.executable, "-m", "vladva_openclip.run", "no_such_tool.main"], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 2 and "no console script or module named 'no_such_tool.main'" in result.stderr
    assert "Traceback" not in result.stderr
