"""Generative scoring (`vladva-eval --scoring generative`): the LVLM's log-likelihood of a caption given the image,
checked against a log-softmax computed by hand from transformers' own LLaVA forward, and the pair tasks' rules."""
import json

import open_clip
import pytest
import torch
from _helpers_eval import TINY_CLIP, fixture_tiny_clip_config_dir  # noqa: F401  (fixture)

import vladva_openclip  # noqa: F401  (registers the VladVA models)
from vladva_openclip.eval.generative import GenerativeConfig, GenerativeScorer, evaluate_generative


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vladva_openclip.synth import build_world

    return build_world(tmp_path_factory.mktemp("world"), n_train=0, n_test=12, seed=2, write_wds=False,
                       progress=False)


@pytest.fixture(scope="module")
def captioner():
    """The shipped captioner with the handcrafted caption prompt (every sequence id is a real token)."""
    from vladva_openclip.demo.pretrain_captioner import build_captioner

    model, _, preprocess = build_captioner("synth_captioner")
    return model.eval(), preprocess, model.tokenizer


def _hand_log_likelihood(model, image: torch.Tensor, caption: str) -> tuple[float, int]:
    """log p(caption, EOS | image, prompt) from ``LlavaForConditionalGeneration``'s own forward (it puts the image
    features into the image-token slots itself) and a log-softmax written out here."""
    tok = model.tokenizer
    prompt_ids = model.image_input_ids().tolist()
    answer = tok.answer_ids(caption) + [tok.eos_token_id]
    ids = torch.tensor([prompt_ids + answer])
    with torch.no_grad():
        logits = model.lvlm(input_ids=ids, pixel_values=image.unsqueeze(0), attention_mask=torch.ones_like(ids)
                            ).logits[0].double()
    log_probs = logits - logits.exp().sum(-1, keepdim=True).log()
    start = len(prompt_ids) - 1  # the logits at position t predict token t + 1
    total = sum(float(log_probs[start + k, t]) for k, t in enumerate(answer))
    return total, len(answer)


def test_scores_match_a_hand_computed_likelihood(captioner, world):
    from vladva_openclip.eval.images import ImageSet

    model, preprocess, tok = captioner
    images = ImageSet.from_paths(sorted(world.eval_images.glob("*.png"))[:3])
    captions = ["a red circle left of a blue square", "a blue square", ("The image shows a single object on a "
                "white background. In the center, there is a small red circle.")]
    index = torch.tensor([0, 1, 2, 1])
    caps = captions + ["a blue square"]  # a repeated pair is scored once, and the same
    for reduction in ("sum", "mean"):
        scorer = GenerativeScorer(model, preprocess, tok, GenerativeConfig(batch_size=2, reduction=reduction,
                                                                           progress=False))
        scores = scorer.score(images, index, caps)
        for k, (i, c) in enumerate(zip(index.tolist(), caps)):
            total, n = _hand_log_likelihood(model, preprocess(images.load(i)), c)
            expected = total if reduction == "sum" else total / n
            assert scores[k].item() == pytest.approx(expected, rel=1e-4, abs=1e-4), (reduction, c)
        assert scores[1] == scores[3]


def test_a_captioner_prefers_the_true_caption(captioner, world):
    """The shipped captioner scores each test scene's own long description above the next scene's (grounding)."""
    import pandas as pd

    from vladva_openclip.eval.images import ImageSet

    model, preprocess, tok = captioner
    df = pd.read_csv(world.test_csv, sep="\t")
    images = ImageSet.from_paths([world.test_csv.parent / p for p in df.filepath])
    scorer = GenerativeScorer(model, preprocess, tok, GenerativeConfig(progress=False))
    n = len(df)
    own = scorer.score(images, torch.arange(n), list(df.long_caption))
    other = scorer.score(images, torch.arange(n), list(df.long_caption.shift(1, fill_value=df.long_caption.iloc[-1])))
    assert (own > other).float().mean() >= 0.8


