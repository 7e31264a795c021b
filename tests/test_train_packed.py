"""Packed training tables (images + caption ids made once) and the E5-V-style text-pair training."""
import pytest
import torch

import vladva_openclip  # noqa: F401  (registers the VladVA models)
from vladva_openclip.train._common import CaptionPacker, SkipCounter, TrainInputError
from vladva_openclip.train.packed import PackedTableDataset, write_packed_table

MODEL = "vladva-tiny-llava"


@pytest.fixture(scope="module")
def model_parts():
    import open_clip

    _, preprocess_train, preprocess = open_clip.create_model_and_transforms(MODEL)
    return preprocess_train, preprocess, open_clip.get_tokenizer(MODEL)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from vladva_openclip.demo.pretrain_captioner import render_split
    from vladva_openclip.synth import World, WorldConfig, build_world

    config = WorldConfig(seed=4, short_captions="coarse", long_captions="compact")
    root = tmp_path_factory.mktemp("packed")
    paths = build_world(root / "w", n_train=12, n_test=0, config=config, write_wds=False, text_pairs=True,
                        progress=False)
    images, shorts, longs = render_split(World(config), "train", 12, progress=False)
    return paths, images, shorts, longs, root


def test_packed_table_gives_what_the_csv_table_gives(world, model_parts):
    """Same pixels and ids as the trainer's CSV reader, with the transform declared (preprocessed once) or not
    (applied per sample, seeded as the CSV reader seeds it: augmentations too)."""
    from vladva_openclip.train.data import CaptionTableDataset

    paths, images, shorts, longs, root = world
    preprocess_train, preprocess, tok = model_parts
    packer = CaptionPacker(tok, 32, 96)
    for transform, declared in ((preprocess, True), (preprocess_train, False)):
        csv = CaptionTableDataset(paths.train_csv, transform, packer, SkipCounter("t"), caption_key="short_caption",
                                  seed=3)
        table = write_packed_table(root / f"t{declared}.safetensors", images, shorts, longs, packer,
                                   preprocess=transform if declared else None)
        packed = PackedTableDataset(table, transform, packer, seed=3)
        assert len(packed) == len(csv) == 12
        assert (packed.pixels is not None) is declared
        for i in range(12):
            (a, ta), (b, tb) = csv[i], packed[i]
            assert torch.equal(a, b) and torch.equal(ta, tb), i


def test_packed_table_refuses_other_settings(world, model_parts, tmp_path):
    _, preprocess, tok = model_parts
    _, images, shorts, longs, _ = world
    table = write_packed_table(tmp_path / "t.safetensors", images, shorts, longs, CaptionPacker(tok, 32, 96),
                               preprocess=preprocess)
    with pytest.raises(TrainInputError, match="other caption settings"):
        PackedTableDataset(table, preprocess, CaptionPacker(tok, 32, 64))
    with pytest.raises(TrainInputError, match="other caption settings"):
        PackedTableDataset(table, preprocess, CaptionPacker(tok, 32, 96, pair_text=True))
    import torchvision.transforms as T
    with pytest.raises(TrainInputError, match="is meant for the transform"):
        PackedTableDataset(table, T.Compose([T.ToTensor()]), CaptionPacker(tok, 32, 96))
    from vladva_openclip._fs import save_safetensors
    save_safetensors({"x": torch.zeros(1)}, tmp_path / "other.safetensors", metadata={"format": "nope"})
    with pytest.raises(TrainInputError, match="is not a packed table"):
        PackedTableDataset(tmp_path / "other.safetensors", preprocess, CaptionPacker(tok, 32, 96))
    (tmp_path / "torn.safetensors").write_bytes(table.read_bytes()[:100])
    with pytest.raises(TrainInputError, match="cannot read packed table"):
        PackedTableDataset(tmp_path / "torn.safetensors", preprocess, CaptionPacker(tok, 32, 96))
    with pytest.raises(ValueError, match="uint8"):
        write_packed_table(tmp_path / "f.safetensors", images.float(), shorts, longs, CaptionPacker(tok, 32, 96))


def test_text_pairs_pack_both_texts_for_the_text_tower(model_parts):
    _, _, tok = model_parts
    row = CaptionPacker(tok, 32, 96, pair_text=True)("a red circle", "there is a red circle")
    assert torch.equal(row[1, :32], tok(["there is a red circle"], context_length=32)[0])
    assert (row[1, 32:] == tok.pad_token_id).all()


def test_e5v_style_training_reads_text_pairs_and_its_loss_falls(world, model_parts, tmp_path):
    """The E5-V-style variant through vladva-train on a packed caption/paraphrase table: the text-pair contrastive
    loss on the training pairs falls, only LoRA trained, and the images played no part in it."""
    from vladva_openclip.demo.pipeline import DemoConfig, load_variant, train_variant
    from vladva_openclip.demo.variants import get_variant
    from vladva_openclip.loss import VladVALoss
    from vladva_openclip.synth import World, WorldConfig

    _, preprocess, tok = model_parts
    _, images, _, _, _ = world
    pairs = [World(WorldConfig(seed=4)).text_pair("train", i) for i in range(12)]
    packer = CaptionPacker(tok, 32, 96, pair_text=True)
    table = write_packed_table(tmp_path / "pairs.safetensors", images, *zip(*pairs), packer, preprocess=preprocess)
    data = PackedTableDataset(table, preprocess, packer)
    cfg = DemoConfig(out=tmp_path, n_train=12, batch_size=12, epochs=12, warmup=1, lr=5e-3, progress=False)
    variant = get_variant("e5v")
    ckpt = train_variant(variant, table, cfg, tmp_path / "runs", "e5v")

    def pair_loss(checkpoint):
        model, _, _ = load_variant(variant, cfg, checkpoint)
        model.text_pairs = True
        with torch.no_grad():
            out = model(image=torch.full_like(data.pixels, float("nan")), text=data.texts)  # images unused
            assert torch.allclose(out["image_features"], model.encode_text(data.texts[:, 1], normalize=True))
            return float(VladVALoss(ar_weight=0.0)(**out)), model

    before, _ = pair_loss(None)
    after, _trained = pair_loss(ckpt)
    assert after < before - 0.3, (before, after)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert saved and all("lora_" in k or k.endswith("logit_scale") for k in saved)
