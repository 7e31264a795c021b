"""Registration round trip through every open_clip entry point, and exact uninstall."""

import pytest
import torch


def test_every_open_clip_entry_point_handles_vladva_names(tmp_path):
    import open_clip
    import open_clip_train.main as oc_main
    import open_clip_train.zero_shot as oc_zero_shot

    import vladva_openclip
    from vladva_openclip import VladVA, VladVATokenizer

    vladva_openclip.install()  # covers modules imported after the package (no-op when already current)
    names = vladva_openclip.list_vladva_models()
    assert set(names) == {"vladva-llava7b", "vladva-llava13b", "vladva-qwen2vl2b", "vladva-tiny-llava",
                          "vladva-tiny-qwen2vl", "vladva-llavanext8b", "vladva-e5v", "vladva-tiny-llavanext",
                          "vladva-qwen25vl3b", "vladva-qwen25vl7b", "vladva-qwen25vl32b", "vladva-qwen25vl72b",
                          "vladva-qwen3vl2b", "vladva-qwen3vl4b", "vladva-qwen3vl8b", "vladva-tiny-qwen25vl",
                          "vladva-tiny-qwen3vl"}
    assert set(names) <= set(open_clip.list_models())
    for create in (open_clip.create_model, open_clip.factory.create_model, oc_main.create_model_and_transforms):
        out = create("vladva-tiny-llava")
        model = out[0] if isinstance(out, tuple) else out
        assert isinstance(model, VladVA)
    model, pre_train, pre_val = open_clip.create_model_and_transforms("vladva-tiny-qwen2vl")
    assert isinstance(model, VladVA) and model.visual.image_size == (56, 56)
    from PIL import Image
    assert pre_val(Image.new("RGB", (90, 70))).shape == (3, 56, 56)
    for get in (open_clip.get_tokenizer, oc_main.get_tokenizer, oc_zero_shot.get_tokenizer):
        tok = get("vladva-tiny-llava")
        assert isinstance(tok, VladVATokenizer)
    assert open_clip.get_tokenizer("vladva-tiny-llava", context_length=9)(["a"]).shape == (1, 9)
    # create_model_from_pretrained needs pretrained: an adapter path works like a tag.
    path = vladva_openclip.save_adapter(model, tmp_path / "adapter")
    m2, pre = open_clip.create_model_from_pretrained("vladva-tiny-qwen2vl", pretrained=str(path))
    assert isinstance(m2, VladVA)
    # Positional arguments bind like open_clip's signature (model_name, pretrained, load_weights, precision).
    assert isinstance(open_clip.create_model("vladva-tiny-llava", None, True, "fp32"), VladVA)


def test_registered_tags_show_in_list_pretrained(tmp_path):
    import open_clip
    import open_clip.pretrained as oc_pretrained

    import vladva_openclip
    from vladva_openclip import registry

    model = open_clip.create_model("vladva-tiny-llava")
    path = vladva_openclip.save_adapter(model, tmp_path / "tagged")
    vladva_openclip.uninstall()
    try:
        registry.register_pretrained("vladva-tiny-llava", "test-tag", {"file": str(path)})
        vladva_openclip.install()
        assert ("vladva-tiny-llava", "test_tag") in open_clip.list_pretrained()
        assert "test_tag" in open_clip.list_pretrained_tags_by_model("vladva-tiny-llava")
        m = open_clip.create_model("vladva-tiny-llava", pretrained="test-tag")
        torch.testing.assert_close(m.logit_scale, model.logit_scale)
    finally:
        vladva_openclip.uninstall()
        registry._PRETRAINED["vladva-tiny-llava"].pop("test_tag", None)
        if not registry._PRETRAINED["vladva-tiny-llava"]:
            registry._PRETRAINED.pop("vladva-tiny-llava")
        vladva_openclip.install()
    assert ("vladva-tiny-llava", "test_tag") not in oc_pretrained.list_pretrained()


