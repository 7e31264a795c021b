"""Fixtures for the analysis tests: a tiny synthetic world on disk, tiny models, and real-architecture stand-ins
(the registered 7B/2B configs on a toy-sized base saved to a folder with the real tokenizer)."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest
import torch
from _helpers_layouts import SHARED_TOKENIZERS

TINY = ("vladva-tiny-llava", "vladva-tiny-qwen2vl", "vladva-tiny-qwen25vl", "vladva-tiny-qwen3vl")


@pytest.fixture(scope="session", name="analysis_world")
def fixture_analysis_world(tmp_path_factory):
    """A world with 12 test scenes (retrieval JSON with 2 captions per image, 64 px PNGs)."""
    from vladva_openclip.synth import build_world

    return build_world(tmp_path_factory.mktemp("analysis_world"), n_train=0, n_test=12, seed=0, write_wds=False,
                       n_winoground=0, progress=False)


@pytest.fixture(scope="session", name="analysis_data")
def fixture_analysis_data(analysis_world):
    from vladva_openclip.analysis import load_analysis_data

    return load_analysis_data(analysis_world.retrieval_json)


def build_tiny(name: str, **kwargs):
    """(model in eval mode, preprocess) of a tiny model through open_clip's own API."""
    import open_clip

    import vladva_openclip  # noqa: F401  (registers the VladVA models)

    model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
    return model.eval(), preprocess


def perturb_lora(model, seed: int = 0, scale: float = 0.05) -> None:
    """LoRA B starts at zero: give every trainable a value so that LoRA changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_state_dict().values():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


# ---- real architectures on toy-sized bases ---------------------------------------------------------------------
def _real_tokenizer(folder: str, dest: Path) -> None:
    src = SHARED_TOKENIZERS / folder
    if not (src / "tokenizer.json.gz").is_file():
        pytest.skip(f"real tokenizer files not found in {src} (../shared/data is not part of this checkout)")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer_config.json", dest / "tokenizer_config.json")
    with gzip.open(src / "tokenizer.json.gz", "rb") as f:
        (dest / "tokenizer.json").write_bytes(f.read())


def _shrunk_hf_config(name: str) -> dict:
    """The registered real model's transformers config at toy size (same family, vocabulary, special ids and
    image geometry)."""
    from vladva_openclip.registry import get_vladva_config

    hf = json.loads(json.dumps(get_vladva_config(name)["vladva_cfg"]["hf_config"]))
    text = hf["text_config"]
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
    if "rope_parameters" in text and "mrope_section" in text["rope_parameters"]:
        text["rope_parameters"]["mrope_section"] = [2, 3, 3]  # sums to head_dim / 2 = 8
    vision = hf["vision_config"]
    if hf["model_type"] == "llava":
        vision.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      projection_dim=32)
    else:
        vision.update(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    return hf


@pytest.fixture(scope="session", name="real_standin")
def fixture_real_standin(tmp_path_factory):
    """``build(name) -> (model, preprocess)``: a registered real model built on a toy base folder (random
    weights, real tokenizer) through ``create_model(name, base_model=folder)``."""
    import open_clip

    import vladva_openclip  # noqa: F401
    from vladva_openclip.backbones import get_backbone
    from vladva_openclip.registry import get_vladva_config

    tokenizer_folder = {"vladva-llava7b": "llava-1.5", "vladva-qwen2vl2b": "qwen2-vl"}
    built = {}

    def build(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(name)
            _real_tokenizer(tokenizer_folder[name], folder)
            backbone = get_backbone(get_vladva_config(name)["vladva_cfg"]["backbone"])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                base = backbone.build_random(_shrunk_hf_config(name), torch.float32)
            base.save_pretrained(folder)
            model, _, preprocess = open_clip.create_model_and_transforms(name, base_model=str(folder))
            built[name] = (model.eval(), preprocess)
        return built[name]

    return build
