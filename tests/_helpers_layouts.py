"""Small base checkpoints written the way the real ones are published on the Hugging Face hub.

- llava-hf/llava-1.5-7b-hf: transformers-4 (legacy) key names (``language_model.model.*``,
  ``language_model.lm_head``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``), a legacy-style
  config.json, float16 shards plus ``model.safetensors.index.json``, the CLIPImageProcessor
  ``preprocessor_config.json`` and LlavaProcessor ``processor_config.json``; real geometry: 336 px, patch 14,
  576 image tokens, ``vision_feature_layer=-2``, vocabulary 32064 with ``<image>`` 32000 and ``<pad>`` 32001.
- Qwen/Qwen2-VL-2B-Instruct: ``model.*`` / ``visual.*`` keys, tied embeddings (no ``lm_head`` in the files), a
  flat legacy config.json, bfloat16 shards plus index, the Qwen2VLImageProcessor ``preprocessor_config.json``;
  real geometry: patch 14, merge 2, temporal patch 2, the real special-token ids and vocabulary size.

Widths and depths are tiny; the tokenizers are the real ones from ``../shared/data/tokenizers``.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch


def _shared_tokenizers() -> Path:
    """../shared/data/tokenizers of the checkout: VLADVA_SHARED_TOKENIZERS when set, else the nearest ancestor
    that has one (a git worktree sits deeper than the main checkout), else the main checkout's place."""
    if os.environ.get("VLADVA_SHARED_TOKENIZERS"):
        return Path(os.environ["VLADVA_SHARED_TOKENIZERS"])
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "shared" / "data" / "tokenizers").is_dir():
            return parent / "shared" / "data" / "tokenizers"
    return here.parents[2] / "shared" / "data" / "tokenizers"


SHARED_TOKENIZERS = _shared_tokenizers()
needs_real_tokenizers = pytest.mark.skipif(
    not (SHARED_TOKENIZERS / "llava-1.5").is_dir() or not (SHARED_TOKENIZERS / "qwen2-vl").is_dir(),
    reason=f"the real LLaVA-1.5 / Qwen2-VL tokenizers are absent ({SHARED_TOKENIZERS})")

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

LLAVA_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
    "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "processor_class": "LlavaProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}
LLAVA_PROCESSOR = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
                   "processor_class": "LlavaProcessor", "vision_feature_select_strategy": "default"}
QWEN_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def llava_config_json(hidden: int = 64, layers: int = 2, vision_hidden: int = 32, vision_layers: int = 3) -> dict:
    """llava-hf's config.json layout (transformers 4.36 era), with small widths and depths."""
    return {
        "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
        "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu", "image_seq_length": 576,
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-05, "torch_dtype": "float16", "vocab_size": 32064, "pad_token_id": 32001,
        },
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": vision_hidden, "image_size": 336, "intermediate_size": 2 * vision_hidden,
            "model_type": "clip_vision_model", "num_attention_heads": 2, "num_hidden_layers": vision_layers,
            "patch_size": 14, "projection_dim": 16, "vocab_size": 32000,
        },
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
    }


def qwen2vl_config_json(hidden: int = 64, layers: int = 2) -> dict:
    """Qwen2-VL-2B-Instruct's config.json layout (flat text fields, rope_scaling mrope), small."""
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
        "hidden_size": hidden, "initializer_range": 0.02, "intermediate_size": 2 * hidden,
        "max_position_embeddings": 32768, "max_window_layers": layers, "model_type": "qwen2_vl",
        "num_attention_heads": 4, "num_hidden_layers": layers, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": 2, "embed_dim": 32, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
                          "hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2,
                          "spatial_patch_size": 14, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "vocab_size": 151936,
    }


