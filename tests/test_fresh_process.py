"""Guards for the ways a new user starts the package, each in a fresh Python process: the repo root on sys.path
(``python -c``, ``python -m``, a notebook in the clone), torch.hub from another folder, torch.hub from a plain copy of
the repo that is not installed (what ``source="github"`` downloads), and the README's own Python blocks.

A test process that has already imported transformers cannot show these breaks (the issue-20 class: a repo folder
shadowing an installed distribution), hence the subprocesses.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but what a user would have
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout[-3000:]}\n" \
                                   f"stderr:\n{result.stderr[-5000:]}"
    return result.stdout


def readme_blocks(fence: str) -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return re.findall(rf"^```{fence}\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_repo_root_does_not_shadow_installed_distributions():
    """From the repo root, Hugging Face's ``kernels`` (transformers >= 5.25 imports it) is the installed one, and
    no top-level folder of the repo is an importable package that an installed distribution could be."""
    code = textwrap.dedent("""
        import importlib.metadata as md, importlib.util, json, sys
        import transformers.integrations.hub_kernels  # fails with 'cannot import name CUDAProperties' if shadowed
        import vladva_openclip, vladva_openclip.kernels as k
        spec = importlib.util.find_spec("kernels")
        try:
            md.version("kernels")
            installed = True
        except md.PackageNotFoundError:
            installed = False
        print(json.dumps({"installed": installed, "origin": spec.origin if spec else None,
                          "ours": k.__file__}))
    """)
    out = json.loads(ok(run_python(code, cwd=REPO)).strip().splitlines()[-1])
    assert out["ours"] == str(REPO / "kernels" / "vladva_kernels" / "__init__.py")
    if out["installed"]:
        assert out["origin"] and not out["origin"].startswith(str(REPO / "kernels")), out
    # the rule behind it: a repo-root folder that is a regular package takes an import name; only ours may
    packages = sorted(p.name for p in REPO.iterdir() if (p / "__init__.py").is_file())
    assert set(packages) <= {"benchmarks", "tests", "vladva_openclip"}, packages
    assert not (REPO / "kernels" / "__init__.py").exists()


@pytest.mark.slow
def test_readme_python_blocks_run_from_the_repo_root(tmp_path):
    """Every ```python block of the README runs, in order, in one fresh process started in the repo root (the
    root stays first on sys.path, as with ``python -c`` or a notebook there; files land in a temporary folder).
    Blocks that need real weights or stand for placeholders are fenced ```py and must name a real model."""
    blocks = readme_blocks("python")
    assert len(blocks) >= 2
    for block in readme_blocks("py"):  # nothing runnable may hide behind the other fence
        assert re.search(r"vladva-(llava|qwen)|hf-hub:|rank|/path/to", block), block
    prelude = f"import os, sys\nsys.path[0] = os.getcwd()\nos.chdir({str(tmp_path)!r})\n"
    code = prelude + "\n".join(b.replace('"path/to/repo"', repr(str(REPO))) for b in blocks)
    code += textwrap.dedent("""
        import vladva_openclip.kernels as _k
        assert _k.__file__.startswith(sys.path[0]), _k.__file__
        print("probs", tuple(probs.shape), "captions", len(captions), type(model).__name__)
    """)
    out = ok(run_python(code, cwd=REPO))
    assert "probs (1, 2) captions 1 VladVA" in out


@pytest.mark.slow
def test_torch_hub_from_another_folder(tmp_path):
    """torch.hub on the installed checkout (``source="local"``) from an unrelated current folder: the model, the
    open_clip tuple, the tokenizer."""
    code = textwrap.dedent(f"""
        import torch
        repo = {str(REPO)!r}
        model = torch.hub.load(repo, "vladva_tiny_llava", source="local", pretrained="synth_captioner")
        model_t, _, preprocess = torch.hub.load(repo, "vladva_tiny_llava", source="local", return_transforms=True)
        tok = torch.hub.load(repo, "tokenizer", "vladva-tiny-llava", source="local")
        model.eval()
        with torch.no_grad():
            f = model.encode_text(tok(["a red circle"]), normalize=True)
            g = model.encode_image(torch.zeros(1, 3, 64, 64), normalize=True)
        print(type(model).__name__, type(model_t).__name__, tuple(f.shape), tuple(g.shape))
    """)
    out = ok(run_python(code, cwd=tmp_path))
    assert out.split()[-6:] == ["VladVA", "VladVA", "(1,", "64)", "(1,", "64)"]


def repo_files() -> list[str]:
    """The repo's files as a GitHub archive would hold them: git's tracked and untracked-but-not-ignored files (the
    working tree, so uncommitted edits are tested too), or the package folders when this is not a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=REPO,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
        return [f for f in listed if f and (REPO / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [str(p.relative_to(REPO)) for top in ("vladva_openclip", "kernels") for p in (REPO / top).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts] + ["hubconf.py"]


@pytest.mark.slow
def test_torch_hub_github_source_from_an_archive_with_the_project_not_installed(tmp_path):
    """``torch.hub.list/help/load("owner/repo:main")`` down torch's real GitHub path (download, unzip, run hubconf.py
    from the plain copy), with only the download served from a zip of this repo and the project otherwise made
    unimportable (the editable install's finders removed). The package, kernels included, comes from the copy, and
    imports that happen after torch.hub has taken the copy off sys.path still work."""
    archive = tmp_path / "main.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("vladva_openclip-main/", "")  # GitHub's archives hold one top folder, listed first
        for f in repo_files():
            zf.write(REPO / f, f"vladva_openclip-main/{f}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = textwrap.dedent(f"""
        import importlib, importlib.util, sys
        # forget the installed project: setuptools' editable finders and any path entry into the checkout
        sys.meta_path[:] = [f for f in sys.meta_path  # (setuptools installs its finder class itself)
                            if "__editable__" not in getattr(f, "__module__", "") + type(f).__module__]
        sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
        sys.path[:] = [p for p in sys.path if not p.startswith({str(REPO)!r}) or "site-packages" in p]
        sys.path_importer_cache.clear()
        importlib.invalidate_caches()
        assert importlib.util.find_spec("vladva_openclip") is None, "the project is still importable"
        import torch, torch.hub
        torch.hub._git_archive_link = lambda owner, name, ref: "file://" + {str(archive)!r}  # the only stand-in
        repo = "owner/vladva_openclip:main"
        kw = dict(trust_repo=True, skip_validation=True)
        names = torch.hub.list(repo, **kw)
        assert "vladva_tiny_llava" in names and "vladva_llava7b" in names and "tokenizer" in names, names
        assert "return_transforms" in torch.hub.help(repo, "vladva_tiny_llava", **kw)
        model = torch.hub.load(repo, "vladva_tiny_llava", pretrained="synth_captioner", **kw)
        copy = torch.hub.get_dir() + "/owner_vladva_openclip_main"
        import vladva_openclip, vladva_openclip.kernels as k
        assert vladva_openclip.__file__.startswith(copy), vladva_openclip.__file__
        assert k.__file__.startswith(copy), k.__file__
        assert copy not in sys.path
        from vladva_openclip.eval import metrics  # a submodule first imported after torch.hub returned
        tok = torch.hub.load(repo, "tokenizer", "vladva-tiny-llava", **kw)
        model.eval()
        with torch.no_grad():
            f = model.encode_text(tok(["a blue square"]), normalize=True)
        print("ok", type(model).__name__, tuple(f.shape))
    """)
    out = ok(run_python(code, cwd=elsewhere, env={"TORCH_HOME": str(tmp_path / "torch_home")}))
    assert out.strip().splitlines()[-1] == "ok VladVA (1, 64)"
