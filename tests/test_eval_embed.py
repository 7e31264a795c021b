"""Embedder: order, de-duplication, length bucketing, precision, and the safetensors embedding cache."""
import pytest
import torch
from _helpers_eval import (
    TINY_CLIP,
    TableModel,
    TableTokenizer,
    fixture_tiny_clip,  # noqa: F401  (fixtures)
    fixture_tiny_clip_config_dir,  # noqa: F401
    id_image,
    save_images,
    to_tensor,
)
from safetensors.torch import load_file

from vladva_openclip.eval import cache as C
from vladva_openclip.eval.embed import EmbedConfig, Embedder, length_buckets
from vladva_openclip.eval.images import ImageSet


def test_length_buckets_longest_first_and_complete():
    texts = ["bb", "a", "dddd", "ccc", "e", "ffffff"]
    buckets = length_buckets(texts, 4)
    assert buckets == [[5, 2, 3, 0], [1, 4]]
    assert sorted(i for b in buckets for i in b) == list(range(6))


def _table(n_text=6, n_img=4, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = [f"text number {'x' * i}" for i in range(n_text)]
    return TableModel(torch.randn(n_img, dim, generator=gen), torch.randn(n_text, dim, generator=gen)), vocab


def test_texts_order_dedup_and_bucketing():
    model, vocab = _table()
    emb = Embedder(model, to_tensor, TableTokenizer(vocab), EmbedConfig(batch_size=2, progress=False))
    query = [vocab[3], vocab[0], vocab[3], vocab[5], vocab[1]]
    out = emb.texts(query)
    expect = torch.nn.functional.normalize(model.text_table[[3, 0, 3, 5, 1]], dim=-1)
    torch.testing.assert_close(out, expect)
    assert out.dtype == torch.float32
    calls = model.text_calls
    assert sorted(i for c in calls for i in c) == [0, 1, 3, 5]  # the duplicate is embedded once
    assert calls == [[5, 3], [1, 0]]  # longest strings first, two per batch


def test_images_match_direct_encoding_and_batch_size(tiny_clip, tmp_path):
    model, preprocess, tokenizer = tiny_clip
    paths = save_images(tmp_path, [id_image(i) for i in range(5)], [f"{i}.png" for i in range(5)])
    images = ImageSet.from_paths(paths)
    with torch.no_grad():
        direct = model.encode_image(torch.stack([preprocess(images.load(i)) for i in range(5)]), normalize=True)
    for bs in (1, 2, 64):
        out = Embedder(model, preprocess, tokenizer, EmbedConfig(batch_size=bs, progress=False)).images(images)
        torch.testing.assert_close(out, direct, atol=1e-5, rtol=1e-5)
    texts = ["a cat", "a much longer caption about a dog", "x"]
    with torch.no_grad():
        direct_t = model.encode_text(tokenizer(texts), normalize=True)
    out_t = Embedder(model, preprocess, tokenizer, EmbedConfig(batch_size=2, progress=False)).texts(texts)
    torch.testing.assert_close(out_t, direct_t, atol=1e-5, rtol=1e-5)


def test_autocast_precision_runs_and_stays_close(tiny_clip):
    model, preprocess, tokenizer = tiny_clip
    texts = ["a cat", "a red car on a road"]
    ref = Embedder(model, preprocess, tokenizer, EmbedConfig(progress=False)).texts(texts)
    low = Embedder(model, preprocess, tokenizer, EmbedConfig(precision="amp_bf16", progress=False)).texts(texts)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, atol=5e-2, rtol=0)
    with pytest.raises(ValueError, match="unknown precision"):
        EmbedConfig(precision="fp8")


