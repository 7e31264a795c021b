"""VladVA: a generative LVLM used as a CLIP-like two-tower embedding model (open_clip's model contract).

Image tower: the full LVLM over ``[template | image tokens | image prompt]``; text tower: its LLM over
``[template | caption | text prompt]``. Both embeddings are the final-layer hidden state of the last token.
The towers share every LLM weight; each has its own prompt. Trainable: LoRA on the LLM, the soft prompts and
``logit_scale``; everything else is frozen.
"""
from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ar import caption_targets, token_nll
from .backbones import Backbone, get_backbone
from .backbones.base import VisionOutput, hw
from .config import VladVAConfig
from .kernels import last_token_pool
from .prompts import ModalityPrompt
from .sequence import assemble, concat_rows
from .tokenizer import VladVATokenizer, caption_lengths

_logger = logging.getLogger(__name__)


class VisualInfo(SimpleNamespace):
    """What open_clip reads from ``model.visual`` (image size, preprocess config). Deliberately not a Module:
    registering the vision tower a second time would duplicate its keys in ``state_dict``."""


@dataclass
class ImageSequence:
    """The image tower's input for a batch, right padded.

    Attributes:
        embeds: ``[B, T, H]`` input embeddings (image slots filled with vision features).
        ids: ``[B, T]`` token ids (pad past ``mask``).
        mask: ``[B, T]`` 1 for real tokens (all ones when every image has the same size).
        slots: ``[B, T]`` bool, the image-token slots.
        sizes: ``(height, width)`` of each row's image.
        vision: the vision side's output (its per-layer features are injected where the family needs them).
    """

    embeds: torch.Tensor
    ids: torch.Tensor
    mask: torch.Tensor
    slots: torch.Tensor
    sizes: list[tuple[int, int]]
    vision: VisionOutput


