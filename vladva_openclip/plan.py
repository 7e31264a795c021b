"""``vladva plan``: what a training run needs per GPU, and what fits, before it starts.

Everything comes from the model as built (on the ``meta`` device: no weights, no memory), never from per-name
tables, so any registered model (and any new backbone) is planned the same way:

* parameters, their dtypes and the trainable part: counted on the built model;
* optimizer state (AdamW: two fp32 moments per trainable), fp32 gradients and DDP's gradient buckets;
* activation memory per micro-batch: the language model is run on ``meta`` tensors of the real sequence shapes
  (image tower + long caption in one causal pass; text tower over the short caption) under
  ``torch.autograd.graph.saved_tensors_hooks``, adding up the distinct storages autograd keeps for backward.
  Attention is counted as the fused kernels (flash / memory-efficient on CUDA, the flash kernel on CPU) keep it:
  q, k, v, the output and the log-sum-exp, never a ``T x T`` matrix (the ``meta`` device would otherwise trace
  the unfused math path);
* with ``--grad-checkpointing`` each decoder layer keeps only its input; the backward of one layer recomputes
  its activations (one layer's worth, measured per layer by the same trace);
* the AR loss's transient logits (``chunk x vocab``: the bf16 matmul output, its fp32 copy and the bf16
  probabilities) and its saved ``d nll / d hidden`` (``tokens x hidden``);
* ``--accum-freq``: the cached features and inputs of the micro-batches.

The total is the planned ``torch.cuda.max_memory_allocated``; the CUDA context and the allocator's
fragmentation come on top, so ``fit`` keeps ``headroom`` (10 %) of the device free. The numbers are per GPU:
DDP replicates the model, so the world size changes only the gradient buckets.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_logger = logging.getLogger(__name__)

GiB = 1024 ** 3
# Bytes per trainable parameter besides the parameter itself: fp32 gradient + AdamW's exp_avg and exp_avg_sq.
GRAD_BYTES, ADAM_BYTES = 4, 8
HEADROOM = 0.10  # of the device kept free for the CUDA context, cuBLAS workspaces and fragmentation
# Backward of a layer holds, besides that layer's saved tensors, the gradients of its activations: a few
# [B, T, intermediate] tensors at a time, about a quarter of the layer's saved bytes in LLaMA/Qwen blocks.
# An estimate: benchmarks/gpu_stages/plan_memory.py compares the total with max_memory_allocated.
BACKWARD_GRAD_FACTOR = 0.25


def parse_size(text: str) -> int:
    """``"80GB"``, ``"80G"``, ``"80GiB"``, ``"81920MiB"``, ``"85899345920"`` -> bytes. GB and G are taken as GiB
    (what ``nvidia-smi`` and ``torch.cuda.get_device_properties`` report as a card's 80 GB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ValueError(f"cannot read the memory size {text!r}; write e.g. 80GB, 40GiB or 81920MiB")
    scale = {"": 1, "k": 1024, "m": 1024 ** 2, "g": GiB, "t": 1024 ** 4}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


@dataclass
class PlanRequest:
    """What a run is planned for (the trainer's flags)."""

    model: str
    batch_size: int = 32  # per GPU, per micro-batch (open_clip_train's --batch-size)
    max_short_len: int | None = None  # default: the model's
    max_long_len: int | None = None  # default: the model's (caption tokens; EOS added)
    precision: str = "amp_bf16"
    grad_checkpointing: bool = False
    accum_freq: int = 1
    world_size: int = 1
    ar: bool = True  # the next-token loss on long captions (--ar-weight > 0, not --text-pairs)
    ar_chunk: int = 1024
    overrides: dict[str, Any] = field(default_factory=dict)  # create_model keywords (base_model, lora_r, ...)

    def check(self) -> None:
        for name in ("batch_size", "accum_freq", "world_size", "ar_chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_short_len", "max_long_len"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass
class MemoryPlan:
    """Planned bytes per GPU (``*_bytes``) and the counts they come from."""

    model: str
    batch_size: int
    image_seq: int  # tokens of the image + AR pass per sample (image part, prompt, long caption, EOS)
    text_seq: int  # tokens of the text pass per sample
    base_params: int
    trainable_params: int
    weights_bytes: int  # base (its dtype) + trainables (fp32)
    grads_bytes: int
    optimizer_bytes: int
    ddp_buckets_bytes: int
    saved_image_pass_bytes: int  # autograd's saved tensors of one micro-batch's image + AR pass
    saved_text_pass_bytes: int
    ar_saved_bytes: int  # the AR loss's d nll / d hidden
    backward_peak_bytes: int  # transient: one layer's recompute and activation gradients
    ar_logits_peak_bytes: int
    accum_cache_bytes: int
    activation_bytes: int  # everything per micro-batch: saved + transient
    total_bytes: int
    gpu_memory_bytes: int | None = None
    fits: bool | None = None
    max_batch_size: int | None = None  # the largest per-GPU batch that fits gpu_memory_bytes
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        def g(b: int) -> str:
            return f"{b / GiB:8.2f} GiB"

        lines = [
            (f"plan for {self.model}: per-GPU batch {self.batch_size}, image+AR pass {self.image_seq} tokens, "
             f"text pass {self.text_seq} tokens"),
            (f"  parameters          {self.base_params / 1e9:8.3f} B base, {self.trainable_params / 1e6:.2f} M "
             "trainable"),
            f"  weights             {g(self.weights_bytes)}",
            (f"  gradients           {g(self.grads_bytes + self.ddp_buckets_bytes)}"
             + (f"  (DDP buckets {g(self.ddp_buckets_bytes).strip()})" if self.ddp_buckets_bytes else "")),
            f"  optimizer state     {g(self.optimizer_bytes)}",
            (f"  activations/pass    {g(self.saved_image_pass_bytes + self.saved_text_pass_bytes + self.ar_saved_bytes)}"
             f"  (image+AR {g(self.saved_image_pass_bytes).strip()}, text {g(self.saved_text_pass_bytes).strip()},"
             f" AR grad {g(self.ar_saved_bytes).strip()})"),
            f"  backward transient  {g(self.backward_peak_bytes)}",
            f"  AR logits peak      {g(self.ar_logits_peak_bytes)}",
        ]
        if self.accum_cache_bytes:
            lines.append(f"  accumulation cache  {g(self.accum_cache_bytes)}")
        lines.append(f"  total per GPU       {g(self.total_bytes)}")
        if self.gpu_memory_bytes:
            usable = self.gpu_memory_bytes * (1 - HEADROOM)
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.gpu_memory_bytes / GiB:.0f} GiB ({usable / GiB:.1f} GiB usable); "
                         f"largest per-GPU batch that fits: {self.max_batch_size}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---- the trace -------------------------------------------------------------------------------------------------
class _FusedAttentionShape(torch.autograd.Function):
    """Shape-only stand-in for a fused attention kernel: keeps what flash / memory-efficient attention keep for
    backward (q, k, v, output, fp32 log-sum-exp per query and head)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                **_):
    return _FusedAttentionShape.apply(query, key, value)


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_sdpa
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
        torch.nn.functional.scaled_dot_product_attention = original


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensorCounter:
    """Distinct storages that autograd saves for backward while active, in bytes, attributed to the decoder layer
    running at the time (``per_layer``; index -1: outside any layer). Parameters and buffers are excluded."""

    def __init__(self, module: nn.Module | None = None, layers: list[nn.Module] | None = None):
        self.exclude = set()
        if module is not None:
            self.exclude = {_storage_key(t) for t in list(module.parameters()) + list(module.buffers())}
        self.layers = layers or []
        self.seen: set[int] = set()
        self.total = 0
        self.per_layer: dict[int, int] = {}
        self._current = -1
        self._handles: list[Any] = []

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            self.total += nbytes
            self.per_layer[self._current] = self.per_layer.get(self._current, 0) + nbytes
        return t

    def _enter(self, index: int):
        def hook(module, args, kwargs=None):
            self._current = index
        return hook

    def _leave(self, module, args, output):
        self._current = -1

    @contextlib.contextmanager
    def active(self) -> Iterator[SavedTensorCounter]:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._enter(i)))
            self._handles.append(layer.register_forward_hook(self._leave))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []


def decoder_layers(language_model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a language model: its ``layers`` ModuleList, else its longest ModuleList."""
    layers = getattr(language_model, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    lists = [m for m in language_model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@dataclass
class PassTrace:
    """Saved bytes of one language-model pass over ``[1, seq, hidden]`` (scale by the batch size)."""

    saved: int  # everything, checkpointing off
    per_layer_max: int  # the largest decoder layer's share
    layer_input: int  # one layer's input (what a checkpointed layer keeps)
    outside_layers: int  # saved outside the decoder layers (final norm, ...)
    layers: int


def _meta_causal_mask(batch: int, seq: int) -> torch.Tensor:
    """A ready 4-D mask ``[B, 1, T, T]``: transformers passes it through as is (from a 2-D mask or none it would
    inspect values, which meta tensors do not have)."""
    return torch.empty(batch, 1, seq, seq, dtype=torch.bool, device="meta")


def trace_language_model(model: nn.Module, seq: int) -> PassTrace:
    """Run the model's language model on ``meta`` inputs ``[1, seq, hidden]`` (requiring grad, as the soft prompt
    makes them) and count what autograd saves. ``model`` must be built on the meta device."""
    lm = model.language_model
    layers = decoder_layers(lm)
    hidden = model.embed_dim
    dtype = model.base_dtype
    embeds = torch.empty(1, seq, hidden, device="meta", dtype=dtype, requires_grad=True)
    counter = SavedTensorCounter(lm, layers)
    with torch.enable_grad(), _fused_attention(), counter.active():
        lm(inputs_embeds=embeds, attention_mask=_meta_causal_mask(1, seq), use_cache=False)
    in_layers = [v for k, v in counter.per_layer.items() if k >= 0]
    return PassTrace(saved=counter.total, per_layer_max=max(in_layers, default=0),
                     layer_input=seq * hidden * torch.empty(0, dtype=dtype).element_size(),
                     outside_layers=counter.per_layer.get(-1, 0), layers=len(layers))


def _pass_bytes(trace: PassTrace, batch: int, checkpointing: bool) -> tuple[int, int]:
    """(saved bytes, backward transient) of one pass for ``batch`` rows."""
    grads = int(BACKWARD_GRAD_FACTOR * trace.per_layer_max * batch)
    if not checkpointing:
        return trace.saved * batch, grads
    kept = (trace.layer_input * trace.layers + trace.outside_layers) * batch
    # backward of a checkpointed layer recomputes its activations (one layer's saved bytes) and forms their grads
    return kept, trace.per_layer_max * batch + grads


def sequence_lengths(model: nn.Module, short_len: int, long_len: int, ar: bool) -> tuple[int, int]:
    """Tokens per sample of the image (+AR) pass and of the text pass, from the model's own templates."""
    image = len(model.image_input_ids()) + ((long_len + 1) if ar else 0)
    prompt = model.text_prompt
    text = len(prompt.prefix_id_list) + short_len + len(prompt.suffix_id_list)
    return image, text


# ---- the plan --------------------------------------------------------------------------------------------------
def build_meta_model(request: PlanRequest) -> nn.Module:
    from .factory import create_vladva

    # Without the real tokenizer (not downloaded) a stand-in counts the template's tokens; the build says so at
    # WARNING level, which is noise for a plan (the counts differ by a few tokens at most).
    quiet = [logging.getLogger(n) for n in ("vladva_openclip.factory", "vladva_openclip.model")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        return create_vladva(request.model, precision=request.precision, device="meta", **request.overrides)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)


def plan_model(model: nn.Module, request: PlanRequest, gpu_memory: int | None = None) -> MemoryPlan:
    """Plan ``request`` on an already built meta-device ``model`` (see :func:`plan`)."""
    request.check()
    short_len = int(request.max_short_len or model.cfg.max_short_len)
    long_len = int(request.max_long_len or model.cfg.max_long_len)
    image_seq, text_seq = sequence_lengths(model, short_len, long_len, request.ar)
    image_trace = trace_language_model(model, image_seq)
    text_trace = trace_language_model(model, text_seq)
    base_dtype = model.base_dtype
    esize = torch.empty(0, dtype=base_dtype).element_size()
    params = list(model.named_parameters())
    base_params = sum(p.numel() for _, p in params if not p.requires_grad)
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    weights = sum(p.numel() * p.element_size() for _, p in params)
    grads = trainable * GRAD_BYTES
    optimizer = trainable * ADAM_BYTES
    ddp = trainable * GRAD_BYTES if request.world_size > 1 else 0
    vocab = int(model.backbone.lm_head(model.lvlm).weight.shape[0])
    hidden = model.embed_dim

    def activations(batch: int) -> dict[str, int]:
        img_saved, img_back = _pass_bytes(image_trace, batch, request.grad_checkpointing)
        txt_saved, txt_back = _pass_bytes(text_trace, batch, request.grad_checkpointing)
        ar_tokens = batch * (long_len + 1) if request.ar else 0
        ar_saved = ar_tokens * hidden * esize
        # F.linear output (base dtype) + its fp32 copy (exp in place) + the probabilities cast back for the matmul
        logits_peak = min(request.ar_chunk, max(ar_tokens, 1)) * vocab * (esize + 4 + esize) if request.ar else 0
        cache = 0
        if request.accum_freq > 1:
            n = request.accum_freq * batch
            size = model.cfg.image_size
            # cached image and text features (fp32, [n, D] each), the images (fp32), packed captions (int64) and
            # the vision tower's output kept for the gradient pass ([n, image tokens, D], base dtype)
            cache = n * (2 * hidden * 4 + 3 * size * size * 4 + 2 * long_len * 8
                         + len(model.image_body_id_list) * hidden * esize)
        return {"img": img_saved, "txt": txt_saved, "ar": ar_saved, "back": max(img_back, txt_back),
                "logits": logits_peak, "cache": cache}

    def total(batch: int) -> tuple[int, dict[str, int]]:
        a = activations(batch)
        act = a["img"] + a["txt"] + a["ar"] + max(a["back"], a["logits"]) + a["cache"]
        return weights + grads + optimizer + ddp + act, a

    tot, a = total(request.batch_size)
    notes = []
    if base_dtype == torch.float32 and base_params > 1e9:
        notes.append(f"the base is float32 ({base_params * 4 / GiB:.1f} GiB); --precision amp_bf16 halves it")
    out = MemoryPlan(
        model=model.model_name, batch_size=request.batch_size, image_seq=image_seq, text_seq=text_seq,
        base_params=base_params, trainable_params=trainable, weights_bytes=weights, grads_bytes=grads,
        optimizer_bytes=optimizer, ddp_buckets_bytes=ddp, saved_image_pass_bytes=a["img"],
        saved_text_pass_bytes=a["txt"], ar_saved_bytes=a["ar"], backward_peak_bytes=a["back"],
        ar_logits_peak_bytes=a["logits"], accum_cache_bytes=a["cache"],
        activation_bytes=tot - weights - grads - optimizer - ddp, total_bytes=tot, notes=notes)
    if gpu_memory:
        usable = gpu_memory * (1 - HEADROOM)
        out.gpu_memory_bytes = int(gpu_memory)
        out.fits = tot <= usable
        # Every term is linear in the batch (the trace is per row) except the capped logits chunk: search.
        lo, hi = 0, 1
        while total(hi)[0] <= usable and hi < 1 << 20:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(mid)[0] <= usable else (lo, mid)
        out.max_batch_size = lo
        if lo == 0:
            out.notes.append("not even one sample per GPU fits: use --grad-checkpointing, a bf16 base or a "
                             "bigger GPU")
    return out


def plan(model: str, batch_size: int = 32, *, max_short_len: int | None = None, max_long_len: int | None = None,
         precision: str = "amp_bf16", grad_checkpointing: bool = False, accum_freq: int = 1, world_size: int = 1,
         ar: bool = True, gpu_memory: int | str | None = None, **overrides: Any) -> MemoryPlan:
    """Memory per GPU of a ``vladva-train`` run of ``model`` (a registered name), planned on the meta device.

    Args:
        model: registered ``vladva-*`` name; ``overrides`` are create_model keywords (``base_model=`` a local
            directory adopts its config.json, ``lora_r=``, prompt modes...).
        batch_size: per-GPU micro-batch (``--batch-size``).
        max_short_len, max_long_len: caption tokens (default: the model's).
        precision: ``--precision`` (decides the base's dtype).
        grad_checkpointing, accum_freq, world_size: the run's settings.
        ar: the next-token loss is on (``--ar-weight`` > 0 and not ``--text-pairs``).
        gpu_memory: bytes or a size such as ``"80GB"``: also say whether it fits and the largest batch that does.

    Returns:
        :class:`MemoryPlan` (``render()`` for the table).
    """
    request = PlanRequest(model=model, batch_size=batch_size, max_short_len=max_short_len,
                          max_long_len=max_long_len, precision=precision, grad_checkpointing=grad_checkpointing,
                          accum_freq=accum_freq, world_size=world_size, ar=ar, overrides=overrides)
    request.check()
    memory = parse_size(gpu_memory) if isinstance(gpu_memory, str) else gpu_memory
    built = build_meta_model(request)
    return plan_model(built, request, memory)


def flops_per_step(model: nn.Module, request: PlanRequest) -> dict[str, float]:
    """FLOPs of one optimizer step per GPU (forward, backward and checkpoint recompute of the language-model
    passes; ``torch.utils.flop_counter`` on meta tensors), split into the image+AR pass, the text pass and the
    accumulation caching pass (image tower without caption + text tower, forward only)."""
    from torch.utils.flop_counter import FlopCounterMode

    short_len = int(request.max_short_len or model.cfg.max_short_len)
    long_len = int(request.max_long_len or model.cfg.max_long_len)
    image_seq, text_seq = sequence_lengths(model, short_len, long_len, request.ar)
    image_only, _ = sequence_lengths(model, short_len, long_len, False)
    lm = model.language_model
    b = request.batch_size

    def count(seq: int, backward: bool) -> float:
        embeds = torch.empty(b, seq, model.embed_dim, device="meta", dtype=model.base_dtype, requires_grad=True)
        with FlopCounterMode(display=False) as counter, torch.enable_grad():
            out = lm(inputs_embeds=embeds, attention_mask=_meta_causal_mask(b, seq), use_cache=False).last_hidden_state
            if backward:
                out.backward(torch.empty_like(out))
        return float(counter.get_total_flops())

    recompute = 1.0 if request.grad_checkpointing else 0.0
    fwd_img, fwd_txt = count(image_seq, False), count(text_seq, False)
    train_img, train_txt = count(image_seq, True), count(text_seq, True)
    vocab = int(model.backbone.lm_head(model.lvlm).weight.shape[0])
    ar_head = 2.0 * 2 * b * (long_len + 1) * model.embed_dim * vocab if request.ar else 0.0  # logits + d/dhidden
    step = request.accum_freq * (train_img + train_txt + recompute * (fwd_img + fwd_txt) + ar_head)
    caching = request.accum_freq * (count(image_only, False) + fwd_txt) if request.accum_freq > 1 else 0.0
    return {"image_ar_pass": train_img + recompute * fwd_img + ar_head, "text_pass": train_txt + recompute * fwd_txt,
            "caching_pass": caching, "step": step + caching}


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def device_memory(device: torch.device | str | None = None) -> int | None:
    """Total memory of a CUDA device in bytes, None without CUDA."""
    if not torch.cuda.is_available():
        return None
    device = torch.device(device or "cuda")
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)
