"""Shared fixtures. TRITON_INTERPRET must be set before anything imports triton, so it is set here first."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY = ["vladva-tiny-llava", "vladva-tiny-qwen2vl", "vladva-tiny-qwen25vl", "vladva-tiny-qwen3vl"]


def perturb_trainables(model, seed: int = 0, scale: float = 0.05) -> None:
    """Give LoRA B (zero at init), soft prompts and logit_scale non-trivial values so adapters change outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_state_dict().items():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


@pytest.fixture(params=TINY)
def tiny_name(request) -> str:
    return request.param


@pytest.fixture
def tiny(tiny_name):
    """(model, preprocess_val, tokenizer) of a tiny VladVA model, built through open_clip's own API."""
    import open_clip

    import vladva_openclip  # noqa: F401

    model, _, preprocess = open_clip.create_model_and_transforms(tiny_name)
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(tiny_name)


@pytest.fixture(autouse=True)
def _logging_handlers_restored():
    """Remove logging handlers a test leaves behind (a CLI's basicConfig run in-process binds one to pytest's
    captured stderr; once that stream closes, every later log record prints a "Logging error" traceback)."""
    import logging

    def snapshot():
        loggers = [logging.getLogger()] + [lg for lg in logging.root.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        return {id(lg): (lg, list(lg.handlers), lg.level) for lg in loggers}

    before = snapshot()
    yield
    for key, (lg, handlers, level) in snapshot().items():
        kept, old_level = (before[key][1], before[key][2]) if key in before else ([], lg.level)
        for h in lg.handlers[:]:
            if h not in kept:
                lg.removeHandler(h)
        lg.setLevel(old_level)
