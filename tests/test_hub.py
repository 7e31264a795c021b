"""Adapters on the Hugging Face Hub, offline: push_to_hub (only the upload calls mocked: they write what the Hub
would serve into a Hugging Face cache laid out as huggingface_hub lays it out), then
``create_model("hf-hub:org/repo")`` and ``create_model(name, pretrained="hf-hub:org/repo")`` with HF_HUB_OFFLINE=1;
the model card; ``local-dir:``; a CLIP hub repository still goes to open_clip."""
import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants as hf_constants
import open_clip
import pytest
import torch
from _helpers_eval import TINY_CLIP_CFG
from conftest import perturb_trainables
from safetensors.torch import save_file

import vladva_openclip
from vladva_openclip.eval import Report
from vladva_openclip.model import VladVA

TINY = "vladva-tiny-llava"


def publish_to_cache(cache: Path, repo_id: str, folder: Path) -> str:
    """What a download leaves in the cache: ``models--org--repo/snapshots/<commit>/...`` and ``refs/main``."""
    digest = hashlib.sha1()
    for p in sorted(folder.iterdir()):
        digest.update(p.name.encode() + p.read_bytes())
    commit = digest.hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline (the constants are read at import, so they are patched as well)."""
    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def mocked_upload(hf_cache, monkeypatch):
    """HfApi.create_repo / upload_folder replaced: the uploaded folder becomes the repo's snapshot in the cache."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls.append(("upload_folder", repo_id, {**kwargs, "files": sorted(p.name for p in Path(folder_path).iterdir())}))
        return publish_to_cache(hf_cache, repo_id, Path(folder_path))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


@pytest.fixture
def trained():
    model = open_clip.create_model(TINY)
    perturb_trainables(model, seed=3)
    return model.eval()


def _same(a: VladVA, b: VladVA) -> None:
    sa, sb = a.trainable_state_dict(), b.trainable_state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    images = torch.randn(2, 3, a.cfg.image_size, a.cfg.image_size, generator=torch.Generator().manual_seed(0))
    tokens = open_clip.get_tokenizer(TINY)(["a red circle", "two blue squares"])
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))
        assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))


def _report() -> Report:
    report = Report()
    report.add("mine", {"task": "winoground", "name": "winoground", "metrics": {"text": 41.0, "image": 20.5,
                                                                                "group": 12.25}})
    return report


def test_push_to_hub_and_load_offline(trained, mocked_upload, hf_cache, tmp_path):
    params = tmp_path / "params.txt"
    params.write_text("lr: 0.0001\nbatch_size: 32\nar_weight: 1.0\n")  # open_clip_train's params.txt
    commit = vladva_openclip.push_to_hub(trained, "org/repo", training=params, results=_report(), private=True)
    (create, upload) = mocked_upload
    assert create == ("create_repo", "org/repo", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert upload[1] == "org/repo" and upload[2]["files"] == sorted([
        "README.md", "adapter_config.json", "adapter_model.safetensors", "open_clip_config.json",
        "vladva_adapter.json", "vladva_extras.safetensors"])
    assert (hf_cache / "models--org--repo" / "refs" / "main").read_text() == commit
    assert hf_constants.HF_HUB_OFFLINE

    by_repo = open_clip.create_model("hf-hub:org/repo")
    by_name = open_clip.create_model(TINY, pretrained="hf-hub:org/repo")
    assert isinstance(by_repo, VladVA) and by_repo.model_name == TINY
    _same(trained, by_repo)
    _same(trained, by_name)
    model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:org/repo")
    assert isinstance(model, VladVA) and preprocess is not None
    tok = open_clip.get_tokenizer("hf-hub:org/repo")
    assert torch.equal(tok(["a red circle"]), open_clip.get_tokenizer(TINY)(["a red circle"]))

    card = (hf_cache / "models--org--repo" / "snapshots" / commit / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: open_clip\n") and 'create_model_and_transforms("hf-hub:org/repo")' in card
    assert "| lr | 0.0001 |" in card and "| ar_weight | 1.0 |" in card
    assert "| mine | 20.5 | 41.0 | 12.2 |" in card  # the vladva-eval table (Image, Text, Group), as vladva-eval writes it
    assert f"r={trained.cfg.lora.r}, alpha={trained.cfg.lora.alpha}" in card


def test_missing_repository_offline_is_a_clear_error(hf_cache):
    with pytest.raises(FileNotFoundError, match="hf-hub:org/absent.*cache"):
        open_clip.create_model(TINY, pretrained="hf-hub:org/absent")
    with pytest.raises(RuntimeError, match="org/absent"):  # not a VladVA name: open_clip reports it
        open_clip.create_model("hf-hub:org/absent")


def test_save_adapter_with_model_card_is_the_hub_folder(trained, tmp_path):
    out = tmp_path / "adapter"
    results = tmp_path / "results.json"
    _report().save(tmp_path, stem="results")
    vladva_openclip.save_adapter(trained, out, model_card=True, training={"epochs": 2}, results=results)
    config = json.loads((out / "open_clip_config.json").read_text())
    assert config["vladva"]["model_name"] == TINY and "vladva_cfg" in config["model_cfg"]
    assert config["preprocess_cfg"]["mean"] == list(trained.visual.preprocess_cfg["mean"])
    card = (out / "README.md").read_text()
    assert "## Training flags" in card and "| epochs | 2 |" in card and "| mine | 20.5 | 41.0 |" in card
    _same(trained, open_clip.create_model(f"local-dir:{out}"))
    with pytest.raises(TypeError, match="model_card=True"):
        vladva_openclip.save_adapter(trained, tmp_path / "x", training={"epochs": 2})


def test_a_clip_hub_repository_still_goes_to_open_clip(hf_cache, tmp_path):
    cfg = TINY_CLIP_CFG
    repo = tmp_path / "clip_repo"
    repo.mkdir()
    (repo / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    reference = open_clip.CLIP(**cfg)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(repo / "open_clip_model.safetensors"))
    publish_to_cache(hf_cache, "org/clip", repo)
    model = open_clip.create_model("hf-hub:org/clip")
    assert type(model) is open_clip.CLIP
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_a_vladva_config_naming_no_model_is_an_error(tmp_path):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vladva_cfg": {}}}))
    with pytest.raises(ValueError, match="names no model"):
        open_clip.create_model(f"local-dir:{tmp_path}")