class VladVA(nn.Module):
    """VladVA embedding model around a transformers LVLM.

    Args:
        cfg: the model's configuration.
        lvlm: the base ``LlavaForConditionalGeneration`` / ``Qwen2VLForConditionalGeneration`` (weights loaded).
        tokenizer: the caption tokenizer (its ids build the templates).
        name: registered model name, recorded in saved adapters.
    """

    def __init__(self, cfg: VladVAConfig, lvlm: nn.Module, tokenizer: VladVATokenizer, name: str = "vladva"):
        super().__init__()
        self.cfg = cfg
        self.model_name = name
        self.backbone: Backbone = get_backbone(cfg.backbone)
        self.lvlm = lvlm
        self.backbone.check_image_size(lvlm.config, cfg.image_size)
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_id = tokenizer.eos_token_id
        self.context_length = cfg.context_length
        self.vocab_size = tokenizer.vocab_size
        self.output_dict = True
        self.visual = VisualInfo(image_size=self.backbone.input_size(lvlm.config, cfg.image_size),
                                 image_mean=cfg.image_mean, image_std=cfg.image_std, preprocess_cfg={})
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = None
        self._ar_chunk = 1024
        # The image + AR pass runs rows sorted by length (image part + caption) in up to this many groups, each
        # padded only to its own longest row (same results as one padded batch; 1 = one batch padded to the
        # batch maximum).
        self.ar_length_groups = 4
        # open_clip's accumulation runs every micro-batch twice (features without gradient, then the gradient
        # pass) on the same image tensor: the frozen vision tower's output of the first pass is kept for the second
        # when this is on (the trainer turns it on for --accum-freq > 1).
        self.reuse_vision_features = False
        self._vision_cache: list[tuple[weakref.ref, int, Any]] = []  # (input, its version, vision output)
        # When set (by the trainer), state_dict()/load_state_dict() cover only what trains, so checkpoints are
        # adapter-sized and resume still loads strictly.
        self.trainable_state_only = False
        self._register_state_dict_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_forgive_missing_frozen_keys)

        emb = self.embedding
        # Models trained for the AR loss run the long-caption pass; the trainer turns it off for --ar-weight 0.
        self.compute_ar = True
        # --text-pairs (E5-V-style): packed row 1 is a second text; its text embedding stands in for the image's.
        self.text_pairs = False
        self.image_placeholder = self._image_placeholder(tokenizer)
        image_split = self._image_split(tokenizer, cfg.image_prompt.text)
        self.image_body_id_list = list(image_split.body)
        self.register_buffer("image_body_ids", torch.tensor(image_split.body, dtype=torch.long), persistent=False)
        self.image_prompt = ModalityPrompt(cfg.image_prompt, image_split.prefix, [], image_split.prompt,
                                           image_split.post, emb)
        self.text_prompt = self._build_text_prompt(tokenizer, emb)
        self._freeze_base()

    # ---- construction helpers -----------------------------------------------------------------------------
    def _image_placeholder(self, tokenizer: VladVATokenizer) -> str | None:
        """The image tokens as the base model's processor writes them into the prompt string (LLaVA:
        ``image_seq_length`` x ``<image>``; Qwen2-VL: ``<|vision_start|>`` + n x ``<|image_pad|>`` +
        ``<|vision_end|>``); None when the tokenizer does not know them (a stand-in tokenizer on the meta device)."""
        ids = self.backbone.image_body_ids(self.lvlm.config, self.cfg.image_size)
        names = tokenizer.tokenizer.convert_ids_to_tokens(ids)
        if any(n is None for n in names) or any(tokenizer.tokenizer.convert_tokens_to_ids(n) != i
                                                for n, i in zip(names[:3], ids[:3])):
            return None
        return "".join(names)

    def _image_split(self, tokenizer: VladVATokenizer, prompt: str):
        """Whole-string tokenization of the image template, cut into prefix / body / prompt / post."""
        codec = tokenizer.codec("image", prompt)
        if self.image_placeholder is not None:
            return codec.split(self.image_placeholder, body_is_template=True)
        _logger.warning("the tokenizer does not name the image tokens of %s; the image sequence is assembled from "
                        "pieces (fine for a meta-device build, not for real weights)", self.cfg.backbone)
        empty = codec.split("", body_is_template=False)
        return type(empty)(empty.prefix, self.backbone.image_body_ids(self.lvlm.config, self.cfg.image_size)
                           + empty.body, empty.prompt, empty.post)

    def _build_text_prompt(self, tokenizer: VladVATokenizer, emb: nn.Embedding) -> ModalityPrompt:
        """Prefix and suffix around the tokenizer's caption bodies, from the whole-string tokenization."""
        pcfg = self.cfg.text_prompt
        prefix = tokenizer.text_prefix(pcfg.text)
        if prefix != tokenizer.text_prefix():
            raise ValueError(f"the text prompt {pcfg.text!r} changes how the template head is tokenized; "
                             f"the tokenizer's captions would not fit it")
        fixed = tokenizer.codec("text", pcfg.text).fixed
        return ModalityPrompt(pcfg, prefix, [], fixed.prompt, fixed.post, emb)

    def _freeze_base(self) -> None:
        for p in self.lvlm.parameters():
            p.requires_grad_(False)

    def add_lora(self) -> None:
        """Inject LoRA (peft, in place, readable keys) into the LLM's linear layers; LoRA weights train in fp32."""
        from peft import LoraConfig, inject_adapter_in_model

        lcfg = self.cfg.lora
        if not lcfg.enabled:
            return
        config = LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                            target_modules=lcfg.target_modules, bias="none")
        inject_adapter_in_model(config, self.lvlm)
        self.lora_config = config
        for name, p in self.lvlm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
                if p.dtype != torch.float32 and p.device.type != "meta":
                    p.data = p.data.float()

    # ---- layout -------------------------------------------------------------------------------------------
    @property
    def embedding(self) -> nn.Embedding:
        return self.backbone.input_embeddings(self.lvlm)

    @property
    def language_model(self) -> nn.Module:
        return self.backbone.language_model(self.lvlm)

    @property
    def embed_dim(self) -> int:
        return int(self.embedding.weight.shape[1])

    @property
    def base_dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    # ---- input checks -------------------------------------------------------------------------------------
    def _check_image(self, image: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """The images on the model's device and dtype: a ``[B,3,H,W]`` tensor, or (dynamic-resolution families, images
        of different sizes) a list of ``[3,H_i,W_i]`` tensors. A list of one size becomes a tensor."""
        h, w = self.backbone.input_size(self.lvlm.config, self.cfg.image_size)
        if isinstance(image, (list, tuple)):
            if not image:
                return torch.zeros(0, 3, h, w, device=self.device, dtype=self.base_dtype)
            items = [self._check_one_image(im) for im in image]
            if len({tuple(im.shape) for im in items}) == 1:
                return self._check_image(torch.stack(items))
            if not self.backbone.dynamic_resolution:
                raise ValueError(f"{self.backbone.describe()} takes one image size ({h}x{w}); got a list of "
                                 f"images of different sizes; use the model's preprocess transform")
            for im in items:
                self._check_size(im.shape[-2:])
            return [im.to(device=self.device, dtype=self.base_dtype) for im in items]
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"image must be a torch.Tensor [B,3,H,W], got {type(image).__name__}; "
                            f"apply the model's preprocess transform to PIL images first")
        if image.dim() == 3:
            raise ValueError(f"image must be batched [B,3,{h},{w}], got {tuple(image.shape)}; "
                             f"use image.unsqueeze(0) for a single image")
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must have shape [B,3,{h},{w}] (the model's preprocess output), "
                             f"got {tuple(image.shape)}")
        self._check_float(image)
        if image.shape[0]:
            self._check_size(image.shape[-2:])
        return image.to(device=self.device, dtype=self.base_dtype)

    def _check_one_image(self, image) -> torch.Tensor:
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"each image of a list must be a [3,H,W] torch.Tensor (the model's preprocess output), "
                            f"got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"each image of a list must be a [3,H,W] tensor (the model's preprocess output), got "
                             f"{tuple(image.shape)}")
        return self._check_float(image)

    @staticmethod
    def _check_float(image: torch.Tensor) -> torch.Tensor:
        if not image.is_floating_point():
            raise TypeError(f"image must be a float tensor normalised by the model's preprocess, got {image.dtype}; "
                            f"uint8 images need the preprocess transform (ToTensor + Normalize)")
        return image

    def _check_size(self, hw_: Sequence[int]) -> None:
        size = self.cfg.image_size
        expected = self.backbone.input_size(self.lvlm.config, size)
        h, w = int(hw_[0]), int(hw_[1])
        if (h, w) == tuple(expected):
            return
        if not self.backbone.dynamic_resolution:
            raise ValueError(f"image must have shape [B,3,{expected[0]},{expected[1]}] (the model's preprocess "
                             f"output), got [*,3,{h},{w}]")
        try:
            self.backbone.check_image_size(self.lvlm.config, (h, w))
        except ValueError as err:
            raise ValueError(f"image of {h}x{w} pixels: {err}; resize it (the model's preprocess gives "
                             f"{size}x{size})") from None

    def _check_text(self, text: torch.Tensor) -> torch.Tensor:
        if not isinstance(text, torch.Tensor) or text.dtype not in (torch.int64, torch.int32):
            raise TypeError("text must be the LongTensor [B, L] returned by the model's tokenizer "
                            "(open_clip.get_tokenizer(name)); got "
                            f"{type(text).__name__ if not isinstance(text, torch.Tensor) else text.dtype}")
        if text.dim() != 2:
            raise ValueError(f"text must be [B, L] token ids, got shape {tuple(text.shape)}")
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= self.embedding.num_embeddings):
            raise ValueError(f"text holds token ids outside [0, {self.embedding.num_embeddings}); was it made by "
                             f"another model's tokenizer?")
        return text.to(self.device).long()

    # ---- towers -------------------------------------------------------------------------------------------
    def _run_llm(self, embeds: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor | None,
                 image: ImageSequence | None) -> torch.Tensor:
        """Final-layer hidden states ``[B, T, H]``; ``image`` is the image sequence that starts each row (its
        sizes decide the positions, its per-layer vision features are injected at its slots), None for text."""
        pos, extra = None, {}
        if ids is not None:
            pos = self.backbone.position_ids(self.lvlm, ids, mask, image.sizes if image is not None else None)
        if image is not None and image.vision.layer_tokens:
            slots = torch.zeros(ids.shape if ids is not None else mask.shape, dtype=torch.bool, device=mask.device)
            slots[:, : image.slots.shape[1]] = image.slots
            extra = self.backbone.injection_kwargs(image.vision.layer_tokens, slots)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=False,
                                  **extra)
        return out.last_hidden_state

    def _vision_features(self, image: torch.Tensor | list[torch.Tensor], source: Any,
                         compute: Callable[[], Any]) -> Any:
        """``compute()`` (the frozen vision tower + projector on ``image``), reused from the accumulation's
        no-gradient pass over the same input tensor ``source`` (identity, not value) when
        ``reuse_vision_features`` is on. Frozen and deterministic, so the reused output is the one the gradient
        pass would compute."""
        if not (self.reuse_vision_features and self.training and isinstance(source, torch.Tensor)):
            return compute()
        self._vision_cache = [e for e in self._vision_cache if e[0]() is not None]  # inputs still alive only
        if torch.is_grad_enabled():
            for i, (ref, version, feats) in enumerate(self._vision_cache):
                if ref() is source and source._version == version:  # the same tensor, not written to since
                    del self._vision_cache[i]
                    return feats
            return compute()
        feats = compute()
        self._vision_cache.append((weakref.ref(source), source._version, feats))
        return feats

    def _image_body(self, count: int) -> list[int]:
        """The image part's ids with ``count`` image-token slots (the template's own tokens around them kept)."""
        base = self.image_body_id_list
        tok = self.backbone.image_token_id(self.lvlm.config)
        first, last = base.index(tok), len(base) - base[::-1].index(tok)
        return base[:first] + [tok] * count + base[last:]

    def _image_rows(self, image: torch.Tensor | list[torch.Tensor], source: Any = None) -> ImageSequence:
        """Checked images -> the image tower's rows ``[prefix | image tokens | prompt]``, right padded.
        ``source``: the caller's tensor before dtype/device conversion (the key of the vision-output reuse under
        accumulation).

        Where the number of image tokens depends on the image (LLaVA-NeXT's anyres tiles, Qwen's dynamic
        resolution), each row has its own image tokens, so an item's sequence, positions and summary token are
        those it has alone: its embedding does not depend on the batch.
        """
        emb = self.embedding
        vision = self._vision_features(image, source, lambda: self.backbone.vision(self.lvlm, image))
        counts = vision.counts.tolist()
        sizes = [hw(im.shape[-2:]) for im in image]
        registered = int(self.image_body_ids.eq(self.backbone.image_token_id(self.lvlm.config)).sum())
        if all(n == registered for n in counts):  # every row has the registered body
            body_ids = self.image_body_ids.unsqueeze(0).expand(len(counts), -1)
            lengths = torch.full((len(counts),), body_ids.shape[1], dtype=torch.long, device=self.device)
        else:
            bodies = [self._image_body(n) for n in counts]
            lengths = torch.tensor([len(r) for r in bodies], dtype=torch.long, device=self.device)
            body_ids = torch.full((len(bodies), int(lengths.max())), self.pad_token_id, dtype=torch.long,
                                  device=self.device)
            for i, r in enumerate(bodies):
                body_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        real = torch.arange(body_ids.shape[1], device=self.device).unsqueeze(0) < lengths.unsqueeze(1)
        slots = (body_ids == self.backbone.image_token_id(self.lvlm.config)) & real
        body = emb(body_ids).masked_scatter(slots.unsqueeze(-1), vision.tokens.to(self.base_dtype))
        prompt = self.image_prompt
        embeds, mask = assemble(prompt.prefix_embeds(emb), body, lengths, prompt.suffix_embeds(emb))
        ids, _ = assemble(prompt.prefix_ids.unsqueeze(0), body_ids, lengths, prompt.suffix_ids.unsqueeze(0))
        seq_slots, _ = assemble(torch.zeros_like(prompt.prefix_ids, dtype=torch.bool).unsqueeze(0), slots, lengths,
                                torch.zeros_like(prompt.suffix_ids, dtype=torch.bool).unsqueeze(0))
        ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_token_id))
        return ImageSequence(embeds, ids, mask, seq_slots & mask.bool(), sizes, vision)

    def _text_sequence(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Caption ids ``[B, L]`` -> (embeds ``[B, T, H]``, ids ``[B, T]``, mask ``[B, T]``)."""
        emb = self.embedding
        lengths = caption_lengths(text, self.pad_token_id)
        text = text[:, : max(int(lengths.max()), 1)] if text.shape[0] else text
        prompt = self.text_prompt
        embeds, mask = assemble(prompt.prefix_embeds(emb), emb(text), lengths, prompt.suffix_embeds(emb))
        ids, _ = assemble(prompt.prefix_ids.unsqueeze(0), text, lengths, prompt.suffix_ids.unsqueeze(0))
        return embeds, ids, mask

    # ---- inspection ---------------------------------------------------------------------------------------
    def text_input_ids(self, text: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact ids the LLM sees for captions (soft-prompt slots carry the handcrafted prompt's ids).

        Args:
            text: a caption or a list of captions (tokenized with the model's tokenizer and ``context_length``).

        Returns:
            CPU LongTensors ``ids [B, T]`` (right-padded with ``pad_token_id``) and ``mask [B, T]``.
        """
        tok = getattr(self, "tokenizer", None)
        if tok is None:
            raise ValueError("this model has no tokenizer attached; build it with open_clip.create_model")
        body = tok(text, context_length=self.context_length)
        prompt = self.text_prompt
        lengths = caption_lengths(body, self.pad_token_id)
        body = body[:, : max(int(lengths.max()), 1)] if body.shape[0] else body
        prefix = torch.tensor(prompt.prefix_id_list, dtype=torch.long).unsqueeze(0)
        suffix = torch.tensor(prompt.suffix_id_list, dtype=torch.long).unsqueeze(0)
        ids, mask = assemble(prefix, body, lengths, suffix)
        return torch.where(mask.bool(), ids, torch.full_like(ids, self.pad_token_id)), mask

    def image_input_ids(self, image_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """``ids [T]`` (CPU LongTensor): the exact ids of the image tower's sequence; the image-token slots are
        replaced by the projected image features and the soft-prompt slots by the soft vectors.

        Args:
            image_size: where the number of image tokens depends on the image, the ``(height, width)`` (or one
                side of a square image) whose sequence to report: LLaVA-NeXT, the original image's size; the
                dynamic-resolution Qwen families, the size of the tensor given to ``encode_image`` (a multiple of
                the patch unit). Default: the registered input. Fixed-count families ignore it.
        """
        prompt = self.image_prompt
        body = self.image_body_id_list
        if image_size is not None and self.backbone.variable_image_tokens:
            if self.backbone.dynamic_resolution:
                self._check_size(hw(image_size))
            body = self._image_body(self.backbone.num_image_tokens(self.lvlm.config, image_size))
        return torch.tensor(prompt.prefix_id_list + body + prompt.suffix_id_list, dtype=torch.long)

    def _empty(self) -> torch.Tensor:
        return torch.zeros(0, self.embed_dim, device=self.device, dtype=torch.float32)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Image embeddings.

        Args:
            image: ``[B, 3, S, S]`` float, as produced by the model's preprocess transform. Dynamic-resolution
                families (Qwen) also take other sizes (multiples of their patch unit, not necessarily square) and a
                list of ``[3, H_i, W_i]`` images of different sizes: each image gets its own number of image tokens
                and its embedding is the one it has alone.
            normalize: L2-normalise the result.

        Returns:
            ``[B, D]`` float32, ``D`` = the LLM hidden size.
        """
        image = self._check_image(image)
        if len(image) == 0:
            return self._empty()
        seq = self._image_rows(image)
        hidden = self._run_llm(seq.embeds, seq.mask, seq.ids, image=seq)
        return last_token_pool(hidden, seq.mask, normalize=normalize).float()

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Text embeddings.

        Args:
            text: ``[B, L]`` caption ids from the model's tokenizer (right padded; any width).
            normalize: L2-normalise the result.

        Returns:
            ``[B, D]`` float32.
        """
        text = self._check_text(text)
        if text.shape[0] == 0:
            return self._empty()
        embeds, ids, mask = self._text_sequence(text)
        hidden = self._run_llm(embeds, mask, ids, image=None)
        return last_token_pool(hidden, mask, normalize=normalize).float()

    def image_features_and_ar(
        self, image: torch.Tensor, long_caption: torch.Tensor, compute_ar: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One causal pass over ``[image part | image prompt | long caption | EOS]``.

        The summary token precedes the caption, so with causal attention the caption cannot change it: the image
        embedding equals ``encode_image``'s, and the same pass gives the next-token loss of the caption
        conditioned on the image and the image prompt.

        Args:
            image: ``[B, 3, S, S]``.
            long_caption: ``[B, L]`` right-padded answer ids from ``tokenizer.long_captions`` (an all-pad row: no AR
                tokens for that sample; a full row: a cut caption, no EOS target).
            compute_ar: False skips the caption (GradCache's no-grad pass needs only the features and counts).

        Returns:
            (normalised image features ``[B, D]`` fp32, per-sample NLL sums ``[B]`` fp32, token counts ``[B]``).
        """
        source = image
        image = self._check_image(image)
        long_caption = self._check_text(long_caption)
        seq = self._image_rows(image, source)
        img_embeds, img_ids, img_mask = seq.embeds, seq.ids, seq.mask
        img_len = img_mask.sum(1)
        lengths = caption_lengths(long_caption, self.pad_token_id)
        # A row filled to the last column holds a caption cut by the tokenizer: no EOS target (never learn to stop
        # mid-sentence). See VladVATokenizer.long_captions.
        complete = lengths < long_caption.shape[1]
        counts = torch.where(lengths > 0, lengths + complete.long(), torch.zeros_like(lengths))
        if not compute_ar or int(lengths.max()) == 0:
            hidden = self._run_llm(img_embeds, img_mask, img_ids, image=seq)
            feats = last_token_pool(hidden, img_mask, normalize=True).float()
            return feats, torch.zeros_like(feats[:, 0]), counts.float()
        # rows cost their image part + caption + EOS: group by that total. Per-layer injected vision features
        # (Qwen3-VL's deepstack) are laid out over the whole batch's slots: those batches stay one group.
        groups = ([list(range(len(seq.sizes)))] if seq.vision.layer_tokens
                  else length_groups((img_len + lengths).tolist(), 1, self.ar_length_groups))
        if len(groups) == 1:
            return (*self._ar_pass(seq, long_caption, lengths, complete), counts.float())
        order = torch.tensor([i for g in groups for i in g], device=lengths.device)
        parts = []
        for g in groups:
            idx = torch.tensor(g, device=lengths.device)
            sub = replace(seq, embeds=seq.embeds[idx], ids=seq.ids[idx], mask=seq.mask[idx], slots=seq.slots[idx],
                          sizes=[seq.sizes[i] for i in g])
            parts.append(self._ar_pass(sub, long_caption[idx], lengths[idx], complete[idx]))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        feats = torch.cat([p[0] for p in parts])[inverse]
        nll_sum = torch.cat([p[1] for p in parts])[inverse]
        return feats, nll_sum, counts.float()

    def _ar_pass(self, seq: ImageSequence, long_caption: torch.Tensor, lengths: torch.Tensor,
                 complete: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One causal pass over ``[image part | long caption | EOS]`` for rows padded to their longest sequence ->
        (normalised image features ``[b, D]`` fp32, per-sample NLL sums ``[b]`` fp32)."""
        emb = self.embedding
        img_len = seq.mask.sum(1)
        cap = long_caption[:, : max(int(lengths.max()), 1)]
        eos = torch.full((1, 1), self.eos_token_id, dtype=torch.long, device=cap.device)
        # Rows without a long caption still get the EOS appended (harmless: its targets are masked).
        one = torch.ones(1, dtype=torch.long, device=cap.device)
        embeds, mask = concat_rows([(seq.embeds, img_len), (emb(cap), lengths), (emb(eos), one)])
        ids, _ = concat_rows([(seq.ids, img_len), (cap, lengths), (eos, one)])
        hidden = self._run_llm(embeds, mask, ids, image=seq)
        rows = torch.arange(cap.shape[0], device=cap.device)
        feats = F.normalize(hidden[rows, img_len - 1].float(), dim=-1)
        targets, tmask = caption_targets(cap, lengths, self.eos_token_id, complete)
        # Position img_len-1+j of a row predicts targets[:, j] (positions past the row are masked by tmask).
        where = (img_len.unsqueeze(1) - 1 + torch.arange(targets.shape[1], device=cap.device)).clamp(
            max=hidden.shape[1] - 1)
        pred = hidden.gather(1, where.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        nll = token_nll(pred[tmask], self.backbone.lm_head(self.lvlm).weight, targets[tmask], chunk=self._ar_chunk)
        sample = torch.arange(cap.shape[0], device=cap.device).unsqueeze(1).expand_as(tmask)[tmask]
        nll_sum = torch.zeros(cap.shape[0], device=nll.device, dtype=torch.float32).index_add(0, sample, nll)
        return feats, nll_sum

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None) -> dict[str, Any]:
        """open_clip's training/eval forward.

        Args:
            image: ``[B, 3, S, S]`` or None.
            text: ``[B, L]`` caption ids, or ``[B, 2, L]`` packed (row 0 short caption, row 1 long caption) for
                training with the AR loss; or None.

        Returns:
            dict with ``image_features``/``text_features`` (normalised, ``[B, D]``, or None), exponentiated
            ``logit_scale``, ``logit_bias`` (None) and, for packed text with an image, per-sample ``ar_nll_sum``
            and ``ar_num_tokens`` (``[B]``; batch-first so open_clip's accumulation can concatenate them).
        """
        out: dict[str, Any] = {"logit_scale": self.logit_scale.exp(), "logit_bias": self.logit_bias}
        short = text
        if text is not None and text.dim() == 3:
            if text.shape[1] != 2:
                raise ValueError(f"packed text must be [B, 2, L] (short, long), got {tuple(text.shape)}")
            short, long = text[:, 0], text[:, 1]
            if self.text_pairs:
                out["image_features"] = self.encode_text(long, normalize=True)
                image = None
            elif image is not None and self.compute_ar:
                # open_clip's accumulation caches features in a no-grad pass while training: the caption is
                # skipped there (its loss comes from the gradient pass). In eval mode the AR loss is computed.
                compute_ar = torch.is_grad_enabled() or not self.training
                feats, nll, ntok = self.image_features_and_ar(image, long, compute_ar=compute_ar)
                out.update(image_features=feats, ar_nll_sum=nll, ar_num_tokens=ntok)
                image = None
        if image is not None:
            out["image_features"] = self.encode_image(image, normalize=True)
        else:
            out.setdefault("image_features", None)
        out["text_features"] = self.encode_text(short, normalize=True) if short is not None else None
        return out if self.output_dict else (out["image_features"], out["text_features"], out["logit_scale"])

    # ---- open_clip contract -------------------------------------------------------------------------------
    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False) -> None:
        """The vision tower and projector are always frozen in VladVA; kept for open_clip compatibility."""
        if unlocked_groups:
            _logger.warning("VladVA keeps the vision tower frozen; unlocked_groups=%d is ignored", unlocked_groups)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
        """The LLM base weights are always frozen (only LoRA and prompts train); kept for open_clip."""
        if unlocked_layers:
            _logger.warning("VladVA trains the LLM through LoRA only; unlocked_layers=%d is ignored", unlocked_layers)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        lm = self.language_model
        if enable:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_disable()

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", "image_prompt.soft", "text_prompt.soft"}

    # ---- trainable parameters -----------------------------------------------------------------------------
    def trainable_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Trainable parameters by role: ``lora``, ``soft_prompt``, ``logit_scale``."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {"lora": [], "soft_prompt": [], "logit_scale": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name == "logit_scale":
                groups["logit_scale"].append((name, p))
            elif name.endswith("prompt.soft"):
                groups["soft_prompt"].append((name, p))
            else:
                groups["lora"].append((name, p))
        return groups

    def unused_trainables(self) -> list[str]:
        """Trainable parameters the current mode leaves out of the loss (``text_pairs``: the image soft prompt).
        DDP must be told (``find_unused_parameters``), or it waits for their gradients forever."""
        if not self.text_pairs:
            return []
        return [f"image_prompt.{n}" for n, p in self.image_prompt.named_parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what trains (LoRA, soft prompts, logit_scale), detached, keyed like ``state_dict``."""
        return {n: p.detach() for group in self.trainable_groups().values() for n, p in group}

    def merge_adapters(self) -> None:
        """Fold LoRA into the base linear weights (faster inference; no more training of LoRA)."""
        from peft.tuners.lora import LoraLayer

        merged = 0
        for module in self.lvlm.modules():
            if isinstance(module, LoraLayer) and not module.merged:
                module.merge()
                merged += 1
        for name, p in self.lvlm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(False)
        _logger.info("merged LoRA into %d layers", merged)

    @property
    def merged(self) -> bool:
        from peft.tuners.lora import LoraLayer

        return any(isinstance(m, LoraLayer) and m.merged for m in self.lvlm.modules())

    # ---- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, image: torch.Tensor, prompt: str | Sequence[str] = "Describe the image.",
                 tokenizer: VladVATokenizer | None = None, max_new_tokens: int = 32, **generate_kwargs) -> list[str]:
        """Caption / answer with the adapters active (the model stays generative).

        Args:
            image: ``[B, 3, S, S]`` preprocessed images (dynamic-resolution families: as for ``encode_image``).
            prompt: one instruction for all images, or one per image.
            tokenizer: the model's tokenizer (default: the one it was built with).
            max_new_tokens: generation budget; greedy decoding unless ``generate_kwargs`` say otherwise.

        Returns:
            B decoded strings.
        """
        tok = tokenizer or getattr(self, "tokenizer", None)
        new = self.generate_tokens(image, prompt, tok, max_new_tokens, **generate_kwargs)
        return [tok.decode(row) for row in new]

    @torch.no_grad()
    def generate_tokens(self, image: torch.Tensor, prompt: str | Sequence[str] = "Describe the image.",
                        tokenizer: VladVATokenizer | None = None, max_new_tokens: int = 32,
                        **generate_kwargs) -> torch.Tensor:
        """:meth:`generate` before decoding: the new token ids ``[B, N]`` (``N <= max_new_tokens``; a row that
        ended early is filled with ``pad_token_id`` after its EOS), for callers that count tokens or need to know
        whether a row stopped at EOS."""
        tok = tokenizer or getattr(self, "tokenizer", None)
        if tok is None:
            raise ValueError("generate needs the tokenizer: pass tokenizer=open_clip.get_tokenizer(name)")
        image = self._check_image(image)
        prompts = [prompt] * len(image) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(image):
            raise ValueError(f"got {len(prompts)} prompts for {len(image)} images")
        splits = [self._image_split(tok, p) for p in prompts]
        rows = [s.ids for s in splits]
        sizes = self.backbone.image_sizes(self.lvlm.config, image)
        if sizes is not None:  # each image's own number of image tokens
            counts = [self.backbone.num_image_tokens(self.lvlm.config, hw) for hw in sizes]
            rows = [s.prefix + self._image_body(n) + s.prompt + s.post for s, n in zip(splits, counts)]
        width = max(len(r) for r in rows)
        # Left padding: generation appends at the end of every row.
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        kwargs = self.backbone.generation_inputs(self.lvlm, ids, mask, image)
        generate_kwargs.setdefault("do_sample", False)
        out = self.lvlm.generate(**kwargs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **generate_kwargs)
        return out[:, width:]


def length_groups(lengths: list[int], fixed: int, max_groups: int, min_saving: float = 0.05) -> list[list[int]]:
    """Rows grouped by caption length so that padding each group to its own longest caption costs the fewest
    tokens: ``sum(len(g) * (fixed + max length in g))`` over at most ``max_groups`` groups of the rows sorted by
    length (exact dynamic programme). One group (the rows in their order) unless splitting saves at least
    ``min_saving`` of the tokens: every extra group is one more, smaller, language-model call.

    Args:
        lengths: tokens per row that vary (the caption, or the caption plus the row's own image part).
        fixed: tokens every row has besides ``lengths`` (the image part when it is the same for all rows, EOS).
        max_groups: the most groups.
    """
    n = len(lengths)
    single = [list(range(n))]
    if n < 2 or max_groups < 2:
        return single
    order = sorted(range(n), key=lambda i: -lengths[i])  # longest first: a group's maximum is its first row
    srt = [lengths[i] for i in order]
    inf = float("inf")
    # best[k][j]: fewest tokens for the first j sorted rows in k groups; cut[k][j]: where the last group starts
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for k in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[k - 1][i] + (j - i) * (fixed + srt[i])
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    k = min(range(1, max_groups + 1), key=lambda g: (best[g][n], g))
    if best[k][n] > (1 - min_saving) * n * (fixed + srt[0]):
        return single
    groups, j = [], n
    while k:
        i = cut[k][j]
        groups.append(order[i:j])
        j, k = i, k - 1
    return [g for g in reversed(groups) if g]


def _trainable_names(model: "VladVA") -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _drop_frozen_keys(model: "VladVA", state_dict: dict, prefix: str, local_metadata) -> None:
    if not model.trainable_state_only:
        return
    keep = {prefix + n for n in _trainable_names(model)}
    for key in [k for k in state_dict if k.startswith(prefix) and k not in keep]:
        del state_dict[key]


def _forgive_missing_frozen_keys(model: "VladVA", incompatible) -> None:
    if not model.trainable_state_only:
        return
    trainable = _trainable_names(model)
    # Keys carry the caller's prefix (e.g. "module." under DDP); a frozen key is one whose suffix is not trainable.
    frozen = [k for k in incompatible.missing_keys if not any(k == t or k.endswith("." + t) for t in trainable)]
    for key in frozen:
        incompatible.missing_keys.remove(key)


def logit_scale_init(temperature: float) -> float:
    """``ln(1 / temperature)``: open_clip stores the log of the inverse temperature."""
    return math.log(1.0 / temperature)
