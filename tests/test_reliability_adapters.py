"""Adapters and hub configs (issue 22): vladva_adapter.json and open_clip_config.json are checked against a schema,
tensors for dtype, shape and finiteness (AdapterError naming the key), and the CLI turns each bad adapter into one
stderr line naming the file (exit 2, no traceback). Model: vladva-tiny-llava (random, seeded)."""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from _helpers_retrieval import image_folder
from conftest import perturb_trainables
from safetensors.torch import load_file, save_file

import vladva_openclip
from vladva_openclip.adapters import AdapterError
from vladva_openclip.cli import main as vladva_main

TINY = "vladva-tiny-llava"
LORA_KEY = "model.language_model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A full adapter of the tiny LLaVA (with its hub files) and a folder of images to embed with it."""
    root = tmp_path_factory.mktemp("adapters")
    model = open_clip.create_model(TINY)
    perturb_trainables(model, seed=7)
    vladva_openclip.save_adapter(model, root / "adapter", model_card=True)
    image_folder(root / "imgs", 2)
    return root


def _copy(saved: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(saved / "adapter", dst)
    return dst


def _edit_meta(path: Path, edit) -> Path:
    meta_file = path / "vladva_adapter.json"
    meta = edit(json.loads(meta_file.read_text()))
    meta_file.write_text(json.dumps(meta))
    return meta_file


def _embed_fails(saved: Path, tmp_path: Path, capsys, pretrained: str | None, *needles, model: str = TINY) -> str:
    argv = ["embed", str(saved / "imgs"), "-o", str(tmp_path / "emb"), "--model", model, "--workers", "0",
            "--no-progress"] + (["--pretrained", pretrained] if pretrained else [])
    assert vladva_main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("vladva embed: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


# ---- vladva_adapter.json against its schema (through the CLI: one line, exit 2) -----------------------------
def test_adapter_json_missing_a_field(saved, tmp_path, capsys):
    path = _copy(saved, tmp_path / "ad")
    meta_file = _edit_meta(path, lambda m: {k: v for k, v in m.items() if k != "model_name"})
    _embed_fails(saved, tmp_path, capsys, str(path), meta_file, "missing field 'model_name'")


def test_adapter_json_field_of_the_wrong_type(saved, tmp_path, capsys):
    path = _copy(saved, tmp_path / "ad")
    meta_file = _edit_meta(path, lambda m: {**m, "lora": {**m["lora"], "r": "8"}})
    _embed_fails(saved, tmp_path, capsys, str(path), meta_file, "field 'lora.r' must be an integer, got a string")


def test_adapter_json_with_a_list_at_the_top(saved, tmp_path, capsys):
    path = _copy(saved, tmp_path / "ad")
    meta_file = _edit_meta(path, lambda m: [m])
    _embed_fails(saved, tmp_path, capsys, str(path), meta_file, "must be a JSON object, got a list")


def test_adapter_json_with_a_string_where_an_object_belongs(saved, tmp_path):
    path = _copy(saved, tmp_path / "ad")
    _edit_meta(path, lambda m: {**m, "fingerprint": "llava"})
    with pytest.raises(AdapterError, match="fingerprint must be a JSON object, got a string"):
        open_clip.create_model(TINY, pretrained=str(path))


# ---- tensors: shape, dtype, finiteness -----------------------------------------------------------------------
def test_logit_scale_of_the_wrong_shape(saved, tmp_path, capsys):
    path = _copy(saved, tmp_path / "ad")
    extras = load_file(str(path / "vladva_extras.safetensors"))
    extras["logit_scale"] = torch.ones(3)
    save_file(extras, str(path / "vladva_extras.safetensors"))
    _embed_fails(saved, tmp_path, capsys, str(path), path / "vladva_extras.safetensors", "logit_scale has shape (3,)")


def test_lora_tensor_of_another_shape(saved, tmp_path, capsys):
    path = _copy(saved, tmp_path / "ad")
    lora = load_file(str(path / "adapter_model.safetensors"))
    lora[LORA_KEY] = torch.zeros(lora[LORA_KEY].shape[0] + 2, lora[LORA_KEY].shape[1])
    save_file(lora, str(path / "adapter_model.safetensors"))
    _embed_fails(saved, tmp_path, capsys, str(path), path / "adapter_model.safetensors", LORA_KEY, "has shape (10, ")


def test_lora_r_that_does_not_match_the_tensors(saved, tmp_path, capsys):
    path = _copy(saved, tmp_path / "ad")
    _edit_meta(path, lambda m: {**m, "lora": {**m["lora"], "r": 16}})
    _embed_fails(saved, tmp_path, capsys, str(path), path / "adapter_model.safetensors", "lora.r=16",
                 "the model expects (16, ")


@pytest.mark.parametrize("how, message", [
    ("int", "is torch.int32; weights must be floating point"),
    ("complex", "is torch.complex64; weights must be floating point"),
    ("nan", "holds NaN or inf values"),
])
def test_trainable_tensors_of_a_bad_dtype_or_not_finite(tmp_path, how, message):
    model = open_clip.create_model(TINY)
    state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    key = "text_prompt.soft"
    if how == "int":
        state[key] = state[key].to(torch.int32)
    elif how == "complex":
        state[key] = state[key].to(torch.complex64)
    else:
        state[key][0, 3] = float("nan")
    torch.save({"state_dict": state}, tmp_path / "ckpt.pt")  # weights_only=True reads all three
    with pytest.raises(AdapterError, match=rf"ckpt\.pt: {key} {message}"):
        open_clip.create_model(TINY, pretrained=str(tmp_path / "ckpt.pt"))


def test_soft_prompt_of_an_adapter_holding_inf(saved, tmp_path):
    path = _copy(saved, tmp_path / "ad")
    extras = load_file(str(path / "vladva_extras.safetensors"))
    extras["image_prompt.soft"][1, 1] = float("inf")
    save_file(extras, str(path / "vladva_extras.safetensors"))
    with pytest.raises(AdapterError, match=r"vladva_extras\.safetensors: image_prompt\.soft holds NaN or inf"):
        open_clip.create_model(TINY, pretrained=str(path))


def test_int8_base_weights(tmp_path):
    model = open_clip.create_model(TINY)
    path = vladva_openclip.save_base(model, tmp_path / "base")
    base = load_file(str(path / "base_model.safetensors"))
    key = next(k for k, v in base.items() if v.ndim == 2)
    base[key] = base[key].clamp(-1, 1).mul(127).to(torch.int8)
    save_file(base, str(path / "base_model.safetensors"))
    with pytest.raises(AdapterError, match=rf"base_model\.safetensors: {key} is torch\.int8"):
        open_clip.create_model(TINY, pretrained=str(path))


def test_base_only_claimed_by_a_full_adapter(saved, tmp_path):
    path = _copy(saved, tmp_path / "ad")
    _edit_meta(path, lambda m: {**m, "base_only": True})
    with pytest.raises(AdapterError, match=r"says base_only .* holds adapter weights \(adapter_model\.safetensors"):
        open_clip.create_model(TINY, pretrained=str(path))


# ---- hub configs ---------------------------------------------------------------------------------------------
def test_hub_config_whose_vladva_entry_is_not_an_object(saved, tmp_path, capsys):
    path = _copy(saved, tmp_path / "ad")
    config = json.loads((path / "open_clip_config.json").read_text())
    config["vladva"] = TINY
    (path / "open_clip_config.json").write_text(json.dumps(config))
    _embed_fails(saved, tmp_path, capsys, None, "open_clip_config.json", "vladva must be a JSON object",
                 model=f"local-dir:{path}")


def test_hub_config_naming_a_7b_model_on_a_tiny_adapter_fails_before_any_base_weights(saved, tmp_path,
                                                                                      monkeypatch):
    from vladva_openclip import factory
    from vladva_openclip.backbones.base import Backbone

    path = _copy(saved, tmp_path / "ad")
    config = json.loads((path / "open_clip_config.json").read_text())
    config["vladva"]["model_name"] = "vladva-llava7b"
    (path / "open_clip_config.json").write_text(json.dumps(config))

    def never(*args, **kwargs):
        raise AssertionError("the 7B base (or its tokenizer) was asked for before the adapter was checked")

    monkeypatch.setattr(Backbone, "load_pretrained", never)
    monkeypatch.setattr(factory, "build_tokenizer", never)
    with pytest.raises(AdapterError, match=r"made for another base model .* hidden_size: adapter 64 vs model 4096"):
        open_clip.create_model(f"local-dir:{path}")
