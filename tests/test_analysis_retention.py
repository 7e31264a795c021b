"""Caption retention: the long-caption fact checker against the world's own descriptions and hand-edited ones;
NLL against the captioner's own pretraining loss; generation through the model's public API."""
import math

import pytest
import torch
from _helpers_analysis import build_tiny

from vladva_openclip.analysis import caption_facts, caption_retention, fact_scores, world_scenes
from vladva_openclip.analysis.retention import RetentionConfig
from vladva_openclip.synth import World, WorldConfig


@pytest.mark.parametrize("seed, split, style", [(0, "train", "full"), (0, "test", "full"), (1000, "train", "full"),
                                               (0, "train", "compact"), (7, "test", "compact")])
def test_world_descriptions_state_every_fact_and_only_true_ones(seed, split, style):
    world = World(WorldConfig(seed=seed, long_captions=style))
    for i in range(150):
        s = world.sample(split, i)
        facts = caption_facts(s.long, world.config)
        scores = fact_scores(facts, s.scene)
        assert facts.unparsed == 0, s.long
        assert scores["all"]["precision"] == 100.0 and scores["all"]["recall"] == 100.0, (s.long, scores)
        assert scores["object"]["scene"] == len(s.scene.objects)
        assert scores["attribute"]["scene"] == 2 * len(s.scene.objects)


def _two_object_sample(world):
    return next(s for s in (world.sample("test", i) for i in range(100)) if len(s.scene.objects) == 2)


def test_fact_scores_of_a_hand_edited_caption():
    world = World(WorldConfig(seed=0))
    s = _two_object_sample(world)
    a, b = s.scene.objects
    rel = "above" if a.row < b.row else "below" if a.row > b.row else "to the left of" if a.col < b.col else \
        "to the right of"
    wrong_colour = next(c for c in world.config.colours if c not in (a.colour, b.colour))
    other_shape = next(sh for sh in world.config.shapes if sh not in (a.shape, b.shape))
    text = (f"There is a {a.size} {a.colour} {a.shape}. There is a {wrong_colour} {b.shape}. "
            f"There is a {other_shape}. The {a.colour} {a.shape} is {rel} the {b.colour} {b.shape}. "
            f"The {a.colour} {a.shape} is {rel} the {wrong_colour} {b.shape}. The small red background is dotted. "
            f"A large blue.")
    facts = caption_facts(text, world.config)
    scores = fact_scores(facts, s.scene)
    # objects: a, b (true), other_shape (false) -> 2/3 precision, 2/2 recall
    assert (scores["object"]["stated"], scores["object"]["true"], scores["object"]["recalled"]) == (3, 2, 2)
    # attributes: a's size and colour (true), b's wrong colour (false), b's true colour (named in the relation
    # sentence) -> 3/4; recall 3 of 4 (b's size is never said)
    assert (scores["attribute"]["stated"], scores["attribute"]["true"], scores["attribute"]["recalled"]) == (4, 3, 3)
    # relations: the true one, and the same relation about an object that is not there (false)
    assert (scores["relation"]["stated"], scores["relation"]["true"], scores["relation"]["recalled"])[:2] == (2, 1)
    assert scores["relation"]["precision"] == 50.0
    assert scores["all"]["precision"] == pytest.approx(100 * 6 / 9)
    assert facts.unparsed == 1  # "A large blue." names vocabulary words but is not a phrase of the world
    empty = fact_scores(caption_facts("Nothing to see here.", world.config), s.scene)
    assert math.isnan(empty["all"]["precision"]) and empty["all"]["recall"] == 0.0


def test_reference_nll_equals_the_captioners_own_loss():
    """reference_nll (instruction prompt) is the next-token loss the captioner was pretrained with."""
    from vladva_openclip.demo.pretrain_captioner import build_captioner, caption_nll

    model, pre = build_tiny("vladva-tiny-llava", pretrained="synth_captioner")
    scenes = world_scenes(3, seed=7, split="train")
    result = caption_retention({"base": (model, pre)}, scenes, RetentionConfig(max_new_tokens=12, progress=False))
    cap, _, cpre = build_captioner("synth_captioner")
    ids = cap.tokenizer.long_captions(scenes.references, context_length=128)  # tokenized as the answer
    nll, n = caption_nll(cap.eval(), torch.stack([cpre(im) for im in scenes.images]), ids)
    assert result.summary["base"]["reference_nll"] == pytest.approx(float(nll.sum() / n.sum()), rel=1e-5)
    # generation is the model's own (greedy, the same instruction)
    with torch.no_grad():
        expected = model.generate(torch.stack([pre(im) for im in scenes.images]), RetentionConfig.instruction,
                                  max_new_tokens=12)
    assert [c["generated"] for c in result.captions["base"]] == [t.strip() for t in expected]
    rec = result.captions["base"][0]
    assert {"object_precision", "relation_recall", "all_recall", "unparsed_sentences"} <= set(rec)


def test_retention_compares_models_and_writes_outputs(tmp_path):
    base, pre = build_tiny("vladva-tiny-llava", pretrained="synth_captioner")
    noise, _ = build_tiny("vladva-tiny-llava")  # random weights: no captioner at all
    scenes = world_scenes(2, seed=7)
    result = caption_retention({"captioner": (base, pre), "random": (noise, pre)}, scenes,
                               RetentionConfig(max_new_tokens=10, progress=False))
    s = result.summary
    assert s["random"]["reference_nll"] > 7.0  # ln(2048) = 7.6: a random model knows nothing of the captions
    assert s["captioner"]["reference_nll"] < 0.5 * s["random"]["reference_nll"]
    assert s["captioner"]["reference_nll_own_prompt"] > 0
    files = result.save(tmp_path / "ret")
    assert {"csv", "captions_csv", "json", "md", "png"} <= set(files)
    assert "object_precision" in (tmp_path / "ret" / "retention.csv").read_text().splitlines()[0]
    with pytest.raises(ValueError, match="at least one scene"):
        world_scenes(0)
    with pytest.raises(ValueError, match="instruction is empty"):
        RetentionConfig(instruction=" ")


def test_extra_reference_styles_score_the_same_scenes():
    """Descriptions of the same scenes in another style are scored as an extra set; its NLL equals the NLL of a
    run that takes that style as the primary references."""
    model, pre = build_tiny("vladva-tiny-llava", pretrained="synth_captioner")
    compact = world_scenes(2, seed=7, long_captions="compact", extra_styles=["full"])
    full = world_scenes(2, seed=7, long_captions="full")
    assert compact.scenes == full.scenes and compact.references != full.references
    assert compact.extra_references["full"] == full.references
    cfg = RetentionConfig(max_new_tokens=4, progress=False)
    a = caption_retention({"m": (model, pre)}, compact, cfg).summary["m"]
    b = caption_retention({"m": (model, pre)}, full, cfg).summary["m"]
    assert a["reference_nll_full"] == pytest.approx(b["reference_nll"], rel=1e-6)
    assert a["reference_nll"] != pytest.approx(b["reference_nll"])
