"""Dataset loaders: every supported format, and bad input (missing images, malformed files, empty data)."""
import json
import os
import sys
import types

import pytest
from _helpers_eval import SHARED_DATA, id_image, karpathy_json, save_images, write_json

from vladva_openclip.eval.data_classification import load_image_folder, render_template, resolve_templates
from vladva_openclip.eval.data_compositional import load_sugarcrepe, load_sugarcrepe_pp, load_winoground
from vladva_openclip.eval.data_retrieval import load_retrieval
from vladva_openclip.eval.errors import AnnotationError, EmptyDatasetError, EvalDataError, MissingImagesError
from vladva_openclip.eval.images import ImageSet


@pytest.fixture
def flickr(tmp_path):
    items = [("a.png", ["A dog runs.", " Two dogs play. "]), ("b.png", ["A red car."]),
             ("c.png", ["One", "Two", "Three"])]
    save_images(tmp_path / "img", [id_image(i) for i in range(3)], ["a.png", "b.png", "c.png"])
    return karpathy_json(tmp_path / "dataset_flickr30k.json", items), tmp_path / "img"


def test_karpathy_test_split(flickr):
    ann, img = flickr
    d = load_retrieval(ann, img)
    assert [p.rsplit("/", 1)[1] for p in d.images.keys] == ["a.png", "b.png", "c.png"]
    assert d.captions == ["A dog runs.", "Two dogs play.", "A red car.", "One", "Two", "Three"]  # raw, stripped
    assert d.caption_image.tolist() == [0, 0, 1, 2, 2, 2]
    assert d.info["format"] == "karpathy" and d.info["n_captions"] == 6 and d.info["n_missing_images"] == 0
    with pytest.raises(MissingImagesError, match="train_only.png"):  # split=None keeps the train image too
        load_retrieval(ann, img, split=None)


def test_karpathy_filepath_coco_style(tmp_path):
    save_images(tmp_path / "val2014", [id_image(1)], ["COCO_val2014_1.jpg"])
    ann = karpathy_json(tmp_path / "dataset_coco.json", [("COCO_val2014_1.jpg", ["x", "y"])], filepath="val2014")
    d = load_retrieval(ann, tmp_path)
    assert d.images.keys[0].endswith("val2014/COCO_val2014_1.jpg")


def test_per_image_json_and_flat_train_rows(tmp_path):
    save_images(tmp_path / "imgs", [id_image(1), id_image(2)], ["x.png", "y.png"])
    test = write_json(tmp_path / "flickr30k_test.json",
                      [{"image": "imgs/x.png", "caption": ["c1", "c2"]}, {"image": "imgs/y.png", "caption": ["c3"]}])
    d = load_retrieval(test)  # images default to the JSON's folder
    assert d.captions == ["c1", "c2", "c3"] and d.caption_image.tolist() == [0, 0, 1]
    flat = write_json(tmp_path / "train.json", [{"image": "imgs/x.png", "caption": "c1", "image_id": 0},
                                                {"image": "imgs/y.png", "caption": "c3", "image_id": 1},
                                                {"image": "imgs/x.png", "caption": "c2", "image_id": 0}])
    d = load_retrieval(flat)
    assert d.captions == ["c1", "c2", "c3"] and d.caption_image.tolist() == [0, 0, 1]


def test_coco_captions_format_nocaps(tmp_path):
    save_images(tmp_path, [id_image(i) for i in range(3)], ["0.jpg", "1.jpg", "2.jpg"])
    ann = write_json(tmp_path / "nocaps_val_4500_captions.json", {
        "images": [{"id": 10, "file_name": "0.jpg", "domain": "in-domain"},
                   {"id": 11, "file_name": "1.jpg", "domain": "out-domain"},
                   {"id": 12, "file_name": "2.jpg", "domain": "out-domain"}],
        "annotations": [{"image_id": 11, "id": 0, "caption": "b1"}, {"image_id": 10, "id": 1, "caption": "a1"},
                        {"image_id": 11, "id": 2, "caption": "b2"}]})
    d = load_retrieval(ann)
    assert d.info["format"] == "coco_captions"
    assert d.captions == ["a1", "b1", "b2"] and d.caption_image.tolist() == [0, 1, 1]
    assert d.info["n_images_without_captions"] == 1  # image 12 has no caption: left out
    out = load_retrieval(ann, domain="out-domain")
    assert out.captions == ["b1", "b2"] and len(out.images) == 1


