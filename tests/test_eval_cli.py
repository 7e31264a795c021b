"""vladva-eval: several models x several tasks in one run, JSON + Markdown output, cache reuse, bad input."""
import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
from _helpers_eval import (
    TINY_CLIP,
    fixture_tiny_clip_config_dir,  # noqa: F401  (fixtures)
    small_benchmarks,
    write_json,
)
from safetensors.torch import save_file

from vladva_openclip.eval import Report, evaluate, parse_model_spec
from vladva_openclip.eval.cli import main


@pytest.fixture(scope="module")
def setup(tiny_clip_config_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    specs = small_benchmarks(root / "data")
    ckpts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP)
        ckpts.append(root / f"seed{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpts[-1]))
    return root, specs, ckpts


def _task_args(specs):
    r, s, w, i = specs["retrieval"], specs["sugarcrepe"], specs["winoground"], specs["imagenet"]
    return ["--task", "retrieval", "--data", r["data"], "--images", r["images"],
            "--task", "sugarcrepe", "--data", s["data"], "--images", s["images"], "--subsets", "replace_obj,add_att",
            "--task", "winoground", "--data", w["data"],
            "--task", "imagenet", "--data", i["data"], "--set", 'classnames=["cat", "dog", "car"]',
            "--set", "templates=simple"]


def test_two_models_four_tasks_json_markdown_and_cache(setup, tiny_clip_config_dir, tmp_path, capsys):
    _, specs, (ck1, ck2) = setup
    argv = ["--model", f"{TINY_CLIP}:{ck1}", "--model", f"{TINY_CLIP}:{ck2}", *_task_args(specs),
            "--device", "cpu", "--workers", "0", "--batch-size", "5", "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    labels = [m["label"] for m in doc["models"]]
    assert labels == [f"{TINY_CLIP} (seed1.safetensors)", f"{TINY_CLIP} (seed2.safetensors)"]
    for label in labels:
        assert set(doc["results"][label]) == {"flickr30k", "sugarcrepe", "winoground", "imagenet"}
    assert set(doc["protocols"]) == {"retrieval", "sugarcrepe", "winoground", "zeroshot_classification"}
    assert doc["meta"]["device"] == "cpu" and doc["meta"]["open_clip"] == open_clip.__version__
    md = (tmp_path / "out" / "results.md").read_text()
    assert md in stdout
    assert "| Model | flickr30k T2I R@1/R@5/R@10 | flickr30k I2T R@1/R@5/R@10 |" in md
    assert "| Model | RO | AA | Replace | Add |" in md and "| Model | Image | Text | Group |" in md
    assert sum(line.startswith(f"| {TINY_CLIP} (seed") for line in md.splitlines()) == 8  # 2 models x 4 tables

    # the CLI reproduces the Python API on the same weights
    model, _, pre = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(ck2))
    api = evaluate(model, pre, open_clip.get_tokenizer(TINY_CLIP), [specs["retrieval"]], progress=False)
    assert doc["results"][labels[1]]["flickr30k"]["metrics"] == api["flickr30k"]["metrics"]

    # a second run reads every embedding from the cache (files untouched) and gives the same numbers
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")}
    assert len(files) >= 2 * 7  # per model: images + texts for each task, text prompts
    assert main([*argv[:-3], "--output-dir", str(tmp_path / "out2"), "--no-progress"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.safetensors")} == files
    doc2 = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert {m: {t: r["metrics"] for t, r in v.items()} for m, v in doc2["results"].items()} == \
        {m: {t: r["metrics"] for t, r in v.items()} for m, v in doc["results"].items()}


def test_missing_images_stop_the_run_unless_skipped(setup, tmp_path, capsys):
    root, _, (ck1, _) = setup
    data = tmp_path / "flickr"
    (data / "images").mkdir(parents=True)
    for i in range(3):
        (data / "images" / f"{i}.jpg").write_bytes((root / "data" / "flickr" / "images" / f"{i}.jpg").read_bytes())
    ann = write_json(data / "dataset_flickr30k.json", {"images": [
        {"filename": f"{i}.jpg", "split": "test", "sentences": [{"raw": f"caption {i}"}]} for i in range(5)]})
    argv = ["--model", f"{TINY_CLIP}:{ck1}", "--task", "retrieval", "--data", str(ann), "--images",
            str(data / "images"), "--no-cache", "--workers", "0", "--output-dir", str(tmp_path / "o"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "2 of 5 images are missing" in err and "3.jpg" in err and "4.jpg" in err and "--skip-missing" in err
    assert not (tmp_path / "o").exists()  # stopped before any model ran
    assert main([*argv, "--skip-missing"]) == 0
    info = json.loads((tmp_path / "o" / "results.json").read_text())["results"]
    assert next(iter(info.values()))["flickr30k"]["info"]["n_missing_images"] == 2


def test_bad_input_and_usage_errors(setup, tmp_path, capsys):
    _, specs, (ck1, _) = setup
    bad = write_json(tmp_path / "dataset_bad.json", {"images": [{"filename": "a.jpg", "split": "test"}]})
    base = ["--model", f"{TINY_CLIP}:{ck1}", "--no-cache", "--output-dir", str(tmp_path / "o"), "--quiet"]
    assert main([*base, "--task", "retrieval", "--data", str(bad)]) == 2
    assert "dataset_bad.json: entry images[0]: missing field 'sentences'" in capsys.readouterr().err
    assert main([*base, "--task", "retrieval", "--data", specs["retrieval"]["data"], "--set", "bogus=1"]) == 2
    assert "unknown option(s) ['bogus']" in capsys.readouterr().err
    assert main([*base, "--task", "retrieval", "--data", specs["retrieval"]["data"], "--split", "val"]) == 2
    assert "no images with captions for split='val'" in capsys.readouterr().err
    assert main(["--task", "winoground", "--data", specs["winoground"]["data"]]) == 2  # no --model
    with pytest.raises(SystemExit):
        main([*base, "--data", "x.json", "--task", "retrieval"])  # option before its --task
    assert "must follow the --task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--task", "flickr"])
    assert main(["--model", f"{TINY_CLIP}:missing.pt", "--task", "winoground", "--data", specs["winoground"]["data"],
                 "--no-cache", "--output-dir", str(tmp_path / "o"), "--quiet"]) == 2
    assert "cannot build model" in capsys.readouterr().err


def test_model_spec_parsing():
    assert parse_model_spec("ViT-B-32") == parse_model_spec("ViT-B-32:")
    spec = parse_model_spec("ViT-B-32:openai")
    assert (spec.name, spec.pretrained, spec.label) == ("ViT-B-32", "openai", "ViT-B-32 (openai)")
    assert parse_model_spec("hf-hub:timm/ViT-B-16-SigLIP").name == "hf-hub:timm/ViT-B-16-SigLIP"
    assert parse_model_spec("local-dir:/m/x:tag").pretrained == "tag"
    ckpt = parse_model_spec("vladva-tiny-llava:/ckpts/run1/adapter.safetensors")
    assert ckpt.label == "vladva-tiny-llava (adapter.safetensors)"
    with pytest.raises(ValueError):
        parse_model_spec(":openai")


def test_markdown_layout_column_major_like_the_paper():
    report = Report()
    for model in ("A", "B"):
        for name, base in (("flickr30k", 10.0), ("coco", 20.0)):
            report.add(model, {"task": "retrieval", "name": name, "info": {},
                               "metrics": {f"{d}_R@{k}": base + k for d in ("t2i", "i2t") for k in (1, 10)}})
    report.add("A", {"task": "winoground", "name": "winoground", "info": {},
                     "metrics": {"text": 40.5, "image": 17.5, "group": 12.75}})
    md = report.to_markdown().splitlines()
    assert "| Model | flickr30k T2I R@1/R@10 | coco T2I R@1/R@10 | flickr30k I2T R@1/R@10 | coco I2T R@1/R@10 |" in md
    assert "| A | 11.0 / 20.0 | 21.0 / 30.0 | 11.0 / 20.0 | 21.0 / 30.0 |" in md
    assert "| A | 17.5 | 40.5 | 12.8 |" in md  # Image / Text / Group as in the paper
    assert "| B | 17.5 | 40.5 | 12.8 |" not in md and sum(line.startswith("| B |") for line in md) == 1


@pytest.mark.slow
def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "vladva_openclip.eval", "--help"], capture_output=True, text=True,
                          check=False, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    assert "--task TYPE" in proc.stdout and "sugarcrepe_pp" in proc.stdout
