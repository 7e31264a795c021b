"""Every command on the tiny Qwen2.5-VL and Qwen3-VL models, CPU: train (a few steps), eval, embed, analyze, and
the captioning path (``generate``). ``vladva plan`` is another issue's command and is not covered here."""
import csv
import glob
import json

import numpy as np
import open_clip
import pytest
import torch
from _helpers_analysis import fixture_analysis_world  # noqa: F401  (fixture)
from _helpers_eval import small_benchmarks
from _helpers_retrieval import image_folder
from PIL import Image

import vladva_openclip  # noqa: F401  (registers the VladVA models)

FAMILIES = ["vladva-tiny-qwen25vl", "vladva-tiny-qwen3vl"]
QUIET = ["--quiet", "--no-progress"]


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, tmp_path_factory):
    """(model name, checkpoint of 1 epoch (2 steps) of vladva-train on 8 synthetic scenes, its log folder)."""
    from vladva_openclip.train.main import main

    name = request.param
    logs = tmp_path_factory.mktemp("train")
    args = ["--model", name, "--dataset-type", "synthetic", "--synthetic-size", "8", "--batch-size", "4",
            "--workers", "0", "--logs", str(logs), "--name", "run", "--precision", "fp32", "--lr", "1e-2",
            "--warmup", "0", "--seed", "0", "--max-short-len", "24", "--max-long-len", "48", "--epochs", "1",
            "--log-every-n-steps", "1", "--report-to", ""]
    assert main(args) in (None, 0)
    ckpts = sorted(glob.glob(str(logs / "run" / "checkpoints" / "epoch_*.pt")))
    assert ckpts and ckpts[-1].endswith("epoch_1.pt")
    return name, ckpts[-1], logs / "run"


def test_train_writes_adapter_sized_checkpoints_that_load(trained):
    name, ckpt, run = trained
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    base = open_clip.create_model(name).eval()
    assert set(state) == set(base.trainable_state_dict())
    model = open_clip.create_model(name, pretrained=ckpt).eval()
    lora = [k for k in state if "lora_B" in k]
    assert lora and any(float(state[k].abs().sum()) > 0 for k in lora)  # the run moved LoRA off its zero init
    log = (run / "out.log").read_text()
    assert "Ar_loss" in log and "Contrastive_loss" in log
    tok = open_clip.get_tokenizer(name)
    with torch.no_grad():
        assert not torch.allclose(model.encode_text(tok(["a red circle"])), base.encode_text(tok(["a red circle"])))


