"""The synthetic compositional world: determinism, truth of captions and negatives, held-out split, file formats."""
from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vladva_openclip.synth import (
    NEGATIVE_TYPES,
    SUGARCREPE_PP_SUBSETS,
    SUGARCREPE_SUBSETS,
    WINOGROUND_KINDS,
    CaptionParseError,
    Scene,
    SceneObject,
    World,
    WorldConfig,
    build_world,
    holds,
    make_winoground_example,
    parse_caption,
    png_bytes,
    spec_facts,
    tokens,
)
from vladva_openclip.synth.__main__ import main as synth_cli
from vladva_openclip.synth.render import object_geometry

CFG = WorldConfig(seed=0)
WORLD = World(CFG)


def _samples(split: str, n: int):
    return [WORLD.sample(split, i) for i in range(n)]


# ------------------------------------------------------------------------------------------------ determinism

def test_same_seed_same_bytes_and_captions():
    a, b = World(WorldConfig(seed=3)), World(WorldConfig(seed=3))
    for i in range(20):
        sa, sb = a.sample("train", i), b.sample("train", i)
        assert (sa.short, sa.long) == (sb.short, sb.long)
        assert png_bytes(a.render(sa.scene)) == png_bytes(b.render(sb.scene))
        assert a.negatives(sa) == b.negatives(sb) and a.paraphrase(sa) == b.paraphrase(sb)


def test_different_seed_or_index_differs():
    a, b = World(WorldConfig(seed=0)), World(WorldConfig(seed=1))
    imgs_a = [png_bytes(a.render(a.sample("train", i).scene)) for i in range(10)]
    imgs_b = [png_bytes(b.render(b.sample("train", i).scene)) for i in range(10)]
    assert all(x != y for x, y in zip(imgs_a, imgs_b))
    assert len(set(imgs_a)) == 10
    assert [a.sample("train", i).long for i in range(10)] != [b.sample("train", i).long for i in range(10)]


def test_build_world_is_byte_identical_for_same_seed(tmp_path):
    kw = {"n_train": 12, "n_test": 6, "n_winoground": 3, "shard_size": 5, "progress": False}
    p1 = build_world(tmp_path / "a", seed=7, **kw)
    p2 = build_world(tmp_path / "b", seed=7, **kw)
    p3 = build_world(tmp_path / "c", seed=8, **kw)

    def files(root: Path) -> dict[str, bytes]:
        return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}

    f1, f2, f3 = files(p1.root), files(p2.root), files(p3.root)
    assert f1 == f2
    assert f1.keys() == f3.keys()
    assert f1["train/train.tsv"] != f3["train/train.tsv"]
    assert f1["train/shards/shard-000000.tar"] != f3["train/shards/shard-000000.tar"]


# ------------------------------------------------------------------------------------------------ the checker

def _obj(shape, colour, size, row, col):
    return SceneObject(shape=shape, colour=colour, size=size, row=row, col=col)


HAND_SCENE = Scene(
    objects=(_obj("circle", "red", "small", 1, 0), _obj("square", "blue", "large", 1, 2),
             _obj("star", "green", "small", 0, 1)),
    background="white", texture="plain",
)


@pytest.mark.parametrize("caption, truth", [
    ("a red circle left of a blue square", True),
    ("a small red circle to the left of a large blue square", True),
    ("a blue square to the right of a red circle and a green star", True),
    ("there is a green star above a red circle", True),
    ("a green star over a blue square", True),
    ("a red circle right of a blue square", False),     # relation
    ("a blue circle left of a red square", False),      # swapped colours
    ("a red square left of a blue circle", False),      # swapped shapes
    ("a large red circle", False),                      # wrong size
    ("a red circle above a blue square", False),        # same row: not above
    ("a red circle and a yellow star", False),          # extra object
    ("a red circle and a green star and a blue square and a green circle", False),  # more objects than exist
])
def test_checker_on_hand_built_scene(caption, truth):
    assert holds(caption, HAND_SCENE, CFG) is truth


