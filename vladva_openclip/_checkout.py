"""Make ``vladva_openclip.kernels`` importable from a checkout exactly as it is, installed or not.

The kernel code lives at the repo's top level in ``kernels/vladva_kernels/`` (the design's ``kernels/`` folder).
``pip install`` maps that folder to ``vladva_openclip.kernels``; a plain copy of the repo has no such mapping.
torch.hub runs ``hubconf.py`` from exactly such a copy (``source="github"`` downloads an archive and never installs
it), so without this module ``import vladva_openclip`` would fail there.

Why not a top-level ``kernels`` package: Hugging Face's ``kernels`` distribution (imported by transformers >= 5.25)
has that import name, and a ``kernels/__init__.py`` at the repo root shadows it whenever the root is on sys.path
(``python -c``, ``python -m``, notebooks, torch.hub). ``kernels/`` therefore has no ``__init__.py``; it is at most a
namespace-package portion, which never wins over an installed regular package. Nothing is added to sys.path.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

#: where the kernel package sits, relative to the checkout's root
KERNELS_DIR = Path("kernels") / "vladva_kernels"


def attach_kernels(package: str) -> None:
    """Register ``<package>.kernels`` from the checkout's ``kernels/vladva_kernels/`` if the checkout has one.

    The checkout beside this very file wins over an installed mapping, so a second worktree run with another
    worktree's editable install still gets its own kernels. An installed wheel (no checkout beside it) imports its
    own ``vladva_openclip/kernels/`` subpackage the normal way, as does anything already imported.
    """
    name = f"{package}.kernels"
    if name in sys.modules:
        return
    here = Path(__file__).resolve().parent
    source = here.parent / KERNELS_DIR
    if not (source / "__init__.py").is_file() or (here / "kernels" / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(name, source / "__init__.py",
                                                  submodule_search_locations=[str(source)])
    if spec is None or spec.loader is None:  # pragma: no cover - spec_from_file_location on a .py file never fails
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    setattr(sys.modules[package], "kernels", module)