def test_other_names_untouched_and_uninstall_restores_exactly():
    import open_clip
    import open_clip.factory as factory
    import open_clip_train.main as oc_main

    import vladva_openclip

    vladva_openclip.uninstall()
    before = {
        "models": list(open_clip.list_models()),
        "pretrained": list(open_clip.list_pretrained()),
        "funcs": (open_clip.create_model, factory.create_model, open_clip.get_tokenizer, factory.get_tokenizer,
                  oc_main.get_tokenizer, oc_main.create_model_and_transforms),
    }
    vladva_openclip.install()
    vladva_openclip.install()  # idempotent
    assert open_clip.create_model.__wrapped__ is before["funcs"][0]
    assert open_clip.create_model.__name__ == "create_model"
    assert not hasattr(open_clip.create_model.__wrapped__, "__wrapped__")
    tok = open_clip.get_tokenizer("ViT-B-32")
    assert type(tok).__name__ == "SimpleTokenizer"
    clip = open_clip.create_model("ViT-B-32")
    assert type(clip).__name__ == "CLIP"
    vladva_openclip.uninstall()
    after_funcs = (open_clip.create_model, factory.create_model, open_clip.get_tokenizer, factory.get_tokenizer,
                   oc_main.get_tokenizer, oc_main.create_model_and_transforms)
    assert all(a is b for a, b in zip(after_funcs, before["funcs"]))
    assert open_clip.list_models() == before["models"]
    assert open_clip.list_pretrained() == before["pretrained"]
    assert "vladva-tiny-llava" not in open_clip.list_models()
    vladva_openclip.install()
    assert "vladva-tiny-llava" in open_clip.list_models()


def test_unknown_vladva_name_lists_the_registered_ones():
    import open_clip

    import vladva_openclip  # noqa: F401

    with pytest.raises(ValueError, match="vladva-tiny-llava"):
        open_clip.create_model("vladva-tiny-lava")
    with pytest.raises(ValueError, match="registered VladVA models"):
        open_clip.get_tokenizer("vladva-nope")
    with pytest.raises(TypeError, match="lora_r"):
        open_clip.create_model("vladva-tiny-llava", lora_rank=4)


def test_open_clip_zero_shot_classifier_on_vladva():
    import open_clip
    from open_clip import build_zero_shot_classifier

    model = open_clip.create_model("vladva-tiny-llava").eval()
    tok = open_clip.get_tokenizer("vladva-tiny-llava")
    classes = ["circle", "square", "triangle"]
    templates = [lambda c: f"a photo of a {c}.", lambda c: f"a drawing of a {c}."]
    clf = build_zero_shot_classifier(model, tok, classes, templates, num_classes_per_batch=2, device="cpu")
    assert clf.shape == (model.embed_dim, 3)
    expected = torch.stack([torch.nn.functional.normalize(
        model.encode_text(tok([t(c) for t in templates]), normalize=True).mean(0), dim=-1) for c in classes], 1)
    torch.testing.assert_close(clf, expected, atol=1e-5, rtol=1e-5)
    s = model.cfg.image_size
    logits = model.encode_image(torch.randn(4, 3, s, s), normalize=True) @ clf
    assert logits.shape == (4, 3)


def test_overrides_change_structure():
    import open_clip

    m = open_clip.create_model("vladva-tiny-llava", lora_r=4, image_prompt_mode="both", text_prompt_mode="handcrafted")
    assert m.cfg.lora.r == 4 and m.text_prompt.soft is None
    assert m.image_prompt.suffix_len > open_clip.create_model("vladva-tiny-llava").image_prompt.suffix_len
    no_lora = open_clip.create_model("vladva-tiny-llava", use_lora=False)
    assert not no_lora.trainable_groups()["lora"]


def test_aliases_bound_before_the_plugin_import_are_rebound():
    """open_clip_train imported first (it binds get_tokenizer etc. by name), the plugin second."""
    import subprocess
    import sys

    code = (
        "import open_clip_train.main as m, open_clip_train.zero_shot as z, open_clip\n"
        "held = [m.get_tokenizer]  # in a list: a module-level name would be rebound too, by design\n"
        "import vladva_openclip\n"
        "assert m.get_tokenizer is open_clip.get_tokenizer is z.get_tokenizer is not held[0]\n"
        "assert type(m.get_tokenizer('vladva-tiny-llava')).__name__ == 'VladVATokenizer'\n"
        "vladva_openclip.uninstall()\n"
        "assert m.get_tokenizer is held[0]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