def test_eval_runs_the_trained_model(trained, tmp_path):
    from vladva_openclip.eval.cli import main

    name, ckpt, _ = trained
    specs = small_benchmarks(tmp_path / "data")
    r, w = specs["retrieval"], specs["winoground"]
    argv = ["--model", f"{name}:{ckpt}", "--task", "retrieval", "--data", r["data"], "--images", r["images"],
            "--task", "winoground", "--data", w["data"], "--device", "cpu", "--workers", "0", "--batch-size", "5",
            "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    (label,) = doc["results"]
    assert set(doc["results"][label]) == {"flickr30k", "winoground"}


def test_embed_shards_equal_encode_image(trained, tmp_path):
    from vladva_openclip.retrieval import EmbedJobConfig, run_embed

    name, _, _ = trained
    paths = image_folder(tmp_path / "imgs", 5)
    out = tmp_path / "emb"
    run_embed(EmbedJobConfig(str(tmp_path / "imgs"), str(out), model=name, shard_size=3, batch_size=2, workers=0,
                             dtype="float32", progress=False))
    got = np.concatenate([np.load(out / "img_emb" / f"img_emb_{k}.npy") for k in range(2)])
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    model.eval()
    with torch.no_grad():
        ref = torch.cat([model.encode_image(preprocess(Image.open(p).convert("RGB"))[None], normalize=True)
                         for p in paths]).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_analyze_commands(name, analysis_world, tmp_path):
    from vladva_openclip.cli import main

    data = ["--data", str(analysis_world.retrieval_json)]
    assert main(["analyze", "prompts", "--model", name, *data, "--limit", "2", "--max-images", "4",
                 "--out", str(tmp_path / "p"), "--no-cache", "--no-plots", *QUIET]) == 0
    assert len(json.loads((tmp_path / "p" / "prompts.json").read_text())["candidates"]) == 2
    assert main(["analyze", "next-token", "--model", name, *data, "--image-index", "0", "--caption-index", "0",
                 "-k", "3", "--out", str(tmp_path / "nt"), *QUIET]) == 0
    with open(tmp_path / "nt" / "next_tokens.csv", newline="") as f:  # a token may be a quoted newline
        assert len(list(csv.reader(f))) == 1 + 2 * 3
    assert main(["analyze", "attention", "--model", name, *data, "--image-index", "1", "--layers", "1",
                 "--heads", "0", "--out", str(tmp_path / "attn"), *QUIET]) == 0
    assert (tmp_path / "attn" / "attention_maps_0.png").is_file()
    assert main(["analyze", "retention", "--model", name, "--n-scenes", "1", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "ret"), *QUIET]) == 0
    assert json.loads((tmp_path / "ret" / "retention.json").read_text())["info"]["scenes"]["n"] == 1


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_views_share_one_vision_pass_exactly(name):
    """The analyses' many-prompts path (KV cache over the shared image prefix) equals each view's encode_image;
    for Qwen3-VL this includes the DeepStack injection in the cached prefix."""
    from _helpers_analysis import perturb_lora

    from vladva_openclip.analysis._lvlm import encode_images_with_prompts, prompt_view

    model, _, _ = open_clip.create_model_and_transforms(name)
    model.eval()
    perturb_lora(model)
    views = [prompt_view(model, "In one word:", None), prompt_view(model, "Summary above image in one word:", None)]
    s = model.cfg.image_size
    pixels = torch.randn(2, 3, s, s)
    with torch.no_grad():
        for reuse in (True, False):
            got = encode_images_with_prompts(model, views, pixels, reuse=reuse)
            for view, emb in zip(views, got):
                torch.testing.assert_close(emb, view.encode_image(pixels), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_caption_generate_with_one_and_several_image_sizes(name):
    model, _, _ = open_clip.create_model_and_transforms(name)
    model.eval()
    s = model.cfg.image_size
    unit = model.backbone._unit(model.lvlm.config)
    same = model.generate(torch.randn(2, 3, s, s), "Describe the image.", max_new_tokens=4)
    mixed = model.generate([torch.randn(3, s, s), torch.randn(3, unit, 2 * unit)], ["Describe.", "What?"],
                           max_new_tokens=4)
    assert len(same) == 2 and len(mixed) == 2 and all(isinstance(t, str) for t in same + mixed)
    # left padding: a row's caption does not depend on the other row (greedy)
    one = torch.randn(1, 3, s, s)
    alone = model.generate(one, "Describe the image.", max_new_tokens=4)
    with_other = model.generate([one[0], torch.randn(3, unit, 2 * unit)], "Describe the image.", max_new_tokens=4)
    assert with_other[0] == alone[0]


def test_fixed_size_family_takes_a_list_of_one_size_only():
    """LLaVA-1.5's CLIP tower has fixed position embeddings: a list of its size is a batch, other sizes are one
    clear error (the dynamic-resolution path is the Qwen families')."""
    model, _, _ = open_clip.create_model_and_transforms("vladva-tiny-llava")
    model.eval()
    s = model.cfg.image_size
    images = [torch.randn(3, s, s), torch.randn(3, s, s)]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), model.encode_image(torch.stack(images)))
        with pytest.raises(ValueError, match="one image size"):
            model.encode_image([images[0], torch.randn(3, s, 2 * s)])
        with pytest.raises(ValueError, match=f"3,{s},{s}"):
            model.encode_image(torch.randn(1, 3, s, 2 * s))


@pytest.mark.parametrize("name", FAMILIES)
def test_caption_job(name, tmp_path):
    """`vladva caption`'s job with the tiny model as the captioner: every image gets its caption in the sidecar."""
    from _helpers_caption import scenes

    from vladva_openclip.caption import CaptionJobConfig, GenerationSettings, run_caption
    from vladva_openclip.caption.backends.vladva import VladVACaptioner
    from vladva_openclip.eval.api import ModelSpec, load_model

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (image, _, _) in enumerate(scenes(3)):
        image.save(folder / f"{i}.png")
    model, preprocess, tokenizer = load_model(ModelSpec(name))
    captioner = VladVACaptioner(model, preprocess, tokenizer, label=name)
    manifest = run_caption(CaptionJobConfig(str(folder), str(tmp_path / "out"), long_prompt="detailed", workers=0,
                                            progress=False, long_generation=GenerationSettings(max_new_tokens=4),
                                            short_generation=GenerationSettings(max_new_tokens=3)),
                           captioner=captioner)
    assert manifest["counts"]["captioned"] == 3 and manifest["counts"]["skipped"] == 0
