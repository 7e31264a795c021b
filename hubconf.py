"""torch.hub entry points, one per registered VladVA model (derived from the registry, never listed by hand).

    model = torch.hub.load("<owner/repo or dir>", "vladva_tiny_llava", pretrained="synth_captioner")
    model, preprocess_train, preprocess_val = torch.hub.load(..., "vladva_tiny_llava", return_transforms=True)
    tokenizer = torch.hub.load(..., "tokenizer", "vladva-tiny-llava")

Works from a plain, uninstalled copy of the repo (what ``source="github"`` downloads): the package imports from the
checkout as it is (vladva_openclip/_checkout.py attaches kernels/vladva_kernels as ``vladva_openclip.kernels``).
"""
import os as _os
import sys as _sys

dependencies = ["torch", "open_clip", "transformers", "peft", "safetensors"]

# torch.hub puts the repo on sys.path only while importing this file; the package sits at the repo root.
_here = _os.path.dirname(_os.path.abspath(__file__))
if _here not in _sys.path:
    _sys.path.insert(0, _here)

from vladva_openclip.registry import model_entrypoints as _model_entrypoints  # noqa: E402

globals().update(_model_entrypoints())
