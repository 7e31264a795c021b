"""Tasks end to end: results equal independent references (direct encoding + brute force / CLIP_benchmark /
open_clip's zero-shot classifier), hand-designed embeddings give hand-computed scores, ties score 0."""
import open_clip
import pytest
import torch
from _helpers_eval import (
    ConstantModel,
    TableModel,
    TableTokenizer,
    constant_tokenizer,
    fixture_tiny_clip,  # noqa: F401  (fixtures)
    fixture_tiny_clip_config_dir,  # noqa: F401
    small_benchmarks,
    to_tensor,
)

from vladva_openclip.eval import TASKS, Task, build_task, evaluate, register_task
from vladva_openclip.eval.embed import EmbedConfig, Embedder
from vladva_openclip.eval.tasks import zero_shot_weights


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return small_benchmarks(tmp_path_factory.mktemp("bench"))


def _encode(model, preprocess, tokenizer, images=None, texts=None):
    with torch.no_grad():
        if images is not None:
            return model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        return model.encode_text(tokenizer(texts), normalize=True)


def test_retrieval_matches_direct_reference_and_clip_benchmark(tiny_clip, bench):
    zr = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval", reason="clip-benchmark not installed")
    model, preprocess, tokenizer = tiny_clip
    spec = {**bench["retrieval"], "recall_k": (1, 2, 5, 10)}
    res = evaluate(model, preprocess, tokenizer, [spec], batch_size=4, progress=False)
    got = res["flickr30k"]["metrics"]
    assert res["flickr30k"]["info"]["n_captions"] == 18
    task = build_task(bench["retrieval"])
    data = task.prepare()
    img = _encode(model, preprocess, tokenizer, images=[data.images.load(i) for i in range(len(data.images))])
    txt = _encode(model, preprocess, tokenizer, texts=data.captions)
    scores = txt @ img.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(data.captions)), data.caption_image] = True
    for k in (1, 2, 5, 10):
        t2i = (zr.batchify(zr.recall_at_k, scores, positive, 8, "cpu", k=k) > 0).float().mean().item()
        i2t = (zr.batchify(zr.recall_at_k, scores.T, positive.T, 8, "cpu", k=k) > 0).float().mean().item()
        assert got[f"t2i_R@{k}"] == pytest.approx(100 * t2i, abs=1e-4)
        assert got[f"i2t_R@{k}"] == pytest.approx(100 * i2t, abs=1e-4)


def test_constant_model_scores_zero_everywhere(bench):
    res = evaluate(ConstantModel(), to_tensor, constant_tokenizer, list(bench.values()), progress=False)
    scores = {f"{name}/{k}": v for name, r in res.items() for k, v in r["metrics"].items() if "mean_rank" not in k}
    assert len(scores) > 20
    assert scores == {k: 0.0 for k in scores}


def test_sugarcrepe_and_winoground_hand_designed_embeddings(bench):
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # SugarCrepe images 000000..000003.jpg are id_image(0..3); winoground ex_k_img_j is id_image(2k + j)
    image_table = torch.stack([e0, e1, e0, e1])
    texts = {
        # replace_obj: image 0 (e0): right; image 1 (e1): wrong; image 2 (e0): tie -> wrong; image 3 (e1): right
        "thing 0": e0, "other 0": e1, "thing 1": e0, "other 1": e1, "thing 2": e0, "other 2": e0,
        "thing 3": e1, "other 3": e0,
        # add_att, image 1 (e1): right
        "a thing": e1, "a red thing": e0,
        # winoground ex 0: scores (1, .2, .9, 1) -> all right; ex 1: (.5, .6, .1, .9) -> text only
        "a 0 b": torch.tensor([1.0, 0.2]), "b 0 a": torch.tensor([0.9, 1.0]),
        "a 1 b": torch.tensor([0.5, 0.6]), "b 1 a": torch.tensor([0.1, 0.9]),
    }
    model = TableModel(image_table, torch.stack(list(texts.values())))
    res = evaluate(model, to_tensor, TableTokenizer(list(texts)), [bench["sugarcrepe"], bench["winoground"]],
                   batch_size=3, progress=False)
    sc = res["sugarcrepe"]["metrics"]
    assert sc["replace_obj"] == pytest.approx(50.0) and sc["add_att"] == pytest.approx(100.0)
    assert sc["replace"] == pytest.approx(50.0) and sc["add"] == pytest.approx(100.0) and "swap" not in sc
    wg = res["winoground"]["metrics"]
    # embeddings are normalised first: ex 0 c0=(.98,.196), c1=(.669,.743): text and image right;
    # ex 1 c0=(.64,.768), c1=(.11,.994): text right (.64 > .11, .994 > .768), image wrong (.64 < .768)
    assert (wg["text"], wg["image"], wg["group"]) == (100.0, 50.0, 50.0)


