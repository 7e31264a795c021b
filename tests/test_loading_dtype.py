"""The frozen base is created in the requested dtype and never exists in float32, from every entry point.

A ``TorchDispatchMode`` sees every tensor any aten op produces (allocation, random init, casts, copies) while the
model is built; no float32 tensor may have the shape of a base weight. The control case (build in float32, then
cast, as the code once did) shows the check catches exactly that.
"""
import pytest
import torch
from _helpers_layouts import write_hub_checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import vladva_openclip  # noqa: F401  (registers the VladVA names with open_clip)

TINY = "vladva-tiny-llava"


class Float32Shapes(TorchDispatchMode):
    """Records the shape of every float32 tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.shapes: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.dim() >= 2:
                self.shapes.add(tuple(t.shape))
        return out


def _base_weight_shapes(model) -> set[tuple[int, ...]]:
    """Shapes of the base's matrices (LoRA excluded); they must not coincide with a trainable tensor's shape."""
    base = {tuple(p.shape) for n, p in model.lvlm.named_parameters() if "lora_" not in n and p.dim() >= 2}
    trainable = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    assert not base & trainable, "pick sizes where base and trainable shapes differ, or the check is blind"
    return base


def _assert_base_dtype(model, dtype) -> None:
    for name, p in model.lvlm.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in name else dtype), name
    for name, b in model.lvlm.named_buffers():
        # Rotary inverse frequencies are float32 by design in transformers (also in its own from_pretrained).
        if b.is_floating_point() and "inv_freq" not in name:
            assert b.dtype == dtype, name


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    """The tiny LLaVA written as a bf16 hub checkpoint (legacy keys, 2 shards + index) with its tokenizer."""
    from vladva_openclip.registry import get_vladva_config

    hf_config = get_vladva_config(TINY)["vladva_cfg"]["hf_config"]
    return write_hub_checkpoint(hf_config, tmp_path_factory.mktemp("bf16") / "base", torch.bfloat16)


def test_the_check_catches_a_float32_copy():
    """Control: building in float32 and casting afterwards is seen."""
    import open_clip

    model = open_clip.create_model(TINY, precision="bf16")
    backbone = model.backbone
    with Float32Shapes() as rec:
        backbone.build_random(model.cfg.hf_config, torch.float32).to(torch.bfloat16)
    assert _base_weight_shapes(model) <= rec.shapes


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("amp_bf16", torch.bfloat16),
                                              ("pure_fp16", torch.float16)])
def test_create_model_loads_a_checkpoint_straight_in_dtype(bf16_dir, precision, dtype):
    import open_clip

    with Float32Shapes() as rec:
        model = open_clip.create_model(TINY, base_model=str(bf16_dir), precision=precision)
    _assert_base_dtype(model, dtype)
    assert not _base_weight_shapes(model) & rec.shapes, sorted(_base_weight_shapes(model) & rec.shapes)
    # the weights are the checkpoint's, not a random init
    from safetensors.torch import load_file

    files = {}
    for shard in sorted(bf16_dir.glob("model-*.safetensors")):
        files.update(load_file(str(shard)))
    assert torch.equal(model.embedding.weight, files["language_model.model.embed_tokens.weight"].to(dtype))


def test_create_model_random_init_straight_in_dtype():
    import open_clip

    with Float32Shapes() as rec:
        model = open_clip.create_model(TINY, precision="pure_bf16")
    _assert_base_dtype(model, torch.bfloat16)
    assert not _base_weight_shapes(model) & rec.shapes
    # seeded: the same model on every call
    again = open_clip.create_model(TINY, precision="pure_bf16")
    assert torch.equal(model.embedding.weight, again.embedding.weight)


def test_vladva_eval_amp_bf16_builds_a_bf16_base():
    """``vladva-eval --precision amp_bf16`` goes through eval.api.load_model: the base is bf16 from the start."""
    from vladva_openclip.eval.api import load_model, parse_model_spec

    with Float32Shapes() as rec:
        model, _, _ = load_model(parse_model_spec(TINY), precision="amp_bf16")
    _assert_base_dtype(model, torch.bfloat16)
    assert not _base_weight_shapes(model) & rec.shapes


def test_clip_benchmark_loader_builds_vladva_in_the_wrapper_precision():
    pytest.importorskip("clip_benchmark", reason="clip-benchmark not installed (pip install 'vladva_openclip[bench]')")
    from clip_benchmark.models import TYPE2FUNC

    from vladva_openclip.eval.clip_benchmark import parse_wrapper_args, vladva_loader

    opts, rest = parse_wrapper_args(["--precision", "bf16", "--model-config-dir=d", "eval", "--precision", "x"])
    assert (opts.precision, opts.model_config_dirs, rest) == ("bf16", ["d"], ["eval", "--precision", "x"])
    with Float32Shapes() as rec:
        model, transform, tokenizer = vladva_loader(TYPE2FUNC["open_clip"], "bf16")(TINY, None, device="cpu")
    _assert_base_dtype(model, torch.bfloat16)
    assert not _base_weight_shapes(model) & rec.shapes
    assert callable(transform) and tokenizer(["a cat"]).dtype == torch.long
    auto, _, _ = vladva_loader(TYPE2FUNC["open_clip"], "auto")(TINY, None, device="cpu")
    _assert_base_dtype(auto, torch.float32)  # auto: fp32 on the CPU, bf16 on CUDA
    with pytest.raises(SystemExit, match="--precision must be one of"):
        parse_wrapper_args(["--precision", "int8", "eval"])


def test_cuda_device_loads_straight_onto_it(bf16_dir, monkeypatch):
    """Each torchrun rank passes its own device: from_pretrained gets device_map={"": that device} (weights go
    from the memory-mapped files straight to the GPU; no host copy per rank). Checked without a GPU by
    intercepting from_pretrained's arguments."""
    from transformers import LlavaForConditionalGeneration

    from vladva_openclip.backbones import get_backbone

    seen = {}

    def fake_from_pretrained(source, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", staticmethod(fake_from_pretrained))
    with pytest.raises(Exception, match="stop here"):
        get_backbone("llava").load_pretrained(str(bf16_dir), torch.bfloat16, device=torch.device("cuda", 1))
    assert seen["device_map"] == {"": torch.device("cuda", 1)} and seen["dtype"] == torch.bfloat16
    seen.clear()
    with pytest.raises(Exception, match="stop here"):
        get_backbone("llava").load_pretrained(str(bf16_dir), torch.bfloat16, device=torch.device("cpu"))
    assert "device_map" not in seen
