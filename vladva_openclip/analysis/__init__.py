"""The paper's analyses as tools, for any registered VladVA model (``vladva analyze ...`` on the command line).

- :func:`search_prompts` (Figs. 2, 3, 5): next-token entropy at the summary position, effective rank of the
  embeddings, R@1 and their Spearman correlations for candidate prompt pairs; a label-free ranking and
  :func:`apply_prompt_pair` to write an adapter that uses the chosen pair.
- :func:`next_tokens` (Fig. 4): top-k next tokens at the summary position, model by model.
- :func:`attention_maps` (Fig. 6): the summary token's attention over the image, per layer and head.
- :func:`caption_retention` (Fig. 7): captions checked fact by fact on the synthetic world, reference NLL.
- :func:`run_miniature`: all of them on the embedded default.

Python::

    from vladva_openclip.analysis import load_analysis_data, search_prompts, default_prompt_pairs
    data = load_analysis_data("flickr30k/dataset_flickr30k.json", "flickr30k/images", max_images=1000)
    result = search_prompts(model, preprocess, data, default_prompt_pairs())
    result.recommended, result.save("analysis/prompts")
"""
from .attention import AttentionResult, attention_maps
from .caption_facts import caption_facts, fact_scores, scene_facts
from .data import AnalysisData, load_analysis_data
from .metrics import (
    components_for,
    cumulative_explained_variance,
    distribution_entropy,
    entropy_from_logits,
    explained_variance_ratio,
    fractional_ranks,
    permutation_pvalue,
    spearman,
)
from .miniature import MiniatureConfig, run_miniature
from .models import ModelBuildError, ModelRef, load_models, load_vladva, parse_model_ref
from .next_token import NextTokenResult, next_tokens
from .prompt_search import PromptSearchConfig, PromptSearchResult, apply_prompt_pair, search_prompts
from .prompt_sets import PromptFileError, PromptPair, default_prompt_pairs, load_prompt_pairs
from .retention import RetentionConfig, RetentionResult, caption_retention, data_scenes, world_scenes
from .selection import SCORES, LabelFreeScore, register_score

__all__ = [
    "SCORES", "AnalysisData", "AttentionResult", "LabelFreeScore", "MiniatureConfig", "ModelBuildError", "ModelRef",
    "NextTokenResult", "PromptFileError", "PromptPair", "PromptSearchConfig", "PromptSearchResult", "RetentionConfig",
    "RetentionResult", "apply_prompt_pair", "attention_maps", "caption_facts", "caption_retention", "components_for",
    "cumulative_explained_variance", "data_scenes", "default_prompt_pairs", "distribution_entropy",
    "entropy_from_logits", "explained_variance_ratio", "fact_scores", "fractional_ranks", "load_analysis_data",
    "load_models", "load_prompt_pairs", "load_vladva", "next_tokens", "parse_model_ref", "permutation_pvalue", "register_score",
    "run_miniature", "scene_facts", "search_prompts", "spearman", "world_scenes",
]