def test_pair_tasks_apply_their_rules_to_the_scores(world, monkeypatch):
    """SugarCrepe, SugarCrepe++ ITT and Winoground from chosen scores: the rules (strict >) and the averages."""
    model = open_clip.create_model("vladva-tiny-llava")
    tok = open_clip.get_tokenizer("vladva-tiny-llava")
    sc = json.loads((world.sugarcrepe_dir / "swap_att.json").read_text())
    wino = [json.loads(line) for line in (world.winoground_dir / "examples.jsonl").read_text().splitlines()]
    # Scores: a true caption (positive, caption_k with image k) scores 1, a negative 0; one tie per task.
    truth = {(e["filename"], e["caption"]) for e in sc.values()}
    tied_sc = next(iter(sc.values()))
    truth |= {(f"{e['image_0']}.png", e["caption_0"]) for e in wino} | {(f"{e['image_1']}.png", e["caption_1"])
                                                                       for e in wino}

    def fake_score(self, images, image_index, captions, desc=""):
        out = []
        for i, c in zip(image_index.tolist(), captions):
            name = images.keys[i].rsplit("/", 1)[-1]
            if (name, c) == (tied_sc["filename"], tied_sc["negative_caption"]):
                out.append(1.0)  # tie with the positive: counts as wrong
            else:
                out.append(1.0 if (name, c) in truth else 0.0)
        return torch.tensor(out)

    monkeypatch.setattr(GenerativeScorer, "score", fake_score)
    res = evaluate_generative(model, None, tok, [
        {"task": "sugarcrepe", "data": str(world.sugarcrepe_dir / "swap_att.json"), "images": str(world.eval_images)},
        {"task": "winoground", "data": str(world.winoground_dir)}], progress=False)
    n = len(sc)
    assert res["sugarcrepe"]["metrics"]["swap_att"] == pytest.approx(100.0 * (n - 1) / n)
    assert res["sugarcrepe"]["metrics"]["swap"] == res["sugarcrepe"]["metrics"]["swap_att"]
    assert res["winoground"]["metrics"] == {"text": 100.0, "image": 100.0, "group": 100.0}
    assert res["sugarcrepe"]["info"]["scoring"] == "generative"


def test_cli_scores_generatively_and_refuses_what_it_cannot_score(world, tmp_path, capsys, tiny_clip_config_dir):
    from vladva_openclip.eval.cli import main as eval_main

    out = tmp_path / "res"
    base = ["--no-cache", "--quiet", "--no-progress", "--batch-size", "16", "--output-dir", str(out),
            "--scoring", "generative"]
    tasks = ["--task", "sugarcrepe", "--data", str(world.sugarcrepe_dir), "--images", str(world.eval_images),
             "--task", "sugarcrepe_pp", "--data", str(world.sugarcrepe_pp_dir), "--images", str(world.eval_images),
             "--task", "winoground", "--data", str(world.winoground_dir)]
    assert eval_main(["--model", "vladva-tiny-llava:synth_captioner", *base, *tasks]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["meta"]["scoring"] == "generative"
    metrics = report["results"]["vladva-tiny-llava (synth_captioner)"]
    assert set(metrics) == {"sugarcrepe", "sugarcrepe_pp", "winoground"}
    assert "avg_itt" in metrics["sugarcrepe_pp"]["metrics"] and "avg_tot" not in metrics["sugarcrepe_pp"]["metrics"]
    assert all(0.0 <= v <= 100.0 for r in metrics.values() for v in r["metrics"].values())
    # retrieval is not offered: a clear error before any model is built
    assert eval_main(["--model", "vladva-tiny-llava", *base, "--task", "retrieval", "--data",
                      str(world.retrieval_json)]) == 2
    assert "generative scoring supports the pair tasks" in capsys.readouterr().err
    # a CLIP has no LVLM to score with
    assert eval_main(["--model", TINY_CLIP, "--model-config-dir", str(tiny_clip_config_dir), *base,
                      "--task", "winoground", "--data", str(world.winoground_dir)]) == 2
    assert "needs a VladVA model" in capsys.readouterr().err
