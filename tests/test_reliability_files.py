"""Files the project writes get the permissions the user's umask asks for (issue 16): temporary names made with
mkstemp/mkdtemp (0600/0700) must not leak into the final adapter directories and cache files."""
import os
import stat

import pytest
import torch


@pytest.fixture(params=[0o022, 0o002])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_cache_files_respect_umask(tmp_path, umask):
    from vladva_openclip.eval.cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path / "cache")
    cache.put("model", "images", "data", torch.ones(3, 4), {"n": "3"})
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 1
    assert _mode(files[0]) == 0o666 & ~umask
    assert _mode(files[0].parent) == 0o777 & ~umask
    torch.testing.assert_close(cache.get("model", "images", "data", 3), torch.ones(3, 4))
    assert not [p for p in files[0].parent.iterdir() if p.suffix == ".tmp"]


def test_adapter_directories_respect_umask(tmp_path, umask):
    import open_clip

    from vladva_openclip.adapters import save_adapter, save_base

    model = open_clip.create_model("vladva-tiny-llava")
    for saved in (save_adapter(model, tmp_path / "adapter"), save_adapter(model, tmp_path / "adapter"),
                  save_base(model, tmp_path / "base")):  # the second save replaces the first in place
        assert _mode(saved) == 0o777 & ~umask, saved
        for f in saved.iterdir():
            assert _mode(f) == 0o666 & ~umask, f
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
