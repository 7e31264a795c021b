"""Bad base or tokenizer sources: one clear error each, naming the path (or id) and what to provide."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from _helpers_layouts import write_hub_checkpoint

import vladva_openclip
from vladva_openclip import BaseModelError, WeightsNotFoundError
from vladva_openclip.registry import get_vladva_config
from vladva_openclip.tokenizer import ASSET_TOKENIZERS

TINY = "vladva-tiny-llava"


def _create(**kwargs):
    import open_clip

    return open_clip.create_model(TINY, **kwargs)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    """A complete tiny LLaVA base directory: 2 shards + index, config.json, its tokenizer."""
    hf_config = get_vladva_config(TINY)["vladva_cfg"]["hf_config"]
    path = write_hub_checkpoint(hf_config, tmp_path_factory.mktemp("good") / "base", torch.float32)
    for f in ASSET_TOKENIZERS.joinpath("tiny-llava").iterdir():
        shutil.copy(f, path / f.name)
    return path


@pytest.fixture
def copy_of(good_dir, tmp_path):
    def make(name="base"):
        return shutil.copytree(good_dir, tmp_path / name)
    return make


def test_the_good_directory_loads(good_dir):
    model = _create(base_model=str(good_dir), tokenizer=str(good_dir))
    assert model.tokenizer(["a red circle"]).shape[0] == 1


def test_base_directory_missing(tmp_path):
    missing = tmp_path / "no_such_base"
    with pytest.raises(WeightsNotFoundError, match="does not exist") as info:
        _create(base_model=str(missing))
    assert str(missing) in str(info.value) and "save_pretrained" in str(info.value)


def test_base_directory_without_weights(copy_of):
    path = copy_of()
    for f in path.glob("model*"):
        f.unlink()
    with pytest.raises(WeightsNotFoundError, match="no weights") as info:
        _create(base_model=str(path))
    msg = str(info.value)
    assert str(path) in msg and "model.safetensors" in msg and "config.json" in msg
    # The architecture alone is still available without weights.
    assert _create(base_model=str(path), device="meta").lvlm.config.get_text_config().hidden_size == 64


def test_base_directory_without_config(copy_of):
    path = copy_of()
    (path / "config.json").unlink()
    with pytest.raises(WeightsNotFoundError, match="no config.json") as info:
        _create(base_model=str(path))
    assert str(path) in str(info.value)


def test_base_directory_missing_a_shard(copy_of):
    path = copy_of()
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsNotFoundError, match="model-00002-of-00002.safetensors") as info:
        _create(base_model=str(path))
    assert "incomplete" in str(info.value) and str(path) in str(info.value)


def test_corrupt_config_json(copy_of):
    path = copy_of()
    (path / "config.json").write_text('{"model_type": "llava", ')
    with pytest.raises(BaseModelError, match="config.json") as info:
        _create(base_model=str(path))
    assert str(path / "config.json") in str(info.value)


def test_corrupt_weight_shard(copy_of):
    path = copy_of()
    (path / "model-00001-of-00002.safetensors").write_bytes(b"\x00garbage" * 64)
    with pytest.raises(BaseModelError) as info:
        _create(base_model=str(path))
    msg = str(info.value)
    assert str(path) in msg and "checkpoint" in msg


def test_checkpoint_lacking_weights_is_an_error_not_a_random_init(copy_of):
    """transformers fills absent weights randomly and only warns; for a frozen base that is an error."""
    from safetensors.torch import load_file, save_file

    path = copy_of()
    shard = path / "model-00001-of-00002.safetensors"
    tensors = load_file(str(shard))
    dropped = min(tensors)
    del tensors[dropped]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((path / "model.safetensors.index.json").read_text())
    del index["weight_map"][dropped]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BaseModelError, match="lacks 1 weight") as info:
        _create(base_model=str(path))
    assert str(path) in str(info.value)


def test_checkpoint_of_another_family(copy_of):
    import open_clip

    path = copy_of()
    with pytest.raises(BaseModelError) as info:
        open_clip.create_model("vladva-tiny-qwen2vl", base_model=str(path))
    msg = str(info.value)
    assert str(path) in msg and "'llava'" in msg and "vladva-tiny-llava" in msg and "qwen2vl" in msg


def test_tokenizer_directory_missing(tmp_path):
    missing = tmp_path / "no_tokenizer"
    with pytest.raises(WeightsNotFoundError, match="does not exist") as info:
        _create(tokenizer=str(missing))
    assert str(missing) in str(info.value) and "tokenizer.json" in str(info.value)


def test_tokenizer_directory_without_tokenizer_files(tmp_path):
    path = tmp_path / "tok"
    path.mkdir()
    (path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(WeightsNotFoundError, match="holds no tokenizer files") as info:
        _create(tokenizer=str(path))
    assert str(path) in str(info.value)


def test_corrupt_tokenizer(tmp_path):
    path = shutil.copytree(ASSET_TOKENIZERS / "tiny-llava", tmp_path / "tok")
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')
    with pytest.raises(BaseModelError, match="cannot be loaded") as info:
        _create(tokenizer=str(path))
    assert str(path) in str(info.value) and "copy the base model's tokenizer files" in str(info.value)


def test_hub_error_keeps_its_real_cause(tmp_path, monkeypatch):
    """Not every hub failure is a cache miss: the message carries the hub's own reason."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError) as info:  # a cache miss, offline: said so, with the cause
        _create(base_model="some-org/some-lvlm")
    msg = str(info.value)
    assert "not in the local Hugging Face cache" in msg and "LocalEntryNotFoundError" in msg
    with pytest.raises(WeightsNotFoundError) as info:  # not a cache miss: no claim about the cache, the reason
        _create(base_model="not a valid repo id!")
    msg = str(info.value)
    assert "not in the local" not in msg and "HFValidationError" in msg and "'not a valid repo id!'" in msg
    with pytest.raises(WeightsNotFoundError) as info:  # tokenizers from the hub too
        _create(tokenizer="some-org/some-tokenizer")
    assert "LocalEntryNotFoundError" in str(info.value)