# transformers-5 key -> the key the published checkpoint uses.
LEGACY_KEYS = {
    "llava": [(r"^lm_head\.", "language_model.lm_head."), (r"^model\.language_model\.", "language_model.model."),
              (r"^model\.vision_tower\.", "vision_tower.vision_model."),
              (r"^model\.multi_modal_projector\.", "multi_modal_projector.")],
    "qwen2_vl": [(r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")],
    "qwen2_5_vl": [(r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")],
    "qwen3_vl": [],  # published with transformers 4.57: the current key names
}


def legacy_key(key: str, model_type: str) -> str:
    for pattern, repl in LEGACY_KEYS[model_type]:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return key


def unpack_tokenizer(family: str, dest: Path) -> Path:
    """Copy a real tokenizer (``llava-1.5`` or ``qwen2-vl``) from ../shared into ``dest`` (gunzipped)."""
    src = SHARED_TOKENIZERS / family
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "tokenizer_config.json", dest / "tokenizer_config.json")
    with gzip.open(src / "tokenizer.json.gz", "rb") as f:
        (dest / "tokenizer.json").write_bytes(f.read())
    return dest


def write_hub_checkpoint(config: dict, dest: Path, dtype: torch.dtype, seed: int = 0, shards: int = 2) -> Path:
    """A random model of ``config`` saved as the hub publishes it: legacy key names, ``shards`` safetensors files
    plus ``model.safetensors.index.json``, the config.json as given (not re-serialised by transformers)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    model_type = config["model_type"]
    cfg = dict(config)
    hf_config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(hf_config)
    state = {k: v for k, v in model.state_dict().items()}
    if getattr(hf_config, "tie_word_embeddings", False) or hf_config.get_text_config().tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: the published files hold only the input embeddings
    tensors = {legacy_key(k, model_type): v.to(dtype).contiguous() for k, v in state.items()}
    keys = sorted(tensors)
    dest.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    per = -(-len(keys) // shards)
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i * per:(i + 1) * per]}
        save_file(part, str(dest / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def write_model_dir(dest: Path, config: dict, dtype: torch.dtype, vocabulary: str, preprocessor: dict,
                    processor: dict | None = None) -> Path:
    """A complete hub-layout directory: sharded weights and config, a real tokenizer from ../shared (the folder
    name under tokenizers/), ``preprocessor_config.json`` and, where the family has one, ``processor_config.json``."""
    write_hub_checkpoint(config, dest, dtype)
    unpack_tokenizer(vocabulary, dest)
    (dest / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    if processor is not None:
        (dest / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return dest


def write_llava_dir(dest: Path, **sizes) -> Path:
    """A complete llava-hf style directory: weights, config, real tokenizer, processor configs."""
    return write_model_dir(dest, llava_config_json(**sizes), torch.float16, "llava-1.5", LLAVA_PREPROCESSOR,
                           LLAVA_PROCESSOR)


def write_qwen2vl_dir(dest: Path, **sizes) -> Path:
    """A complete Qwen2-VL-Instruct style directory: weights, config, real tokenizer, preprocessor config."""
    return write_model_dir(dest, qwen2vl_config_json(**sizes), torch.bfloat16, "qwen2-vl", QWEN_PREPROCESSOR)


def build_side_by_side(dirs: dict[str, Path], names: dict[str, str]) -> dict[str, tuple]:
    """family -> (VladVA model, preprocess_val, transformers reference model, AutoProcessor of the directory), each
    built from the family's directory in ``dirs`` under the registered name in ``names``; both models in eval mode."""
    import open_clip
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = {}
    for family, path in dirs.items():
        model, _, preprocess = open_clip.create_model_and_transforms(names[family], base_model=str(path))
        hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
        out[family] = (model.eval(), preprocess, hf, AutoProcessor.from_pretrained(path))
    return out


def photo_like(width: int, height: int, seed: int = 0):
    """A deterministic RGB PIL image with structure at every scale (gradients, blocks, fine noise), so resampling
    and cropping differences show up."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 100 * np.sin(x / (width / 6.0) + seed)
    g = 127 + 100 * np.cos(y / (height / 5.0) - seed)
    b = 255 * ((x // max(width // 8, 1) + y // max(height // 8, 1)) % 2)
    img = np.stack([r, g, b], axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def sample_photos() -> list:
    """Real photographs in four aspect ratios (3:2, 2:3, 2:1, 0.59:1): scikit-learn's two sample images (640x427),
    rotated and cropped."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for array in load_sample_images().images:
        photo = Image.fromarray(array)
        out += [photo, photo.transpose(Image.Transpose.ROTATE_90), photo.crop((0, 53, 640, 373)),
                photo.crop((150, 0, 400, 427))]
    return out


def resize_mode_agreement(model, hf, processor, images, modes=("shortest", "longest", "squash")) -> dict:
    """How close each open_clip resize mode brings ``encode_image`` to transformers' model on the processor's own
    output (Qwen2-VL: the whole image at its aspect ratio, smart_resize): mode -> per-image cosine similarity of
    the final-layer last-token states, plus ``"other_image"``: the mean cosine between the processor's embeddings
    of different images (the scale of a real change of content)."""
    import torch.nn.functional as F
    from open_clip import image_transform

    body = "<|vision_start|><|image_pad|><|vision_end|>"
    full = model.cfg.template.image.replace("{body}", body).replace("{prompt}", model.cfg.image_prompt.text)
    refs = []
    for image in images:
        inputs = processor(images=image, text=full, return_tensors="pt")
        with torch.no_grad():
            refs.append(hf.model(**inputs).last_hidden_state[0, -1].float())
    refs = torch.stack(refs)
    out = {}
    for mode in modes:
        transform = image_transform(model.cfg.image_size, is_train=False, mean=model.cfg.image_mean,
                                    std=model.cfg.image_std, interpolation="bicubic", resize_mode=mode)
        with torch.no_grad():
            ours = model.encode_image(torch.stack([transform(im) for im in images]))
        out[mode] = F.cosine_similarity(ours, refs, dim=-1).tolist()
    pairs = F.cosine_similarity(refs[:, None], refs[None], dim=-1)
    n = len(images)
    out["other_image"] = float((pairs.sum() - pairs.diagonal().sum()) / (n * (n - 1)))
    return out
