"""The LLaVA-NeXT family end to end with its tiny model on CPU: train, eval, embed, analyze, generate.

vladva-tiny-llavanext is LLaVA-NeXT's code path at toy size (64-px tiles, patch 16, the real pinpoints scaled by
64/336), so images of different aspect ratios get different numbers of image tokens, as in the 8B model.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

NAME = "vladva-tiny-llavanext"
# (width, height): four different image-token counts
SIZES = [(64, 64), (300, 100), (120, 300), (90, 91)]


def _noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def tiny():
    import open_clip

    import vladva_openclip  # noqa: F401

    model, _, preprocess = open_clip.create_model_and_transforms(NAME)
    return model.eval(), preprocess, open_clip.get_tokenizer(NAME)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vladva_openclip.synth import build_world

    return build_world(tmp_path_factory.mktemp("world"), n_train=0, n_test=8, seed=1, write_wds=False,
                       progress=False)


def _perturbed(model):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def test_counts_differ_and_rows_follow_each_image(tiny):
    model, preprocess, _ = tiny
    counts = [int((model.image_input_ids((h, w)) == 4).sum()) for w, h in SIZES]
    # 64x64: pinpoint 64x128 (1x2 tiles, a 4x8 feature grid), unpadded to 4x4, + 4 newlines + 16 base = 36
    assert counts[0] == 36 and len(set(counts)) == len(SIZES), counts
    batch = torch.stack([preprocess(_noise(w, h, i)) for i, (w, h) in enumerate(SIZES)])
    seq = model._image_rows(model._check_image(batch))
    ids, mask = seq.ids, seq.mask
    for row, (w, h) in enumerate(SIZES):
        assert ids[row][mask[row].bool()].tolist() == model.image_input_ids((h, w)).tolist()


def test_ar_pass_is_batch_invariant_and_matches_encode_image(tiny):
    """The one-pass image feature + next-token loss, on rows whose image parts differ in length, equals each item
    alone, and its feature equals encode_image's (LoRA perturbed so the adapters matter)."""
    import open_clip

    model = _perturbed(open_clip.create_model(NAME)).eval()
    _, preprocess, tok = tiny
    images = torch.stack([preprocess(_noise(w, h, i)) for i, (w, h) in enumerate(SIZES)])
    long = tok.long_captions(["a red circle above a blue square", "two", "", "green star " * 4], context_length=16)
    with torch.no_grad():
        feats, nll, n = model.image_features_and_ar(images, long)
        alone = [model.image_features_and_ar(images[i:i + 1], long[i:i + 1]) for i in range(4)]
        enc = model.encode_image(images, normalize=True)
    torch.testing.assert_close(feats, torch.cat([a[0] for a in alone]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nll, torch.cat([a[1] for a in alone]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(feats, enc, atol=1e-5, rtol=1e-5)
    assert n.tolist() == [a[2].item() for a in alone] and nll[2] == 0 and (nll[[0, 1, 3]] > 0).all()


def test_train_a_few_steps_then_load(tmp_path):
    import glob

    import open_clip

    from vladva_openclip.train.main import main

    args = ["--model", NAME, "--dataset-type", "synthetic", "--synthetic-size", "16", "--batch-size", "8",
            "--workers", "0", "--logs", str(tmp_path), "--name", "run", "--precision", "fp32", "--lr", "1e-2",
            "--warmup", "0", "--seed", "0", "--max-short-len", "24", "--max-long-len", "32", "--epochs", "1",
            "--log-every-n-steps", "1", "--report-to", ""]
    assert main(args) in (None, 0)
    ckpt = max(glob.glob(str(tmp_path / "run" / "checkpoints" / "epoch_*.pt")))
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    base = open_clip.create_model(NAME)
    assert set(state) == set(base.trainable_state_dict())
    trained = open_clip.create_model(NAME, pretrained=ckpt)
    moved = [k for k, v in trained.trainable_state_dict().items() if not torch.equal(v, base.trainable_state_dict()[k])]
    assert moved, "no trainable parameter changed in two steps"
    assert "Ar_loss" in (tmp_path / "run" / "out.log").read_text()


def test_eval_retrieval_and_winoground(world, tmp_path):
    from vladva_openclip.eval.cli import main as eval_main

    out = tmp_path / "results"
    argv = ["--model", NAME, "--no-cache", "--batch-size", "4", "--workers", "0", "--quiet", "--output-dir", str(out),
            "--task", "retrieval", "--data", str(world.retrieval_json),
            "--task", "winoground", "--data", str(world.winoground_dir)]
    assert eval_main(argv) in (None, 0)
    report = json.loads((out / "results.json").read_text())
    results = report["results"][NAME]
    assert set(results) == {"synth", "winoground"}
    for result in results.values():
        for key, value in result["metrics"].items():
            if "mean_rank" not in key and key != "rsum":
                assert 0.0 <= value <= 100.0, (key, value)
    # generative scoring runs the caption after each image's own image tokens (image_features_and_ar)
    gen_out = tmp_path / "generative"
    argv = ["--model", NAME, "--no-cache", "--batch-size", "4", "--workers", "0", "--quiet", "--scoring",
            "generative", "--output-dir", str(gen_out), "--task", "winoground", "--data", str(world.winoground_dir)]
    assert eval_main(argv) in (None, 0)
    metrics = json.loads((gen_out / "results.json").read_text())["results"][NAME]["winoground"]["metrics"]
    assert metrics and all(0.0 <= v <= 100.0 for v in metrics.values())


def test_embed_shards_equal_encode_image_on_mixed_aspect_ratios(tiny, tmp_path):
    from vladva_openclip.retrieval import EmbedJobConfig, run_embed

    model, preprocess, tok = tiny
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate(SIZES):
        _noise(w, h, i).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    out = tmp_path / "emb"
    run_embed(EmbedJobConfig(str(folder), str(out), model="vladva", shard_size=10, batch_size=3, workers=0,
                             dtype="float32", progress=False), model=model, preprocess=preprocess, tokenizer=tok)
    got = np.load(out / "img_emb" / "img_emb_0.npy")
    with torch.no_grad():
        ref = torch.cat([model.encode_image(preprocess(Image.open(folder / f"{i}.png"))[None], normalize=True)
                         for i in range(len(SIZES))]).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_analyze_prompts(world, tmp_path):
    from vladva_openclip.cli import main

    out = tmp_path / "prompts"
    rc = main(["analyze", "prompts", "--model", NAME, "--data", str(world.retrieval_json), "--limit", "2",
               "--max-images", "4", "--out", str(out), "--no-cache", "--no-plots", "--quiet", "--no-progress"])
    assert rc == 0
    report = json.loads((out / "prompts.json").read_text())
    assert len(report["candidates"]) == 2 and report["info"]["n_images"] == 4


def test_generate_per_image_token_counts_and_batch_invariance(tiny):
    model, preprocess, _ = tiny
    images = torch.stack([preprocess(_noise(w, h, i)) for i, (w, h) in enumerate(SIZES)])
    together = model.generate(images, prompt="Describe the image.", max_new_tokens=5)
    alone = [model.generate(images[i:i + 1], prompt="Describe the image.", max_new_tokens=5)[0] for i in range(4)]
    assert together == alone and all(isinstance(t, str) and t for t in together)


def test_saved_adapter_rebuilds_the_anyres_transform(tiny, tmp_path):
    """open_clip_config.json carries the anyres geometry in its resize_mode; local-dir: rebuilds model and transform."""
    import open_clip

    from vladva_openclip.adapters import save_adapter
    from vladva_openclip.anyres import AnyresTransform

    model = _perturbed(open_clip.create_model(NAME)).eval()
    _, preprocess, _ = tiny
    save_adapter(model, tmp_path / "ad", include_base=True, model_card=True)
    pp = json.loads((tmp_path / "ad" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert pp["resize_mode"] == "anyres:64/16:64x128,128x64,128x128,192x64,64x192" and pp["size"] == [321, 64]
    loaded, _, pre = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'ad'}")
    assert isinstance(pre, AnyresTransform)
    image = _noise(200, 80, 5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().encode_image(pre(image)[None]),
                                   model.encode_image(preprocess(image)[None]))