def test_missing_images_listed_then_skipped(tmp_path):
    names = [f"{i}.png" for i in range(8)]
    save_images(tmp_path, [id_image(0)], names[:1])
    ann = karpathy_json(tmp_path / "dataset_x.json", [(n, [f"cap {n}"]) for n in names])
    with pytest.raises(MissingImagesError) as err:
        load_retrieval(ann, tmp_path)
    msg = str(err.value)
    assert "7 of 8 images are missing" in msg and "1.png" in msg and "5.png" in msg
    assert "6.png" not in msg and "and 2 more" in msg and "--skip-missing" in msg
    d = load_retrieval(ann, tmp_path, skip_missing=True)
    assert d.captions == ["cap 0.png"] and d.info["n_missing_images"] == 7


def test_everything_missing_or_empty_is_an_error(tmp_path):
    ann = karpathy_json(tmp_path / "dataset_x.json", [("nope.png", ["c"])])
    with pytest.raises(EmptyDatasetError, match="every image is missing"):
        load_retrieval(ann, tmp_path, skip_missing=True)
    with pytest.raises(EmptyDatasetError, match=r"split='val'.*\['test', 'train'\]"):
        load_retrieval(ann, tmp_path, split="val")
    with pytest.raises(EmptyDatasetError):
        load_retrieval(write_json(tmp_path / "empty.json", []), tmp_path)


def test_malformed_annotations_name_file_and_entry(tmp_path):
    bad = write_json(tmp_path / "dataset_bad.json", {"images": [
        {"filename": "a.png", "split": "test", "sentences": [{"raw": "ok"}]},
        {"filename": "b.png", "split": "test", "sentences": [{"raw": "ok"}, {"raw": 3}]}]})
    with pytest.raises(AnnotationError, match=r"dataset_bad.json: entry images\[1\].sentences\[1\].*'raw'"):
        load_retrieval(bad, tmp_path)
    no_sent = write_json(tmp_path / "dataset_b2.json", {"images": [{"filename": "a.png", "split": "test",
                                                                    "sentences": []}]})
    with pytest.raises(AnnotationError, match=r"images\[0\].*non-empty list"):
        load_retrieval(no_sent, tmp_path)
    per_image = write_json(tmp_path / "p.json", [{"image": "a.png", "caption": ["x"]}, {"img": "b.png"}])
    with pytest.raises(AnnotationError, match=r"p.json: entry \[1\]: missing field 'image'"):
        load_retrieval(per_image, tmp_path)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(AnnotationError, match="broken.json: not valid JSON"):
        load_retrieval(tmp_path / "broken.json", tmp_path)
    with pytest.raises(AnnotationError, match="unknown retrieval format"):
        load_retrieval(write_json(tmp_path / "odd.json", {"foo": 1}), tmp_path)
    coco = write_json(tmp_path / "coco.json", {"images": [{"id": 1, "file_name": "a.png"}],
                                               "annotations": [{"image_id": 2, "caption": "x"}]})
    with pytest.raises(AnnotationError, match="no entry in 'images'"):
        load_retrieval(coco, tmp_path)
    with pytest.raises(EvalDataError, match="not found"):
        load_retrieval(tmp_path / "absent.json")


def _sugarcrepe_dir(tmp_path):
    d = tmp_path / "sc"
    write_json(d / "replace_obj.json", {"0": {"filename": "1.jpg", "caption": "p0", "negative_caption": "n0"},
                                        "2": {"filename": "2.jpg", "caption": "p1", "negative_caption": "n1"}})
    write_json(d / "swap_att.json", {"5": {"filename": "2.jpg", "caption": "p2", "negative_caption": "n2"}})
    save_images(tmp_path / "val2017", [id_image(1), id_image(2)], ["1.jpg", "2.jpg"])
    return d, tmp_path / "val2017"