@pytest.mark.parametrize("bad", ["a red", "left of a red circle", "a red circle left of", "a red blue circle",
                                 "nothing here"])
def test_parser_rejects_malformed(bad):
    with pytest.raises(CaptionParseError):
        parse_caption(bad, CFG)


def test_parser_round_trips_generated_captions():
    for s in _samples("train", 200):
        assert parse_caption(s.short, CFG).facts() == spec_facts(s.spec)


def test_rendered_pixels_match_scene_graph():
    """The pixel at each object's centre has the object's colour: images agree with their captions."""
    for s in _samples("train", 50):
        arr = np.asarray(WORLD.render(s.scene), dtype=np.int32)
        for obj in s.scene.objects:
            cx, cy, _ = object_geometry(obj, CFG)
            px = arr[int(cy), int(cx)]
            assert np.abs(px - np.array(CFG.colours[obj.colour])).max() <= 12, (s.short, obj)


# ------------------------------------------------------------------------------------------------ captions

def test_positives_true_and_lengths():
    for s in _samples("train", 300) + _samples("test", 100):
        assert holds(s.short, s.scene, CFG), s.short
        assert len(tokens(s.short)) < 30
        n_long = len(re.findall(r"\w+", s.long))
        assert 30 <= n_long <= 120, s.long
        assert n_long > len(tokens(s.short))


def test_long_caption_names_every_object_and_count():
    count_words = {1: ("single", "one"), 2: ("two",), 3: ("three",)}
    for s in _samples("train", 100):
        for o in s.scene.objects:
            assert f"{o.size} {o.colour} {o.shape}" in s.long
        assert any(w in s.long.split()[:8] for w in count_words[len(s.scene.objects)])
        assert s.scene.background in s.long


def test_long_captions_vary_in_phrasing():
    openings = {" ".join(s.long.split()[:2]) for s in _samples("train", 60)}
    assert len(openings) >= 3


def test_paraphrase_same_facts_different_words():
    for s in _samples("test", 150):
        para = WORLD.paraphrase(s)
        assert para != s.short
        assert Counter(tokens(para)) != Counter(tokens(s.short))
        assert parse_caption(para, CFG).facts() == parse_caption(s.short, CFG).facts()
        assert holds(para, s.scene, CFG)


# ------------------------------------------------------------------------------------------------ negatives

def _np_diff(pos, neg):
    return [(a, b) for a, b in zip(pos.nps, neg.nps) if a != b]


def _check_structure(kind, pos, neg):
    """The structured difference between a positive and its negative is what the type says."""
    if kind == "replace_obj":
        (a, b), = _np_diff(pos, neg)
        assert a.shape != b.shape and (a.colour, a.size) == (b.colour, b.size)
        assert len(pos.nps) == len(neg.nps) and pos.relations == neg.relations
    elif kind == "replace_att":
        (a, b), = _np_diff(pos, neg)
        assert a.shape == b.shape and ((a.colour != b.colour) ^ (a.size != b.size))
        assert b.colour is not None and (a.size is None) == (b.size is None)
        assert pos.relations == neg.relations
    elif kind == "replace_rel":
        assert pos.nps == neg.nps and len(pos.relations) == len(neg.relations) == 1
        (i, r1, j), (k, r2, m) = pos.relations[0], neg.relations[0]
        assert (i, j) == (k, m) and r1 != r2
    elif kind == "swap_obj":
        (a1, b1), (a2, b2) = _np_diff(pos, neg)
        assert (b1.shape, b2.shape) == (a2.shape, a1.shape) and a1.shape != a2.shape
        assert (a1.colour, a2.colour) == (b1.colour, b2.colour)
    elif kind == "swap_att":
        (a1, b1), (a2, b2) = _np_diff(pos, neg)
        assert a1.shape == b1.shape and a2.shape == b2.shape
        assert ((b1.colour, b2.colour) == (a2.colour, a1.colour) and a1.size == b1.size) or \
               ((b1.size, b2.size) == (a2.size, a1.size) and a1.colour == b1.colour)
    elif kind == "add_obj":
        (pos_nps, pos_rels), (neg_nps, neg_rels) = pos.facts(), neg.facts()
        added = neg_nps - pos_nps
        assert pos_nps + added == neg_nps and sum(added.values()) == 1 and pos_rels == neg_rels
        assert next(iter(added))[0] not in {n.shape for n in pos.nps}
    elif kind == "add_att":
        (a, b), = _np_diff(pos, neg)
        assert a.shape == b.shape
        assert (a.size is None and b.size is not None and a.colour == b.colour) or \
               (a.colour is None and b.colour is not None and a.size == b.size)
    else:
        raise AssertionError(f"untested negative type {kind}")


