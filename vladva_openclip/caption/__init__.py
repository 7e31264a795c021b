"""Recaptioning: alt-text shards -> short and long captions that ``vladva-train`` reads (the paper's data step).

Python::

    from vladva_openclip.caption import CaptionJobConfig, run_caption, verify_output
    run_caption(CaptionJobConfig("shards/{00000..00099}.tar", "captions/", hf_model="llava-1.5-7b-hf",
                                 kind="both", only_missing=True, write_wds=True))
    verify_output("captions/")   # every input key exactly once

Command line: ``vladva caption`` (also under torchrun / SLURM). See :mod:`.job` for resuming and sharding,
:mod:`.backends` for the captioners, :mod:`.quality` for the flags, :mod:`.output` for the files.
"""
from .backends import BACKENDS, BackendUnavailable, Captioner, Generation, register_backend
from .config import CaptionJobConfig, GenerationSettings, QualitySettings
from .job import CaptionJobError, plan_row, run_caption
from .prompts import CHAT_FORMATS, PRESETS
from .quality import caption_flags, trim_to_sentence
from .verify import verify_output

__all__ = [
    "BACKENDS", "CHAT_FORMATS", "PRESETS", "BackendUnavailable", "CaptionJobConfig", "CaptionJobError", "Captioner",
    "Generation", "GenerationSettings", "QualitySettings", "caption_flags", "plan_row", "register_backend",
    "run_caption", "trim_to_sentence", "verify_output",
]
