"""``vladva plan``: the planner's saved-tensor bytes against autograd's, measured through the real forward of
real-layout shrunk models (llava-hf and Qwen2-VL config layouts, real tokenizers) at several widths and depths;
the totals and the largest batch; the CLI."""
import json
import subprocess
import sys

import pytest
import torch
from _helpers_layouts import llava_config_json, needs_real_tokenizers, qwen2vl_config_json, unpack_tokenizer

NAMES = {"llava": "vladva-llava7b", "qwen2vl": "vladva-qwen2vl2b"}


def _base_dir(tmp_path, family, hidden, layers):
    """A base directory holding only the architecture (config.json) and the real tokenizer: enough for a
    random-weight build (load_weights=False) and for a meta build."""
    dest = tmp_path / f"{family}-{hidden}-{layers}"
    config = (llava_config_json(hidden=hidden, layers=layers) if family == "llava"
              else qwen2vl_config_json(hidden=hidden, layers=layers))
    dest.mkdir()
    (dest / "config.json").write_text(json.dumps(config))
    unpack_tokenizer("llava-1.5" if family == "llava" else "qwen2-vl", dest)
    return dest


def _measured_saved_bytes(model, batch, short_len, long_len):
    """Distinct non-parameter storages autograd keeps through one training forward (image + AR pass and text
    pass) of ``batch`` samples whose captions are exactly ``short_len`` / ``long_len`` tokens."""
    from vladva_openclip.plan import SavedTensorCounter

    s = model.cfg.image_size
    gen = torch.Generator().manual_seed(0)
    width = long_len + 1  # one pad column: the long captions are complete (EOS target)
    packed = torch.full((batch, 2, width), model.pad_token_id, dtype=torch.long)
    packed[:, 0, :short_len] = torch.randint(300, 3000, (batch, short_len), generator=gen)
    packed[:, 1, :long_len] = torch.randint(300, 3000, (batch, long_len), generator=gen)
    images = torch.randn(batch, 3, s, s, generator=gen)
    model.train()
    counter = SavedTensorCounter(model)
    with counter.active():
        out = model(images, packed)
    assert out["ar_nll_sum"].requires_grad and out["text_features"].requires_grad
    return counter.total


@needs_real_tokenizers
@pytest.mark.slow
@pytest.mark.parametrize("family,hidden,layers", [
    ("llava", 64, 1), ("llava", 128, 2), ("llava", 256, 3), ("qwen2vl", 64, 3)])
def test_planned_saved_bytes_match_autograd_within_15_percent(tmp_path, family, hidden, layers):
    from vladva_openclip.factory import create_vladva
    from vladva_openclip.plan import PlanRequest, build_meta_model, plan_model

    base = _base_dir(tmp_path, family, hidden, layers)
    batch, short_len, long_len = 2, 12, 40
    real = create_vladva(NAMES[family], precision="fp32", base_model=str(base), load_weights=False)
    measured = _measured_saved_bytes(real, batch, short_len, long_len)
    request = PlanRequest(model=NAMES[family], batch_size=batch, max_short_len=short_len, max_long_len=long_len,
                          precision="fp32", overrides={"base_model": str(base)})
    planned = plan_model(build_meta_model(request), request)
    saved = planned.saved_image_pass_bytes + planned.saved_text_pass_bytes + planned.ar_saved_bytes
    print(f"{family} H={hidden} L={layers}: planned {saved} measured {measured} ratio {saved / measured:.4f}")
    assert abs(saved - measured) / measured < 0.15, (saved, measured)
    # the plan counts what the real model holds, not a generic guess: the layers' part dominates
    assert planned.base_params == sum(p.numel() for p in real.parameters() if not p.requires_grad)
    assert planned.trainable_params == sum(p.numel() for p in real.parameters() if p.requires_grad)


def test_plan_scales_with_batch_checkpointing_and_finds_the_largest_batch():
    from vladva_openclip.plan import GiB, plan

    small = plan("vladva-tiny-llava", 4, precision="fp32")
    big = plan("vladva-tiny-llava", 8, precision="fp32")
    fixed = small.weights_bytes + small.grads_bytes + small.optimizer_bytes
    assert big.saved_image_pass_bytes == 2 * small.saved_image_pass_bytes
    ckpt = plan("vladva-tiny-llava", 8, precision="fp32", grad_checkpointing=True)
    assert ckpt.saved_image_pass_bytes < big.saved_image_pass_bytes / 2
    assert ckpt.total_bytes < big.total_bytes and ckpt.weights_bytes == big.weights_bytes
    budget = fixed + 20 * (big.total_bytes - small.total_bytes) / 4  # room for about 20 samples
    fitted = plan("vladva-tiny-llava", 8, precision="fp32", gpu_memory=int(budget / 0.9))
    assert fitted.fits and fitted.max_batch_size > 8
    at_max = plan("vladva-tiny-llava", fitted.max_batch_size, precision="fp32")
    over = plan("vladva-tiny-llava", fitted.max_batch_size + 1, precision="fp32")
    assert at_max.total_bytes <= 0.9 * fitted.gpu_memory_bytes < over.total_bytes
    assert ("GiB" in fitted.render()) and GiB == 1 << 30


def test_7b_plan_without_checkpointing_does_not_fit_80gb_and_with_it_does():
    """The issue's case: LLaVA-1.5-7B, batch 32, 500-token captions, bf16 base."""
    from vladva_openclip.plan import plan

    plain = plan("vladva-llava7b", 32, gpu_memory="80GB")
    assert not plain.fits and plain.total_bytes > 200 * (1 << 30) and 3 <= plain.max_batch_size <= 10
    assert abs(plain.base_params - 7.06e9) < 0.05e9 and plain.weights_bytes < 14.5 * (1 << 30)  # bf16 base
    ckpt = plan("vladva-llava7b", 32, grad_checkpointing=True, gpu_memory="80GB")
    assert ckpt.fits and ckpt.max_batch_size >= 32
    fp32 = plan("vladva-llava7b", 32, grad_checkpointing=True, precision="amp")
    assert fp32.weights_bytes > 1.9 * ckpt.weights_bytes and any("float32" in n for n in fp32.notes)


def test_parse_size():
    from vladva_openclip.plan import parse_size

    assert parse_size("80GB") == parse_size("80G") == parse_size("80GiB") == 80 << 30
    assert parse_size("81920MiB") == 80 << 30 and parse_size("1024") == 1024
    with pytest.raises(ValueError, match="80GB"):
        parse_size("eighty")


def test_plan_cli_prints_the_breakdown_and_refuses_unknown_names():
    cmd = [sys.executable, "-m", "vladva_openclip.cli", "plan"]
    ok = subprocess.run(cmd + ["vladva-tiny-llava", "--batch-size", "4", "--gpu-memory", "1GB", "--json"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["batch_size"] == 4 and report["fits"] and report["max_batch_size"] > 4
    bad = subprocess.run(cmd + ["vladva-nope"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "vladva-nope" in bad.stderr and "vladva-tiny-llava" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