def test_every_negative_is_false_and_differs_as_its_type_says():
    seen = Counter()
    for s in _samples("test", 150) + _samples("train", 150):
        pos = parse_caption(s.short, CFG)
        for kind, neg_text in WORLD.negatives(s).items():
            seen[kind] += 1
            assert neg_text != s.short
            assert not holds(neg_text, s.scene, CFG), (kind, s.short, neg_text)
            _check_structure(kind, pos, parse_caption(neg_text, CFG))
    assert set(seen) == set(NEGATIVE_TYPES) == set(SUGARCREPE_SUBSETS)
    assert min(seen.values()) >= 20, seen


def test_inapplicable_negatives_are_absent():
    single = next(s for s in _samples("train", 50) if len(s.scene.objects) == 1)
    negs = WORLD.negatives(single)
    assert not {"swap_obj", "swap_att", "replace_rel"} & set(negs)
    assert {"replace_obj", "replace_att", "add_obj"} <= set(negs)


# ------------------------------------------------------------------------------------------------ winoground

def test_winoground_pairs():
    kinds = Counter()
    for i in range(40):
        ex = WORLD.winoground(i)
        kinds[ex.tag] += 1
        c0, c1 = ex.captions
        assert c0 != c1 and Counter(tokens(c0)) == Counter(tokens(c1))
        s0, s1 = ex.scenes
        assert holds(c0, s0, CFG) and not holds(c1, s0, CFG)
        assert holds(c1, s1, CFG) and not holds(c0, s1, CFG)
        assert png_bytes(WORLD.render(s0)) != png_bytes(WORLD.render(s1))
    assert len(kinds) == len(WINOGROUND_KINDS)


@pytest.mark.parametrize("kind", sorted(WINOGROUND_KINDS))
def test_winoground_each_kind(kind):
    ex = make_winoground_example(CFG, 5, kind=kind)
    assert ex.tag == WINOGROUND_KINDS[kind][0]
    assert holds(ex.captions[0], ex.scenes[0], CFG) and not holds(ex.captions[0], ex.scenes[1], CFG)


# ------------------------------------------------------------------------------------------------ held-out

def test_heldout_combos_absent_from_train_present_in_test():
    held = CFG.heldout_set
    for s in _samples("train", 1500):
        assert not {(o.colour, o.shape) for o in s.scene.objects} & held
    test_pairs = set()
    for s in _samples("test", 300):
        pairs = {(o.colour, o.shape) for o in s.scene.objects}
        assert pairs & held
        test_pairs |= pairs & held
    assert test_pairs == held


def test_config_rejects_bad_vocabulary():
    with pytest.raises(ValueError, match="held-out"):
        WorldConfig(heldout=(("magenta", "circle"),))
    with pytest.raises(ValueError, match="max_objects"):
        WorldConfig(max_objects=7)
    with pytest.raises(ValueError, match="closed under converse"):
        WorldConfig(relations=("left of",))
    with pytest.raises(ValueError, match="every colour"):
        WorldConfig(colours={"red": (255, 0, 0), "blue": (0, 0, 255)}, heldout=(("red", "star"), ("blue", "star")),
                    max_objects=2)


