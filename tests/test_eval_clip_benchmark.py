"""vladva-clip-benchmark: LAION's CLIP_benchmark CLI, unchanged, on a tiny webdataset retrieval set built here;
its numbers must equal vladva-eval's on the same images, captions and weights."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _helpers_eval import (
    TINY_CLIP,
    fixture_tiny_clip_config_dir,  # noqa: F401  (fixtures)
    photo_images,
    save_images,
    write_json,
    write_wds_retrieval,
)
from safetensors.torch import save_file

from vladva_openclip.eval import RetrievalTask, evaluate
from vladva_openclip.eval.clip_benchmark import main as cb_main
from vladva_openclip.eval.clip_benchmark import split_wrapper_args

pytest.importorskip("clip_benchmark", reason="clip-benchmark not installed (pip install 'vladva_openclip[bench]')")

CAPTIONS = [["a chinese temple by a lake", "a pagoda"], ["an orange flower"], ["a temple roof"],
            ["a dahlia in bloom", "petals"], *[[f"noise pattern {i}"] for i in range(4, 12)]]


@pytest.fixture(scope="module")
def wds_set(tmp_path_factory):
    """``root/test/0.tar`` (``<key>.png`` + ``<key>.txt``, one caption a line), nshards.txt, dataset_type.txt;
    plus the same data as a per-image retrieval JSON for vladva-eval."""
    root = tmp_path_factory.mktemp("wds_tiny")
    images = photo_images(len(CAPTIONS))
    write_wds_retrieval(root, images, CAPTIONS)
    save_images(root / "plain", images, [f"s{i:03d}.png" for i in range(len(images))])
    ann = write_json(root / "plain" / "tiny_test.json",
                     [{"image": f"s{i:03d}.png", "caption": caps} for i, caps in enumerate(CAPTIONS)])
    return root, ann


@pytest.fixture(scope="module")
def checkpoint(tiny_clip_config_dir, tmp_path_factory):
    import open_clip

    torch.manual_seed(3)
    model = open_clip.create_model(TINY_CLIP)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _cb_args(root, ckpt, out, config_dir):
    return ["--model-config-dir", str(config_dir), "eval", "--dataset", "wds/tiny", "--dataset_root", str(root),
            "--task", "zeroshot_retrieval", "--model", TINY_CLIP, "--pretrained", str(ckpt), "--recall_k", "1", "5",
            "--no_amp", "--num_workers", "0", "--batch_size", "4", "--output", str(out), "--quiet"]


def _ours(ann, ckpt):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(ckpt))
    res = evaluate(model, preprocess, open_clip.get_tokenizer(TINY_CLIP),
                   [RetrievalTask(data=ann, recall_k=(1, 5))], progress=False)
    return res["tiny_test"]["metrics"]


def test_clip_benchmark_in_process_matches_vladva_eval(wds_set, checkpoint, tiny_clip_config_dir, tmp_path):
    root, ann = wds_set
    out = tmp_path / "cb.json"
    assert cb_main(_cb_args(root, checkpoint, out, tiny_clip_config_dir)) == 0
    dump = json.loads(out.read_text())
    assert dump["model"] == TINY_CLIP and dump["task"] == "zeroshot_retrieval"
    ours = _ours(ann, checkpoint)
    for k in (1, 5):  # CLIP_benchmark: image_retrieval = text->image, text_retrieval = image->text; fractions
        assert 100 * dump["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"t2i_R@{k}"], abs=1e-4)
        assert 100 * dump["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"i2t_R@{k}"], abs=1e-4)
    assert 0 < ours["t2i_R@5"] < 100  # a random tiny model: neither trivially right nor wrong


def test_wrapper_argument_split():
    assert split_wrapper_args(["--model-config-dir", "a", "--model-config-dir=b", "eval", "--model", "x"]) == (
        ["a", "b"], ["eval", "--model", "x"])
    assert split_wrapper_args(["eval", "--model-config-dir", "a"]) == ([], ["eval", "--model-config-dir", "a"])


@pytest.mark.slow
def test_console_script_subprocess(wds_set, checkpoint, tiny_clip_config_dir, tmp_path):
    """The installed entry point, in a fresh process (where only the wrapper can have registered anything)."""
    exe = shutil.which("vladva-clip-benchmark", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("vladva-clip-benchmark is not installed in this environment (pip install -e .)")
    root, _ = wds_set
    out = tmp_path / "cb.json"
    proc = subprocess.run([exe, *_cb_args(root, checkpoint, out, tiny_clip_config_dir)], capture_output=True,
                          text=True, check=False, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
                            "text_retrieval_recall@5"}
