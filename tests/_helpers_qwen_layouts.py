"""Small Qwen2.5-VL and Qwen3-VL checkpoints written the way the real ones are published on the Hugging Face hub.

- Qwen/Qwen2.5-VL-3B-Instruct: a flat legacy config.json (text fields at the top, ``rope_scaling`` mrope, vision
  ``out_hidden_size``, ``window_size`` 112, ``fullatt_block_indexes``), ``model.*`` / ``visual.*`` keys, tied
  embeddings (no ``lm_head`` in the files), bfloat16 shards plus index, Qwen2VLImageProcessor's
  ``preprocessor_config.json`` (patch 14, merge 2, CLIP mean/std) and the ``qwen2-vl`` vocabulary.
- Qwen/Qwen3-VL-2B-Instruct: a nested config.json (``text_config`` with ``head_dim``, ``rope_scaling`` interleaved
  mrope, ``vision_config`` with ``deepstack_visual_indexes`` and ``num_position_embeddings``), transformers-4.57 key
  names (``model.language_model.*``, ``model.visual.*``), tied embeddings, the fast image processor's
  ``preprocessor_config.json`` (patch 16, merge 2, mean/std 0.5, ``size`` as a pixel-count band) and the ``qwen3``
  vocabulary.

Widths and depths are tiny; the geometry (patch, merge, temporal patch, window, token ids, vocabulary size) and the
file layout are the real ones.
"""
from __future__ import annotations

from pathlib import Path

import torch
from _helpers_layouts import CLIP_MEAN, CLIP_STD, write_model_dir

QWEN25_PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
QWEN3_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast",
}
_IDS = {"bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "image_token_id": 151655, "video_token_id": 151656}


def qwen25vl_config_json(hidden: int = 64, layers: int = 2, depth: int = 4) -> dict:
    """Qwen2.5-VL-3B-Instruct's config.json layout, small: windowed vision blocks except the last."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, **_IDS,
        "vision_token_id": 151654, "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
        "intermediate_size": 2 * hidden, "max_position_embeddings": 128000, "max_window_layers": 70,
        "model_type": "qwen2_5_vl", "num_attention_heads": 4, "num_hidden_layers": layers, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        "vision_config": {"depth": depth, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 48,
                          "num_heads": 2, "in_chans": 3, "out_hidden_size": hidden, "patch_size": 14,
                          "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                          "fullatt_block_indexes": [depth - 1], "tokens_per_second": 2, "temporal_patch_size": 2},
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}, "vocab_size": 151936,
    }


def qwen3vl_config_json(hidden: int = 64, layers: int = 3, depth: int = 3) -> dict:
    """Qwen3-VL-2B-Instruct's config.json layout, small: DeepStack from every vision block into the first
    ``depth`` LLM layers."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
            "eos_token_id": 151645, "head_dim": 16, "hidden_act": "silu", "hidden_size": hidden,
            "initializer_range": 0.02, "intermediate_size": 2 * hidden, "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text", "num_attention_heads": 4, "num_hidden_layers": layers,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [2, 3, 3], "rope_type": "default"},
            "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936,
        },
        "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
        "vision_config": {
            "deepstack_visual_indexes": list(range(depth)), "depth": depth, "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": 32, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 64,
            "model_type": "qwen3_vl", "num_heads": 2, "num_position_embeddings": 64, "out_hidden_size": hidden,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        "vision_end_token_id": 151653, "vision_start_token_id": 151652,
    }


def write_qwen25vl_dir(dest: Path, **sizes) -> Path:
    """A complete Qwen2.5-VL-Instruct style directory: weights, config, real tokenizer, preprocessor config."""
    return write_model_dir(dest, qwen25vl_config_json(**sizes), torch.bfloat16, "qwen2-vl", QWEN25_PREPROCESSOR)


def write_qwen3vl_dir(dest: Path, **sizes) -> Path:
    """A complete Qwen3-VL-Instruct style directory: weights, config, real tokenizer, preprocessor config."""
    return write_model_dir(dest, qwen3vl_config_json(**sizes), torch.bfloat16, "qwen3", QWEN3_PREPROCESSOR)