def test_errors_are_exported():
    assert issubclass(vladva_openclip.BaseModelError, ValueError)
    assert issubclass(vladva_openclip.WeightsNotFoundError, FileNotFoundError)


def _into_hub_cache(cache: Path, repo_id: str, src: Path) -> None:
    """Lay ``src`` out as the Hugging Face cache holds a downloaded snapshot of ``repo_id``."""
    revision = "0" * 40
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_hub_id_from_the_local_cache(good_dir, tmp_path, monkeypatch):
    """A hub id found in the cache (offline) loads, and its config is the architecture; another family in the
    cache under the id is the same clear error as for a directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    _into_hub_cache(cache, "some-org/tiny-llava", good_dir)
    model = _create(base_model="some-org/tiny-llava", cache_dir=str(cache))
    assert model.cfg.hf_config["text_config"]["hidden_size"] == 64 and model.cfg.image_size == 64
    qwen = get_vladva_config("vladva-tiny-qwen2vl")["vladva_cfg"]["hf_config"]
    _into_hub_cache(cache, "some-org/tiny-qwen", write_hub_checkpoint(qwen, tmp_path / "q", torch.float32))
    with pytest.raises(BaseModelError) as info:
        _create(base_model="some-org/tiny-qwen", cache_dir=str(cache))
    assert "some-org/tiny-qwen" in str(info.value) and "'qwen2_vl'" in str(info.value)


def test_get_tokenizer_takes_the_tokenizer_or_base_directory(good_dir):
    import open_clip

    for kwargs in ({"tokenizer": str(good_dir)}, {"base_model": str(good_dir)}):
        tok = open_clip.get_tokenizer("vladva-llava7b", **kwargs)
        assert tok(["a red circle"]).shape == (1, 77)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        open_clip.get_tokenizer("vladva-llava7b", tokenizer=str(good_dir / "missing"))
    with pytest.raises(TypeError, match="unexpected arguments"):
        open_clip.get_tokenizer("vladva-tiny-llava", no_such_option=1)


def test_config_without_model_type(copy_of):
    path = copy_of()
    config = json.loads((path / "config.json").read_text())
    del config["model_type"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match="names no model_type") as info:
        _create(base_model=str(path))
    assert str(path) in str(info.value)