def test_sugarcrepe_pp_and_winoground_match_direct_reference(tiny_clip, bench):
    model, preprocess, tokenizer = tiny_clip
    res = evaluate(model, preprocess, tokenizer, [bench["sugarcrepe_pp"], bench["winoground"]], progress=False)
    pp = build_task(bench["sugarcrepe_pp"]).prepare()
    sub = pp.subsets["swap_obj"]
    img = _encode(model, preprocess, tokenizer, images=[pp.images.load(int(i)) for i in sub["image"]])
    p1, p2, n = (_encode(model, preprocess, tokenizer, texts=sub[r]) for r in ("caption", "caption2",
                                                                               "negative_caption"))
    itt = [(img[i] @ p1[i] > img[i] @ n[i]) and (img[i] @ p2[i] > img[i] @ n[i]) for i in range(3)]
    tot = [(p1[i] @ p2[i] > p1[i] @ n[i]) and (p1[i] @ p2[i] > p2[i] @ n[i]) for i in range(3)]
    assert res["sugarcrepe_pp"]["metrics"]["swap_obj_itt"] == pytest.approx(100 * sum(itt) / 3)
    assert res["sugarcrepe_pp"]["metrics"]["swap_obj_tot"] == pytest.approx(100 * sum(tot) / 3)
    wd = build_task(bench["winoground"]).prepare()
    ims = _encode(model, preprocess, tokenizer, images=[wd.images.load(i) for i in range(4)])
    c0, c1 = (_encode(model, preprocess, tokenizer, texts=t) for t in (wd.caption_0, wd.caption_1))
    text = [(c0[k] @ ims[2 * k] > c1[k] @ ims[2 * k]) and (c1[k] @ ims[2 * k + 1] > c0[k] @ ims[2 * k + 1])
            for k in range(2)]
    assert res["winoground"]["metrics"]["text"] == pytest.approx(50.0 * sum(text))


def test_zero_shot_classifier_matches_open_clip_and_metrics(tiny_clip, bench):
    model, preprocess, tokenizer = tiny_clip
    task = build_task(bench["imagenet"])
    data = task.prepare()
    emb = Embedder(model, preprocess, tokenizer, EmbedConfig(batch_size=3, progress=False))
    ours = zero_shot_weights(emb, data.classnames, data.templates)
    ref = open_clip.build_zero_shot_classifier(model, tokenizer, data.classnames, data.templates,
                                               num_classes_per_batch=2)
    torch.testing.assert_close(ours, ref.T, atol=1e-5, rtol=1e-5)
    res = evaluate(model, preprocess, tokenizer, [task], progress=False)["imagenet"]["metrics"]
    img = _encode(model, preprocess, tokenizer, images=[data.images.load(i) for i in range(len(data.images))])
    pred = (img @ ref).argmax(1)
    assert res["top1"] == pytest.approx(100 * (pred == data.targets).float().mean().item())
    assert "top5" not in res  # 3 classes


def test_registry_and_task_building(tmp_path, bench):
    assert {"retrieval", "sugarcrepe", "sugarcrepe_pp", "winoground", "imagenet",
            "zeroshot_classification"} <= set(TASKS)
    with pytest.raises(ValueError, match="unknown task type 'flickr'"):
        build_task({"task": "flickr", "data": "x"})
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['imgs'\]"):
        build_task({"task": "retrieval", "data": "x", "imgs": "y"})
    with pytest.raises(ValueError, match="several tasks are named"):
        evaluate(ConstantModel(), to_tensor, constant_tokenizer, [bench["winoground"], bench["winoground"]])

    @register_task("count_texts")
    class CountTexts(Task):  # a third-party task type plugs in without touching the harness
        from dataclasses import dataclass as _dc

        @_dc
        class Config:
            texts: tuple = ()
            name: str | None = None

        def load(self):
            return type("D", (), {"info": {"n": len(self.config.texts)}})()

        def score(self, embedder, data):
            return {"dim": float(embedder.texts(list(self.config.texts)).shape[1])}

    try:
        res = evaluate(ConstantModel(dim=5), to_tensor, constant_tokenizer,
                       [{"task": "count_texts", "texts": ("a", "b")}], progress=False)
        assert res["count_texts"]["metrics"] == {"dim": 5.0} and res["count_texts"]["info"] == {"n": 2}
    finally:
        del TASKS["count_texts"]