# ------------------------------------------------------------------------------------------------ writers

@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"), n_train=14, n_test=12, seed=0, shard_size=5,
                       n_winoground=4, progress=False)


def test_training_table_parses(world_dir):
    df = pd.read_csv(world_dir.train_csv, sep="\t")
    assert list(df.columns) == ["filepath", "short_caption", "long_caption"] and len(df) == 14
    for row in df.itertuples():
        img = Image.open(world_dir.train_csv.parent / row.filepath)
        assert img.size == (64, 64) and img.mode == "RGB"
    assert df.short_caption.tolist() == [WORLD.sample("train", i).short for i in range(14)]
    test = pd.read_csv(world_dir.test_csv, sep="\t")
    assert len(test) == 12 and (world_dir.test_csv.parent / test.filepath[0]).is_file()


def test_wds_shards_parse_and_match_table(world_dir):
    df = pd.read_csv(world_dir.train_csv, sep="\t")
    assert [p.name for p in world_dir.train_shard_files] == ["shard-000000.tar", "shard-000001.tar",
                                                             "shard-000002.tar"]
    assert world_dir.train_shards.endswith("shard-{000000..000002}.tar")
    sizes = json.loads((world_dir.train_shard_files[0].parent / "sizes.json").read_text())
    assert sizes == {"shard-000000.tar": 5, "shard-000001.tar": 5, "shard-000002.tar": 4}
    members = {}
    for shard in world_dir.train_shard_files:
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                members[m.name] = tf.extractfile(m).read()
    assert len(members) == 14 * 3
    for i, row in enumerate(df.itertuples()):
        key = f"{i:06d}"
        assert members[f"{key}.png"] == (world_dir.train_csv.parent / row.filepath).read_bytes()
        assert members[f"{key}.txt"].decode() == row.short_caption
        assert members[f"{key}.long.txt"].decode() == row.long_caption


def test_wds_shards_read_by_webdataset(world_dir):
    import webdataset as wds

    ds = wds.WebDataset(world_dir.train_shards, shardshuffle=False)
    samples = list(ds)
    assert len(samples) == 14
    assert {"png", "txt", "long.txt"} <= set(samples[0])
    assert Image.open(io.BytesIO(samples[0]["png"])).size == (64, 64)


def test_karpathy_retrieval_json(world_dir):
    data = json.loads(world_dir.retrieval_json.read_text())
    assert data["dataset"] == "synth" and len(data["images"]) == 12
    sentids = []
    for imgid, im in enumerate(data["images"]):
        assert set(im) == {"filepath", "filename", "imgid", "split", "sentids", "sentences"}
        assert im["split"] == "test" and im["imgid"] == imgid
        assert (world_dir.retrieval_json.parent / im["filepath"] / im["filename"]).is_file()
        assert len(im["sentences"]) == CFG.captions_per_image
        for sent in im["sentences"]:
            assert set(sent) == {"tokens", "raw", "imgid", "sentid"} and sent["imgid"] == imgid
            assert sent["tokens"] == re.findall(r"[a-z0-9]+", sent["raw"].lower())
        assert im["sentids"] == [s["sentid"] for s in im["sentences"]]
        sentids += im["sentids"]
        scene = WORLD.sample("test", imgid).scene
        assert all(holds(s["raw"], scene, CFG) for s in im["sentences"])
    assert sentids == list(range(len(sentids)))


def test_sugarcrepe_json(world_dir):
    files = sorted(p.stem for p in world_dir.sugarcrepe_dir.glob("*.json"))
    assert files == sorted(SUGARCREPE_SUBSETS)
    for name in files:
        data = json.loads((world_dir.sugarcrepe_dir / f"{name}.json").read_text())
        assert isinstance(data, dict) and list(data) == [str(i) for i in range(len(data))]
        for item in data.values():
            assert set(item) == {"filename", "caption", "negative_caption"}
            assert (world_dir.eval_images / item["filename"]).is_file()
            scene = WORLD.sample("test", int(item["filename"][5:11])).scene
            assert holds(item["caption"], scene, CFG) and not holds(item["negative_caption"], scene, CFG)