def test_sugarcrepe_shared_images_and_subsets(tmp_path):
    d, img = _sugarcrepe_dir(tmp_path)
    data = load_sugarcrepe(d, img)
    assert list(data.subsets) == ["replace_obj", "swap_att"] and len(data.images) == 2  # 2.jpg embedded once
    assert data.subsets["replace_obj"]["ids"] == ["0", "2"]
    assert data.subsets["swap_att"]["image"].tolist() == [1]
    assert data.subsets["replace_obj"]["negative_caption"] == ["n0", "n1"]
    one = load_sugarcrepe(d / "swap_att.json", img)
    assert list(one.subsets) == ["swap_att"]
    with pytest.raises(EvalDataError, match="add_obj.json"):
        load_sugarcrepe(d, img, subsets=["add_obj"])
    with pytest.raises(EvalDataError, match="images folder is required"):
        load_sugarcrepe(d, None)


def test_sugarcrepe_missing_and_malformed(tmp_path):
    d, img = _sugarcrepe_dir(tmp_path)
    (img / "2.jpg").unlink()
    with pytest.raises(MissingImagesError, match="1 of 2 images"):
        load_sugarcrepe(d, img)
    with pytest.raises(EmptyDatasetError, match="swap_att"):  # its only example used the missing image
        load_sugarcrepe(d, img, skip_missing=True)
    data = load_sugarcrepe(d, img, subsets=["replace_obj"], skip_missing=True)
    assert data.subsets["replace_obj"]["ids"] == ["0"] and data.info["n_skipped_examples"] == 1
    write_json(d / "swap_obj.json", {"7": {"filename": "1.jpg", "caption": "p"}})
    with pytest.raises(AnnotationError, match=r"swap_obj.json: entry '7': missing field 'negative_caption'"):
        load_sugarcrepe(d, img, subsets=["swap_obj"])


@pytest.mark.skipif(not (SHARED_DATA / "sugar_crepe").is_dir(), reason=f"real annotations absent ({SHARED_DATA})")
def test_real_sugarcrepe_annotations(tmp_path):
    names = {e["filename"] for f in (SHARED_DATA / "sugar_crepe").glob("*.json")
             for e in json.loads(f.read_text()).values()}
    (tmp_path / "val2017").mkdir()
    for n in names:  # existence is all the loader checks; pixels are never read here
        (tmp_path / "val2017" / n).touch()
    data = load_sugarcrepe(SHARED_DATA / "sugar_crepe", tmp_path / "val2017")
    assert data.info["n_examples"] == {"replace_obj": 1652, "replace_att": 788, "replace_rel": 1406,
                                       "swap_obj": 245, "swap_att": 666, "add_obj": 2062, "add_att": 692}
    assert len(data.images) == 1560
    assert "108" not in data.subsets["swap_obj"]["ids"] and data.subsets["swap_obj"]["ids"][-1] == "245"


@pytest.mark.skipif(not (SHARED_DATA / "sugar_crepe_pp").is_dir(), reason=f"real annotations absent ({SHARED_DATA})")
def test_real_sugarcrepe_pp_annotations_text_only():
    data = load_sugarcrepe_pp(SHARED_DATA / "sugar_crepe_pp", None)
    assert data.images is None
    assert data.info["n_examples"] == {"swap_obj": 245, "swap_att": 666, "replace_obj": 1652, "replace_att": 788,
                                       "replace_rel": 1406}
    first = data.subsets["swap_obj"]
    assert first["caption"][0] == "A cat sits on its hind legs, and swats at the plant."
    assert first["caption2"][0] == "The cat swats at the plant while sitting on its hind legs."


def _winoground_dir(tmp_path, n=3):
    d = tmp_path / "winoground"
    rows = [{"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1", "caption_0": f"a {i}",
             "caption_1": f"b {i}", "tag": "Object"} for i in range(n)]
    (d / "examples.jsonl").parent.mkdir(parents=True)
    (d / "examples.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    save_images(d / "images", [id_image(k) for k in range(2 * n)],
                [f"ex_{i}_img_{j}.png" for i in range(n) for j in (0, 1)])
    return d


