"""What the LVLM would say next at the summary position (the paper's Fig. 4): top-k tokens, before and after
fine-tuning.

Each model is run with its own prompts (a fine-tuned model's soft prompts included), or with the handcrafted
prompts given; the logits are the LM head applied to the summary token's final hidden state, i.e. to the
unnormalised embedding.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import _lvlm
from .data import AnalysisData, image_batches
from .metrics import distribution_entropy
from .outputs import markdown_table, write_csv, write_json, write_text

__all__ = ["NextTokenInput", "NextTokenResult", "TokenProb", "next_tokens"]


@dataclass(frozen=True)
class NextTokenInput:
    """key: ``image:<i>`` or ``caption:<j>``; title: a short human-readable name (file name or caption)."""

    key: str
    kind: str
    title: str


@dataclass(frozen=True)
class TokenProb:
    token: str
    token_id: int
    prob: float


@dataclass
class NextTokenResult:
    """``top[model][input key]``: the k most likely next tokens; ``entropy[model][key]``: of the whole
    distribution; ``mean_top[model][kind]``: top-k of the distribution averaged over the inputs of a kind;
    ``summary[model][kind]``: mean entropy and how many distinct top-1 tokens the inputs get."""

    models: list[str]
    inputs: list[NextTokenInput]
    top: dict[str, dict[str, list[TokenProb]]]
    entropy: dict[str, dict[str, float]]
    mean_top: dict[str, dict[str, list[TokenProb]]]
    summary: dict[str, dict[str, dict[str, float]]]
    info: dict[str, Any]

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for m in self.models:
            for item in self.inputs:
                for rank, t in enumerate(self.top[m][item.key], start=1):
                    out.append({"model": m, "input": item.key, "kind": item.kind, "title": item.title,
                                "rank": rank, "token": t.token, "token_id": t.token_id, "prob": t.prob,
                                "entropy": self.entropy[m][item.key]})
        return out

    def to_markdown(self) -> str:
        parts = []
        for kind in sorted({i.kind for i in self.inputs}):
            cols = ["model", "mean entropy (nats)", "distinct top-1", "inputs", "top tokens of the mean distribution"]
            rows = [{"model": m, "mean entropy (nats)": self.summary[m][kind]["mean_entropy"],
                     "distinct top-1": int(self.summary[m][kind]["distinct_top1"]),
                     "inputs": int(self.summary[m][kind]["n"]),
                     "top tokens of the mean distribution": ", ".join(
                         f"{t.token!r} {t.prob:.2f}" for t in self.mean_top[m][kind][:5])} for m in self.models]
            parts.append(f"**{kind}s**\n\n" + markdown_table(rows, cols))
        return "\n\n".join(parts)

    def save(self, out: str | os.PathLike, plots: bool = True) -> dict[str, str]:
        out = Path(out)
        files = {"csv": write_csv(out / "next_tokens.csv", self.rows()),
                 "json": write_json(out / "next_tokens.json", {
                     "models": self.models, "inputs": [asdict(i) for i in self.inputs], "summary": self.summary,
                     "mean_top": {m: {k: [asdict(t) for t in v] for k, v in d.items()} for m, d in
                                  self.mean_top.items()},
                     "top": {m: {k: [asdict(t) for t in v] for k, v in d.items()} for m, d in self.top.items()},
                     "entropy": self.entropy, "info": self.info}),
                 "md": write_text(out / "next_tokens.md", self.to_markdown() + "\n")}
        if plots:
            from .plots import plot_next_tokens

            files["png"] = plot_next_tokens(self, out / "next_tokens.png")
        return {k: str(v) for k, v in files.items()}


def _decode(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


@torch.no_grad()
def _distributions(model, preprocess: Callable, data: AnalysisData, image_indices: Sequence[int],
                   caption_indices: Sequence[int], batch_size: int, image_prompt: str | None,
                   text_prompt: str | None) -> dict[str, torch.Tensor]:
    """input key -> next-token probabilities ``[V]`` (fp32, CPU)."""
    runner = model if image_prompt is None and text_prompt is None else \
        _lvlm.prompt_view(model, image_prompt, text_prompt)
    probs: dict[str, torch.Tensor] = {}
    for idx, pixels in image_batches(data.images, preprocess, batch_size, image_indices):
        logits = _lvlm.summary_logits(model, runner.encode_image(pixels.to(model.device)))
        for i, p in zip(idx, logits.softmax(-1).cpu()):
            probs[f"image:{i}"] = p
    for start in range(0, len(caption_indices), batch_size):
        idx = list(caption_indices[start:start + batch_size])
        tokens = model.tokenizer([data.captions[j] for j in idx]).to(model.device)
        logits = _lvlm.summary_logits(model, runner.encode_text(tokens))
        for j, p in zip(idx, logits.softmax(-1).cpu()):
            probs[f"caption:{j}"] = p
    return probs


def _top(tokenizer, probs: torch.Tensor, k: int) -> list[TokenProb]:
    values, ids = probs.topk(min(k, probs.numel()))
    return [TokenProb(_decode(tokenizer, int(i)), int(i), float(v)) for v, i in zip(values, ids)]


def next_tokens(
    models: Mapping[str, tuple[torch.nn.Module, Callable]],
    data: AnalysisData,
    *,
    image_indices: Sequence[int] | None = None,
    caption_indices: Sequence[int] | None = None,
    k: int = 10,
    batch_size: int = 16,
    image_prompt: str | None = None,
    text_prompt: str | None = None,
) -> NextTokenResult:
    """Top-k next tokens at the summary position for the chosen images and captions, per model.

    Args:
        models: label -> (VladVA model, preprocess), e.g. ``{"before": ..., "after": ...}``.
        data: images and captions to pick from.
        image_indices / caption_indices: which ones (default: all).
        k: tokens per input.
        image_prompt / text_prompt: handcrafted prompts for every model (default: each model's own).
    """
    if not models:
        raise ValueError("no models given")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    image_indices = list(range(len(data.images)) if image_indices is None else image_indices)
    caption_indices = list(range(len(data.captions)) if caption_indices is None else caption_indices)
    for name, idx, n in (("image", image_indices, len(data.images)), ("caption", caption_indices,
                                                                     len(data.captions))):
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"{name} indices {bad[:5]} are out of range (the data has {n} {name}s)")
    if not image_indices and not caption_indices:
        raise ValueError("nothing to show: no images and no captions selected")
    inputs = [NextTokenInput(f"image:{i}", "image", Path(data.images.keys[i]).name) for i in image_indices]
    inputs += [NextTokenInput(f"caption:{j}", "caption", data.captions[j]) for j in caption_indices]

    top: dict[str, dict[str, list[TokenProb]]] = {}
    entropy: dict[str, dict[str, float]] = {}
    mean_top: dict[str, dict[str, list[TokenProb]]] = {}
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for label, (model, preprocess) in models.items():
        _lvlm.require_vladva(model, f"the next-token view ({label})")
        model.eval()
        probs = _distributions(model, preprocess, data, image_indices, caption_indices, batch_size, image_prompt,
                               text_prompt)
        tok = model.tokenizer
        top[label] = {key: _top(tok, p, k) for key, p in probs.items()}
        entropy[label] = {key: float(distribution_entropy(p, normalize=False)) for key, p in probs.items()}
        mean_top[label], summary[label] = {}, {}
        for kind in ("image", "caption"):
            keys = [i.key for i in inputs if i.kind == kind]
            if not keys:
                continue
            mean_top[label][kind] = _top(tok, torch.stack([probs[key] for key in keys]).mean(0), k)
            firsts = Counter(top[label][key][0].token_id for key in keys)
            summary[label][kind] = {"n": len(keys),
                                    "mean_entropy": sum(entropy[label][key] for key in keys) / len(keys),
                                    "distinct_top1": len(firsts),
                                    "most_common_top1_share": firsts.most_common(1)[0][1] / len(keys)}
    info = {"k": k, "image_prompt": image_prompt or "each model's own", "text_prompt": text_prompt or
            "each model's own", "data": data.info}
    return NextTokenResult(list(models), inputs, top, entropy, mean_top, summary, info)