def test_cache_hit_skips_model_and_is_safetensors(tmp_path):
    model, vocab = _table()
    cfg = EmbedConfig(batch_size=4, cache_dir=str(tmp_path / "cache"), progress=False)
    first = Embedder(model, to_tensor, TableTokenizer(vocab), cfg, model_id="table").texts(vocab[:4])
    n_calls = len(model.text_calls)
    again = Embedder(model, to_tensor, TableTokenizer(vocab), cfg, model_id="table").texts(vocab[:4])
    assert len(model.text_calls) == n_calls  # served from disk
    torch.testing.assert_close(again, first)
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 1 and load_file(str(files[0]))["embeddings"].shape == (4, 5)
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    # other data -> other entry; other weights -> other model key
    Embedder(model, to_tensor, TableTokenizer(vocab), cfg, model_id="table").texts(vocab[1:5])
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    with torch.no_grad():
        model.text_table[0, 0] += 1.0
    changed = Embedder(model, to_tensor, TableTokenizer(vocab), cfg, model_id="table").texts(vocab[:4])
    assert len(model.text_calls) > n_calls + 1
    assert not torch.allclose(changed[0], first[0])


def test_cache_key_covers_images_preprocess_and_corrupt_files(tmp_path):
    model, vocab = _table()
    paths = save_images(tmp_path / "img", [id_image(i) for i in range(3)], ["0.png", "1.png", "2.png"])
    cfg = EmbedConfig(batch_size=2, cache_dir=str(tmp_path / "cache"), progress=False)
    e1 = Embedder(model, to_tensor, TableTokenizer(vocab), cfg)
    e2 = Embedder(model, lambda im: to_tensor(im) * 1.0, TableTokenizer(vocab), cfg)  # a different transform
    assert e1.model_key != e2.model_key
    out = e1.images(ImageSet.from_paths(paths))
    torch.testing.assert_close(out, torch.nn.functional.normalize(model.image_table[:3], dim=-1))
    (f,) = list((tmp_path / "cache").rglob("*.safetensors"))
    f.write_bytes(b"garbage")
    again = Embedder(model, to_tensor, TableTokenizer(vocab), cfg).images(ImageSet.from_paths(paths))
    torch.testing.assert_close(again, out)  # recomputed, not crashed
    assert load_file(str(f))["embeddings"].shape == (3, 5)  # and rewritten


def test_weights_fingerprint_full_and_sampled(monkeypatch):
    lin = torch.nn.Linear(300, 300)
    base = C.weights_fingerprint(lin)
    with torch.no_grad():
        lin.bias[7] += 1e-3
    assert C.weights_fingerprint(lin) != base
    monkeypatch.setattr(C, "FULL_HASH_NUMEL", 1000)  # the 90,000-element weight is now sampled
    monkeypatch.setattr(C, "SAMPLE_NUMEL", 100)
    sampled = C.weights_fingerprint(lin)
    with torch.no_grad():
        lin.weight.view(-1)[900] += 1.0  # index 900 is on the 900-element stride
    assert C.weights_fingerprint(lin) != sampled
    bf16 = torch.nn.Linear(4, 4).to(torch.bfloat16)
    assert len(C.weights_fingerprint(bf16)) == 32


def test_worker_processes_and_cast_weights_precision(tiny_clip, tiny_clip_config_dir, tmp_path):
    import open_clip

    model, preprocess, tokenizer = tiny_clip
    paths = save_images(tmp_path, [id_image(i) for i in range(6)], [f"{i}.png" for i in range(6)])
    images = ImageSet.from_paths(paths)
    ref = Embedder(model, preprocess, tokenizer, EmbedConfig(batch_size=4, progress=False)).images(images)
    two = Embedder(model, preprocess, tokenizer, EmbedConfig(batch_size=4, num_workers=2, progress=False))
    torch.testing.assert_close(two.images(images), ref)
    # weights cast by open_clip (precision="bf16"): images must be cast to match, outputs still fp32
    low = open_clip.create_model(TINY_CLIP, precision="bf16")
    low.load_state_dict(model.state_dict())
    out = Embedder(low.eval(), preprocess, tokenizer, EmbedConfig(precision="bf16", progress=False)).images(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=0)