def test_sugarcrepe_pp_json(world_dir):
    files = sorted(p.stem for p in world_dir.sugarcrepe_pp_dir.glob("*.json"))
    assert files == sorted(SUGARCREPE_PP_SUBSETS)
    for name in files:
        data = json.loads((world_dir.sugarcrepe_pp_dir / f"{name}.json").read_text())
        assert isinstance(data, list) and [d["id"] for d in data] == list(range(len(data)))
        for item in data:
            assert set(item) == {"id", "filename", "caption", "caption2", "negative_caption"}
            assert item["caption2"] != item["caption"]
            assert (world_dir.eval_images / item["filename"]).is_file()


def test_winoground_files(world_dir):
    lines = (world_dir.winoground_dir / "examples.jsonl").read_text().splitlines()
    assert len(lines) == 4
    for i, line in enumerate(lines):
        ex = json.loads(line)
        assert set(ex) == {"id", "image_0", "image_1", "caption_0", "caption_1", "tag", "secondary_tag",
                           "num_main_preds", "collapsed_tag"}
        assert ex["id"] == i and ex["collapsed_tag"] in ("Object", "Relation", "Both")
        for k in (0, 1):
            assert ex[f"image_{k}"] == f"ex_{i}_img_{k}"
            assert Image.open(world_dir.winoground_dir / "images" / f"{ex[f'image_{k}']}.png").size == (64, 64)


def test_cli_builds_world(tmp_path, capsys):
    rc = synth_cli(["--out", str(tmp_path), "--n-train", "4", "--n-test", "3", "--seed", "2", "--image-size", "32",
                    "--no-wds", "--quiet", "--sep", ","])
    assert rc == 0
    meta = json.loads((tmp_path / "world.json").read_text())
    assert meta["config"]["seed"] == 2 and meta["counts"]["train"] == 4
    df = pd.read_csv(tmp_path / "train" / "train.csv")
    assert len(df) == 4 and Image.open(tmp_path / "train" / df.filepath[0]).size == (32, 32)
    assert not (tmp_path / "train" / "shards").exists()
    assert "retrieval_json" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ caption styles

COARSE = WorldConfig(seed=0, short_captions="coarse", long_captions="compact")


@pytest.mark.parametrize("config", [COARSE, CFG.with_(short_captions="coarse")], ids=["compact", "full"])
def test_coarse_short_caption_says_part_of_what_the_long_one_says(config):
    """Coarse short captions: their facts are a strict part of the scene's, all of them stated by the long caption,
    which states everything (objects with size, colour and position, relations, count, background)."""
    from vladva_openclip.synth.facts import caption_fact_set, scene_fact_set

    world = World(config)
    named = Counter()
    for s in [world.sample("train", i) for i in range(300)]:
        short, long = caption_fact_set(s.short, config), caption_fact_set(s.long, config)
        scene = scene_fact_set(s.scene, config)
        assert short <= long, (s.short, s.long, short - long)
        assert long == scene, (s.long, scene ^ long)
        assert short < scene and holds(s.short, s.scene, config)
        kinds = {f[0] for f in short}
        assert kinds <= {"object", "colour"}, s.short  # no size, relation, position or count
        n = len(s.scene.objects)
        mentioned = sum(1 for f in short if f[0] == "object")
        assert mentioned == 1 if n == 1 else 1 <= mentioned < n, (s.short, n)
        assert len(tokens(s.short)) <= 10
        named[("colour" in kinds, mentioned)] += 1
    assert named[(True, 1)] and named[(False, 1)] and named[(True, 2)]  # every form occurs


