"""The evaluator on VladVA models: side by side with an open_clip CLIP in one run, and through CLIP_benchmark."""
import json

import pytest
import torch
from _helpers_eval import TINY_CLIP, fixture_tiny_clip_config_dir  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vladva_openclip.synth import build_world

    return build_world(tmp_path_factory.mktemp("world"), n_train=4, n_test=12, seed=1, write_wds=False,
                       progress=False)


def _tasks(paths):
    return [{"task": "retrieval", "data": str(paths.retrieval_json)},
            {"task": "sugarcrepe", "data": str(paths.sugarcrepe_dir), "images": str(paths.eval_images)},
            {"task": "winoground", "data": str(paths.winoground_dir)}]


def test_vladva_and_clip_side_by_side_in_one_run(world, tiny_clip_config_dir, tmp_path):
    from vladva_openclip.eval.cli import main as eval_main

    out = tmp_path / "results"
    argv = ["--model", "vladva-tiny-llava", "--model", "vladva-tiny-qwen2vl", "--model", TINY_CLIP,
            "--model-config-dir", str(tiny_clip_config_dir), "--no-cache", "--batch-size", "8", "--quiet",
            "--output-dir", str(out)]
    for task in _tasks(world):
        argv += ["--task", task.pop("task")] + [x for k, v in task.items() for x in (f"--{k}", v)]
    assert eval_main(argv) in (None, 0)
    report = json.loads((out / "results.json").read_text())
    labels = {m["label"] for m in report["models"]}
    assert {"vladva-tiny-llava", "vladva-tiny-qwen2vl", TINY_CLIP} <= labels
    table = (out / "results.md").read_text()
    for label in labels:
        assert label in table
    assert set(report["results"]) == labels
    for per_task in report["results"].values():
        assert set(per_task) == {"synth", "sugarcrepe", "winoground"}
        for result in per_task.values():
            for key, value in result["metrics"].items():
                if "mean_rank" in key or key == "rsum":
                    continue
                assert 0.0 <= value <= 100.0, (key, value)


def test_evaluate_api_equals_direct_encoding_on_vladva(world):
    import open_clip

    from vladva_openclip.eval import evaluate

    model, _, preprocess = open_clip.create_model_and_transforms("vladva-tiny-llava")
    tok = open_clip.get_tokenizer("vladva-tiny-llava")
    res = evaluate(model, preprocess, tok, [{"task": "winoground", "data": str(world.winoground_dir)}],
                   progress=False)
    metrics = next(iter(res.values()))["metrics"]
    # Recompute Winoground's text score by hand for the first examples.
    from PIL import Image
    lines = [json.loads(x) for x in (world.winoground_dir / "examples.jsonl").read_text().splitlines()]
    img_dir = world.winoground_dir / "images"
    hits = []
    model.eval()
    with torch.no_grad():
        for ex in lines:
            ims = torch.stack([preprocess(Image.open(next(img_dir.glob(f"{ex[k]}.*"))).convert("RGB"))
                               for k in ("image_0", "image_1")])
            fi = model.encode_image(ims, normalize=True)
            ft = model.encode_text(tok([ex["caption_0"], ex["caption_1"]]), normalize=True)
            s = fi @ ft.T  # [image, caption]
            hits.append(bool(s[0, 0] > s[0, 1]) and bool(s[1, 1] > s[1, 0]))
    expected = 100.0 * sum(hits) / len(hits)
    text_key = next(k for k in metrics if k.lower().startswith("text"))
    assert metrics[text_key] == pytest.approx(expected, abs=1e-6)


def test_clip_benchmark_runs_a_vladva_model(tmp_path):
    pytest.importorskip("clip_benchmark")
    import io
    import tarfile

    from PIL import Image

    from vladva_openclip.eval.clip_benchmark import main as cb_main

    root = tmp_path / "wds"
    (root / "test").mkdir(parents=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (48, 48), (40 * i, 255 - 30 * i, 90)).save(buf, format="PNG")
            for ext, payload in (("png", buf.getvalue()), ("txt", f"colour number {i}\nswatch {i}".encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "test" / "nshards.txt").write_text("1")
    (root / "dataset_type.txt").write_text("retrieval")
    out = tmp_path / "cb.json"
    argv = ["eval", "--dataset", "wds/tiny", "--dataset_root", str(root), "--task", "zeroshot_retrieval",
            "--model", "vladva-tiny-llava", "--pretrained", "", "--recall_k", "1", "5", "--no_amp",
            "--num_workers", "0", "--batch_size", "4", "--output", str(out), "--quiet"]
    assert cb_main(argv) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"image_retrieval_recall@1", "image_retrieval_recall@5", "text_retrieval_recall@1",
                            "text_retrieval_recall@5"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