def test_winoground_jsonl(tmp_path):
    d = _winoground_dir(tmp_path)
    for source in (d, d / "examples.jsonl"):
        data = load_winoground(source)
        assert data.caption_0 == ["a 0", "a 1", "a 2"] and data.ids == ["0", "1", "2"]
        assert [k.rsplit("/", 1)[1] for k in data.images.keys[:2]] == ["ex_0_img_0.png", "ex_0_img_1.png"]
    (d / "images" / "ex_1_img_1.png").unlink()
    with pytest.raises(MissingImagesError, match="ex_1_img_1.png"):
        load_winoground(d)
    data = load_winoground(d, skip_missing=True)
    assert data.ids == ["0", "2"] and len(data.images) == 4
    with (d / "examples.jsonl").open("a") as f:
        f.write('{"id": 9, "image_0": "x", "caption_0": "c", "caption_1": "d"}\n')
    with pytest.raises(AnnotationError, match=r"examples.jsonl: entry at line 5: missing field 'image_1'"):
        load_winoground(d)


def test_winoground_saved_hf_dataset(tmp_path, monkeypatch):
    saved = tmp_path / "wino_hf"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["test"]}')
    rows = [{"id": i, "image_0": id_image(2 * i), "image_1": id_image(2 * i + 1), "caption_0": f"a {i}",
             "caption_1": f"b {i}", "tag": "Relation"} for i in range(2)]
    monkeypatch.setitem(sys.modules, "datasets", None)  # "not installed"
    with pytest.raises(EvalDataError, match="needs the 'datasets' package"):
        load_winoground(saved)
    # the real package is not a dependency; a stand-in with the same entry point checks our side of it
    fake = types.SimpleNamespace(load_from_disk=lambda p: {"test": rows})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = load_winoground(saved)
    assert data.caption_1 == ["b 0", "b 1"] and data.tags == ["Relation", "Relation"]
    assert data.images.load(3).getpixel((0, 0))[0] == 3 and data.images.fingerprint.startswith("pil:")
    with pytest.raises(EvalDataError, match="not 'val'"):
        load_winoground(saved, split="val")


def test_image_folder_classnames_and_templates(tmp_path):
    for cls, n in (("n02", 2), ("n01", 1), ("n03", 3)):
        save_images(tmp_path / cls, [id_image(i) for i in range(n)], [f"{i}.png" for i in range(n)])
    (tmp_path / "n03" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, ["one", "two", "three"], ["a {}.", "the {c}!"])
    assert data.targets.tolist() == [0, 1, 1, 2, 2, 2]  # folders sorted: n01, n02, n03
    assert [render_template(t, "cat") for t in data.templates] == ["a cat.", "the cat!"]
    assert len(resolve_templates("openai")) == 80 and len(resolve_templates("simple")) == 7
    mapped = load_image_folder(tmp_path, {"n01": "x", "n02": "y", "n03": "z"})
    assert mapped.classnames == ["x", "y", "z"]
    with pytest.raises(EvalDataError, match="default class names are ImageNet's 1000"):
        load_image_folder(tmp_path)
    with pytest.raises(EvalDataError, match="2 class names given but .* 3 class folders"):
        load_image_folder(tmp_path, ["a", "b"])
    with pytest.raises(EvalDataError, match="no '{}' or '{c}' placeholder"):
        load_image_folder(tmp_path, ["a", "b", "c"], ["a photo"])
    (tmp_path / "t.txt").write_text("a {}\n\nthe {}\n")
    assert resolve_templates(str(tmp_path / "t.txt")) == ["a {}", "the {}"]
    (tmp_path / "empty_cls").mkdir()
    empty = tmp_path / "empty_root"
    (empty / "c0").mkdir(parents=True)
    with pytest.raises(EmptyDatasetError, match="hold no images"):
        load_image_folder(empty, ["c0"])


def test_image_set_fingerprint_tracks_file_changes(tmp_path):
    (p,) = save_images(tmp_path, [id_image(1)], ["a.png"])
    before = ImageSet.from_paths([p]).fingerprint
    assert ImageSet.from_paths([p]).fingerprint == before
    id_image(2).save(p, format="PNG")
    os.utime(p, ns=(1, 1))
    after = ImageSet.from_paths([p])
    assert after.fingerprint != before and after.load(0).getpixel((0, 0))[0] == 2
