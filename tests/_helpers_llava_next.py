"""A small llava-hf/llama3-llava-next-8b-hf checkpoint written the way the hub publishes it.

- transformers-4 (legacy) key names (``language_model.model.*``, ``language_model.lm_head``,
  ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``image_newline``), float16 shards plus index, the
  checkpoint's config.json layout;
- the real geometry: CLIP tiles of 336 px, patch 14, the five pinpoints of llama3-llava-next-8b
  (336x672, 672x336, 672x672, 1008x336, 336x1008), ``vision_feature_layer=-2``, ``"default"`` strategy, vocabulary
  128320 with ``<image>`` = 128256;
- the real LLaMA-3 tokenizer (../shared/data/tokenizers/llama-3) with ``<image>`` (128256) and ``<pad>`` (128257)
  added as the checkpoint adds them, and the checkpoint's LlavaNextImageProcessor / LlavaNextProcessor configs.

Widths and depths are tiny.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _helpers_layouts import CLIP_MEAN, CLIP_STD, LEGACY_KEYS, SHARED_TOKENIZERS, unpack_tokenizer, write_hub_checkpoint

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
needs_llama3 = pytest.mark.skipif(not (SHARED_TOKENIZERS / "llama-3").is_dir(),
                                  reason=f"the real LLaMA-3 tokenizer is absent ({SHARED_TOKENIZERS / 'llama-3'})")

LEGACY_KEYS.setdefault("llava_next", [*LEGACY_KEYS["llava"], (r"^model\.image_newline$", "image_newline")])

PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_pad": True, "do_rescale": True, "do_resize": True, "image_grid_pinpoints": PINPOINTS,
    "image_mean": CLIP_MEAN, "image_processor_type": "LlavaNextImageProcessor", "image_std": CLIP_STD,
    "processor_class": "LlavaNextProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
PROCESSOR = {"image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14,
             "processor_class": "LlavaNextProcessor", "vision_feature_select_strategy": "default"}


def llava_next_config_json(hidden: int = 64, layers: int = 2, vision_hidden: int = 32, vision_layers: int = 3) -> dict:
    """llava-hf/llama3-llava-next-8b-hf's config.json layout, small widths and depths."""
    return {
        "architectures": ["LlavaNextForConditionalGeneration"], "ignore_index": -100,
        "image_grid_pinpoints": PINPOINTS, "image_seq_length": 576, "image_token_index": 128256,
        "model_type": "llava_next", "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 128000, "eos_token_id": 128009, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "max_position_embeddings": 8192, "model_type": "llama", "num_attention_heads": 4,
            "num_hidden_layers": layers, "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
            "torch_dtype": "bfloat16", "vocab_size": 128320,
        },
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.45.2",
        "use_image_newline_parameter": True,
        "vision_config": {
            "hidden_size": vision_hidden, "image_size": 336, "intermediate_size": 2 * vision_hidden,
            "model_type": "clip_vision_model", "num_attention_heads": 2, "num_hidden_layers": vision_layers,
            "patch_size": 14, "projection_dim": 16, "vocab_size": 32000,
        },
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 128320,
    }


def llama3_llava_tokenizer(dest: Path):
    """The real LLaMA-3 tokenizer plus ``<image>`` = 128256 and ``<pad>`` = 128257 (special), saved in ``dest``."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    unpack_tokenizer("llama-3", dest)
    tok = AutoTokenizer.from_pretrained(str(dest))
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tok.add_special_tokens({"pad_token": AddedToken("<pad>", special=True, normalized=False)})
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [128256, 128257]
    tok.save_pretrained(str(dest))
    return tok


def write_llava_next_dir(dest: Path, **sizes) -> Path:
    """A complete llava-hf style LLaVA-NeXT directory: weights, config, real tokenizer, processor configs."""
    write_hub_checkpoint(llava_next_config_json(**sizes), dest, torch.float16)
    llama3_llava_tokenizer(dest)
    (dest / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (dest / "processor_config.json").write_text(json.dumps(PROCESSOR, indent=2))
    return dest