def test_detailed_short_captions_are_facts_of_the_scene_and_of_the_long_caption():
    from vladva_openclip.synth.facts import caption_fact_set, scene_fact_set

    for s in _samples("train", 200):
        short, long = caption_fact_set(s.short, CFG), caption_fact_set(s.long, CFG)
        assert short <= long == scene_fact_set(s.scene, CFG)


def test_fact_set_reads_every_kind_of_fact():
    from vladva_openclip.synth.facts import caption_fact_set, scene_fact_set

    text = ("The image shows two objects on a light gray background. In the top left corner, there is a small red "
            "circle. A large blue square is placed on the right side. The red circle is above and to the left of "
            "the blue square. Nothing else appears in the picture.")
    facts = caption_fact_set(text, CFG)
    assert facts == {("count", 2), ("background", "light gray"), ("object", "circle"), ("object", "square"),
                     ("colour", "circle", "red"), ("size", "circle", "small"), ("colour", "square", "blue"),
                     ("size", "square", "large"), ("position", "circle", "in the top left corner"),
                     ("position", "square", "on the right side"), ("relation", "circle", "above", "square"),
                     ("relation", "circle", "left of", "square")}
    scene = Scene(objects=(_obj("circle", "red", "small", 0, 0), _obj("square", "blue", "large", 1, 2)),
                  background="light gray", texture="dotted")
    assert scene_fact_set(scene, CFG) == facts
    # "right of" and "below" are read as their converses
    assert caption_fact_set("a blue square right of a red circle", CFG) == {
        ("object", "circle"), ("object", "square"), ("colour", "circle", "red"), ("colour", "square", "blue"),
        ("relation", "circle", "left of", "square")}
    with pytest.raises(CaptionParseError):
        caption_fact_set("The red is above.", CFG)


def test_compact_long_captions_are_shorter_and_keep_the_detailed_world_unchanged():
    compact, full = World(COARSE), World(CFG.with_(short_captions="coarse"))
    n_compact = [len(compact.sample("train", i).long.split()) for i in range(200)]
    n_full = [len(full.sample("train", i).long.split()) for i in range(200)]
    assert sum(n_compact) < 0.75 * sum(n_full) and max(n_compact) <= 90
    # the style of the train split's short captions never changes the images, the long captions or the test split
    for i in range(20):
        a, b = full.sample("train", i), WORLD.sample("train", i)
        assert (a.scene, a.long) == (b.scene, b.long)
        assert full.sample("test", i) == WORLD.sample("test", i)
    assert full.negatives(full.sample("test", 3)) == WORLD.negatives(WORLD.sample("test", 3))


def test_text_pairs_are_detailed_paraphrases():
    world = World(COARSE)
    for i in range(100):
        caption, para = world.text_pair("train", i)
        s = world.sample("train", i, short_captions="detailed")
        assert caption == s.short and para != caption
        assert parse_caption(para, COARSE).facts() == parse_caption(caption, COARSE).facts()
        assert holds(para, s.scene, COARSE)


def test_unknown_caption_style_is_an_error():
    with pytest.raises(ValueError, match="short_captions='terse' is not a caption style; known: detailed, coarse"):
        WorldConfig(short_captions="terse")
    with pytest.raises(ValueError, match="long_captions"):
        WorldConfig(long_captions="novel")
    with pytest.raises(ValueError, match="unknown short-caption style"):
        WORLD.sample("train", 0, short_captions="terse")


def test_build_world_writes_text_pair_columns(tmp_path):
    paths = build_world(tmp_path / "w", n_train=6, n_test=0, config=COARSE, write_wds=False, text_pairs=True,
                        progress=False)
    df = pd.read_csv(paths.train_csv, sep="\t", dtype=str, keep_default_na=False)
    assert list(df.columns) == ["filepath", "short_caption", "long_caption", "caption", "paraphrase"]
    world = World(COARSE)
    assert [tuple(r) for r in df[["caption", "paraphrase"]].values] == [world.text_pair("train", i) for i in range(6)]
    assert json.loads(paths.config_json.read_text())["config"]["short_captions"] == "coarse"
