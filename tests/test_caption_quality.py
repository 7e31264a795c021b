"""vladva caption's pure parts: quality flags on crafted strings, sentence trimming, what a row generates, the
prompt presets, and the vLLM backend around a stand-in engine (vLLM itself is not installed here)."""
from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import ClassVar

import pytest

from vladva_openclip.caption.config import GenerationSettings, QualitySettings
from vladva_openclip.caption.job import plan_row
from vladva_openclip.caption.quality import (
    caption_flags,
    finish_caption,
    repeated_ngram_ratio,
    sentences,
    trim_to_sentence,
)

Q = QualitySettings()


def count_words(text: str) -> int:
    """Stand-in target tokenizer for the flag tests: one token per word."""
    return len(text.split())


def test_trim_to_last_full_sentence():
    assert trim_to_sentence("A dog runs. It is brown and") == "A dog runs."
    assert trim_to_sentence('He said "stop." Then the car') == 'He said "stop."'
    assert trim_to_sentence("one long unfinished clause") == "one long unfinished clause"
    assert trim_to_sentence("Version 2.5 of the model is out! And") == "Version 2.5 of the model is out!"
    assert sentences("A b. C d? E") == ["A b.", "C d?", "E"]


def test_flags_on_crafted_strings():
    long_ok = ("A brown dog runs across a green field under a pale sky. In the background there are tall trees and "
               "a red barn with a white door. A child in a yellow coat watches from the fence on the left.")
    assert caption_flags("long", long_ok, "stop", count_words(long_ok), Q) == []
    assert caption_flags("long", "  ... ", "stop", 0, Q) == ["empty"]
    assert "too_short" in caption_flags("long", "A dog.", "stop", 2, Q)
    assert "too_long" in caption_flags("short", long_ok, "stop", count_words(long_ok), Q)
    assert "too_long" in caption_flags("long", long_ok, "stop", 501, Q)
    loop = "the cat sits on the mat " * 12
    flags = caption_flags("long", loop, "length", count_words(loop), Q)
    assert {"repeated_ngrams", "cut", "low_compression"} <= set(flags)
    twice = "A red car is parked. A blue bike leans on it. A red car is parked!"
    assert "repeated_sentence" in caption_flags("long", twice, "stop", 40, Q)
    assert "repeated_sentence" not in caption_flags("long", long_ok, "stop", 40, Q)
    assert "refusal" in caption_flags("short", "I'm sorry, I cannot describe this image.", "stop", 8, Q)
    assert "refusal" in caption_flags("short", "As an AI, I do not see images.", "stop", 8, Q)
    assert "boilerplate" in caption_flags("short", "The image shows a dog on a sofa.", "stop", 8, Q)
    assert "boilerplate" not in caption_flags("short", "A dog on a sofa shows its teeth.", "stop", 8, Q)
    assert repeated_ngram_ratio("a b c d a b c d", 4) == pytest.approx(1 / 5)
    assert repeated_ngram_ratio("a b c", 4) == 0.0


def test_finish_caption_trims_cut_text_and_keeps_flags():
    text, n, flags = finish_caption("long", "A  dog runs.\nIt is brown and", "length", count_words, Q)
    assert text == "A dog runs." and n == 3 and "cut" in flags and "too_short" in flags
    text, n, flags = finish_caption("long", "A dog runs. It is brown and", "stop", count_words, Q)
    assert text == "A dog runs. It is brown and"  # not cut: nothing trimmed


@pytest.mark.parametrize("caption, n, kinds, only_missing, expected", [
    # only_missing: under 30 tokens the alt-text is the short caption, otherwise the long one
    ("a dog", 2, ("long", "short"), True, {"short": (False, "a dog"), "long": (True, None)}),
    ("long alt", 40, ("long", "short"), True, {"short": (True, None), "long": (False, "long alt")}),
    (None, None, ("long", "short"), True, {"short": (True, None), "long": (True, None)}),
    ("long alt", 40, ("long",), True, {"short": (False, None), "long": (False, "long alt")}),
    # without only_missing every asked kind is generated; the alt-text stays the short caption otherwise
    ("long alt", 40, ("long",), False, {"short": (False, "long alt"), "long": (True, None)}),
    ("a dog", 2, ("short",), False, {"short": (True, None), "long": (False, None)}),
])
def test_plan_row(caption, n, kinds, only_missing, expected):
    assert plan_row(caption, n, kinds, only_missing, 30) == expected


def test_prompt_presets_and_formats():
    from vladva_openclip.caption.config import CaptionJobConfig
    from vladva_openclip.caption.prompts import CHAT_FORMATS, PRESETS

    c = CaptionJobConfig("in", "out", long_prompt="detailed", short_prompt="Say it briefly.")
    assert c.instruction("long") == PRESETS["detailed"] and c.instruction("short") == "Say it briefly."
    assert CHAT_FORMATS["llava"]("Q?") == "USER: <image>\nQ? ASSISTANT:"
    assert "<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>" in CHAT_FORMATS["qwen2_vl"]("Q?")
    with pytest.raises(ValueError, match="empty caption prompt"):
        CaptionJobConfig("in", "out", long_prompt=" ")
    with pytest.raises(ValueError, match="kind"):
        CaptionJobConfig("in", "out", kind="medium")


# ---- vLLM around a stand-in engine ---------------------------------------------------------------------------
class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeLLM:
    """Mimics ``vllm.LLM.generate``: one RequestOutput per prompt, in order; the "caption" depends on the image."""

    EOS = 2

    def __init__(self):
        self.calls = []

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append((requests, params, use_tqdm))
        out = []
        for r in requests:
            w, h = r["multi_modal_data"]["image"].size
            budget = params.kwargs["max_tokens"]
            if w > h:  # wide images "stop" at EOS, which vLLM keeps in token_ids
                out.append(SimpleNamespace(outputs=[SimpleNamespace(text=f"A wide image {w}x{h}.",
                                                                    token_ids=[11, 12, 13, self.EOS],
                                                                    finish_reason="stop")]))
            else:
                out.append(SimpleNamespace(outputs=[SimpleNamespace(text="A tall image and", token_ids=[7] * budget,
                                                                    finish_reason="length")]))
        return out


@pytest.fixture
def llava_processor_stub():
    tok = type("Tok", (), {"eos_token_id": FakeLLM.EOS,
                           "__call__": lambda self, t, add_special_tokens=False: SimpleNamespace(
                               input_ids=t.split())})()
    return SimpleNamespace(tokenizer=tok, chat_template=None)


def test_vllm_backend_requests_sampling_and_outputs(tmp_path, llava_processor_stub):
    from PIL import Image

    from vladva_openclip.caption.backends.vllm import VLLMCaptioner

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llava"}')
    engine = FakeLLM()
    cap = VLLMCaptioner(str(tmp_path / "m"), engine, FakeSamplingParams, processor=llava_processor_stub)
    images = [Image.new("RGB", (40, 20)), Image.new("RGB", (20, 40))]
    gens = cap.generate(images, "Describe it.", GenerationSettings(max_new_tokens=5, repetition_penalty=1.1))
    requests, params, use_tqdm = engine.calls[0]
    assert [r["prompt"] for r in requests] == ["USER: <image>\nDescribe it. ASSISTANT:"] * 2
    assert requests[0]["multi_modal_data"]["image"] is images[0] and use_tqdm is False
    assert params.kwargs == {"temperature": 0.0, "max_tokens": 5, "repetition_penalty": 1.1, "seed": 0,
                             "skip_special_tokens": True}
    assert (gens[0].text, gens[0].n_tokens, gens[0].finish_reason) == ("A wide image 40x20.", 3, "stop")
    assert (gens[1].n_tokens, gens[1].finish_reason) == (5, "length")
    with pytest.raises(ValueError, match="no-repeat"):
        cap.generate(images, "x", GenerationSettings(no_repeat_ngram_size=3))


def test_vllm_engine_kwargs():
    from vladva_openclip.caption.backends.vllm import engine_kwargs

    one = engine_kwargs("/m", "bf16", 1, {})
    assert one == {"model": "/m", "dtype": "bfloat16", "limit_mm_per_prompt": {"image": 1},
                   "trust_remote_code": False, "seed": 0}
    two = engine_kwargs("/m", "bf16", 2, {"max_model_len": 4096})
    assert two["distributed_executor_backend"] == "external_launcher" and two["data_parallel_size"] == 2
    assert two["max_model_len"] == 4096
    with pytest.raises(ValueError, match="remote code"):
        engine_kwargs("/m", "bf16", 1, {"trust_remote_code": True})


def test_vllm_job_with_stand_in_engine(tmp_path, llava_processor_stub):
    """A whole job through the vllm backend's code (stand-in engine): finish reasons, trimming and flags land in
    the sidecar."""
    import pandas as pd
    from PIL import Image

    from vladva_openclip.caption import CaptionJobConfig, run_caption
    from vladva_openclip.caption.backends.vllm import VLLMCaptioner

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llava"}')
    for i, size in enumerate([(40, 20), (20, 40), (30, 10)]):
        Image.new("RGB", size, (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    cap = VLLMCaptioner(str(tmp_path / "m"), FakeLLM(), FakeSamplingParams, processor=llava_processor_stub)
    run_caption(CaptionJobConfig(str(tmp_path), str(tmp_path / "out"), backend="vllm", workers=0,
                                 progress=False, long_generation=GenerationSettings(max_new_tokens=6)),
                captioner=cap)
    df = pd.read_parquet(tmp_path / "out" / "sidecars" / "part-00000.captions.parquet")
    assert df["key"].tolist() == ["0.png", "1.png", "2.png"]
    assert df["long_finish_reason"].tolist() == ["stop", "length", "stop"]
    assert df["long_caption"].tolist() == ["A wide image 40x20.", "A tall image and", "A wide image 30x10."]
    assert df["long_raw"][1] == "A tall image and" and "long:cut" in list(df["flags"][1])
    assert df["long_prompt"][0] == "USER: <image>\nDescribe it. ASSISTANT:".replace(
        "Describe it.", "Analyze the image in a comprehensive and detailed manner.")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_cli_vllm_missing_is_one_line(tmp_path, capsys):
    from PIL import Image

    from vladva_openclip.cli import main

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rc = main(["caption", str(tmp_path), "-o", str(tmp_path / "out"), "--backend", "vllm", "--hf-model",
               str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("vladva caption: error: --backend vllm needs vLLM")


def test_cli_bad_arguments_exit_2(tmp_path, capsys):
    from vladva_openclip.cli import main

    assert main(["caption", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--model", "x"]) == 2
    assert "cannot tell what" in capsys.readouterr().err
    assert main(["caption", str(tmp_path), "-o", str(tmp_path / "o"), "--kind", "both", "--prompt", "x"]) == 2
    assert "--prompt sets the instruction of one kind" in capsys.readouterr().err
    assert main(["caption", "--verify", str(tmp_path)]) == 2
    assert "not a vladva caption folder" in capsys.readouterr().err


def _stub_job_inputs(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llava"}')
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(40, 20), (20, 40), (30, 10)]):
        Image.new("RGB", size, (i * 50, 90, 200 - i * 40)).save(folder / f"{i}.png")
    return folder


def test_parquet_table_with_img2dataset_columns_clip_scores_and_progress_lines(tmp_path, llava_processor_stub,
                                                                             monkeypatch, capsys):
    """An img2dataset-style parquet (key, caption, path), the CLIP-score filter with an open_clip model (here the
    tiny VladVA model: any open_clip model scores), and the bar's log lines with images/s and tokens/s."""
    import pandas as pd
    import torch.nn.functional as F

    from vladva_openclip.caption import CaptionJobConfig, QualitySettings, run_caption
    from vladva_openclip.caption.backends.vllm import VLLMCaptioner
    from vladva_openclip.caption.clipscore import ClipScorer
    from vladva_openclip.caption.quality import sentences

    _stub_job_inputs(tmp_path)
    table = tmp_path / "pairs.parquet"
    pd.DataFrame({"key": ["k0", "k1", "k2"], "caption": ["red thing", None, "a blue thing"],
                  "path": [f"imgs/{i}.png" for i in range(3)], "status": ["success"] * 3}).to_parquet(table)
    monkeypatch.setenv("VLADVA_PROGRESS_INTERVAL", "0")
    cap = VLLMCaptioner(str(tmp_path / "m"), FakeLLM(), FakeSamplingParams, processor=llava_processor_stub)
    run_caption(CaptionJobConfig(str(table), str(tmp_path / "out"), workers=0, progress=True,
                                 clip_model="vladva-tiny-llava",
                                 quality=QualitySettings(min_clip_score=1e9)), captioner=cap)
    err = capsys.readouterr().err
    assert "img/s" in err and "tok/s" in err and "\r" not in err  # log mode: plain lines
    df = pd.read_parquet(tmp_path / "out" / "sidecars" / "part-00000.captions.parquet")
    assert df["key"].tolist() == ["k0", "k1", "k2"]
    # the alt-text stays the short one; the empty cell is no caption
    assert (df["short_caption"][0], df["short_caption"][2]) == ("red thing", "a blue thing")
    assert pd.isna(df["short_caption"][1])
    assert all("long:low_clip_score" in list(f) for f in df["flags"])
    # the long score is the mean over sentences of 100 x cosine, under the scorer's own model
    scorer = ClipScorer.load("vladva-tiny-llava", None, torch_device())
    from PIL import Image

    image = scorer.preprocess(Image.open(tmp_path / "imgs" / "1.png").convert("RGB"))[None]
    parts = sentences(df["long_caption"][1])
    img = F.normalize(scorer.model.encode_image(image), dim=-1)
    txt = F.normalize(scorer.model.encode_text(scorer.tokenizer(parts)), dim=-1)
    assert df["long_clip_score"][1] == pytest.approx(float((txt @ img.T).mean() * 100), abs=1e-3)
    assert pd.isna(df["short_clip_score"][1])  # no short caption, no score

    url_table = tmp_path / "urls.csv"
    url_table.write_text("url,caption\nhttps://example.com/a.jpg,a dog\n")
    with pytest.raises(ValueError, match="holds URLs"):
        run_caption(CaptionJobConfig(str(url_table), str(tmp_path / "o2"), workers=0, progress=False),
                    captioner=cap)


def torch_device():
    import torch

    return torch.device("cpu")


def test_out_of_memory_halves_the_batch(tmp_path, llava_processor_stub, caplog):
    """A captioner that runs out of memory above 1 image per call still captions every row, identically."""
    import pandas as pd
    import torch

    from vladva_openclip.caption import CaptionJobConfig, run_caption
    from vladva_openclip.caption.backends.vllm import VLLMCaptioner

    folder = _stub_job_inputs(tmp_path)

    class Tight(VLLMCaptioner):
        calls: ClassVar[list[int]] = []

        def generate(self, inputs, instruction, settings):
            self.calls.append(len(inputs))
            if len(inputs) > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().generate(inputs, instruction, settings)

    outs = {}
    for name, cls in (("plain", VLLMCaptioner), ("tight", Tight)):
        cap = cls(str(tmp_path / "m"), FakeLLM(), FakeSamplingParams, processor=llava_processor_stub)
        run_caption(CaptionJobConfig(str(folder), str(tmp_path / name), workers=0, progress=False, batch_size=3),
                    captioner=cap)
        outs[name] = pd.read_parquet(tmp_path / name / "sidecars" / "part-00000.captions.parquet")
    assert Tight.calls == [3, 1, 2, 1, 1]
    assert outs["tight"]["long_caption"].tolist() == outs["plain"]["long_caption"].tolist()
    assert "retrying in halves" in caplog.text


def test_lengths_are_counted_in_the_target_tokenizer(tmp_path, llava_processor_stub):
    import open_clip

    import vladva_openclip  # noqa: F401
    from vladva_openclip.caption.backends.vllm import VLLMCaptioner
    from vladva_openclip.caption.config import CaptionJobConfig
    from vladva_openclip.caption.job import _counter

    _stub_job_inputs(tmp_path)
    cap = VLLMCaptioner(str(tmp_path / "m"), FakeLLM(), FakeSamplingParams, processor=llava_processor_stub)
    text = "A large red circle is to the left of a small blue square."
    own = _counter(CaptionJobConfig("i", "o"), cap)
    assert own(text) == len(text.split())  # the stand-in captioner's tokenizer splits on spaces
    target = _counter(CaptionJobConfig("i", "o", target_tokenizer="vladva-tiny-llava"), cap)
    assert target(text) == len(open_clip.get_tokenizer("vladva-tiny-llava").encode(text)) != own(text)


def test_decoding_workers_do_not_change_the_output(tmp_path, llava_processor_stub):
    """Webdataset workers interleave rows (worker w of W decodes rows w, w+W, ...): the job generates in row order
    anyway, so 0 and 2 workers write the same sidecar and tar; the workers get a picklable transform, not the
    captioner."""
    import pickle

    from _helpers_caption import write_shards

    from vladva_openclip.caption import CaptionJobConfig, run_caption
    from vladva_openclip.caption.backends.vllm import VLLMCaptioner
    from vladva_openclip.caption.output import read_sidecar

    _stub_job_inputs(tmp_path)
    pattern = write_shards(tmp_path / "shards", 1, 7, corrupt=((0, 3),))
    results = {}
    for workers in (0, 2):
        cap = VLLMCaptioner(str(tmp_path / "m"), FakeLLM(), FakeSamplingParams, processor=llava_processor_stub)
        pickle.dumps(cap.image_transform())
        out = tmp_path / f"out{workers}"
        run_caption(CaptionJobConfig(pattern, str(out), workers=workers, batch_size=2, progress=False,
                                     write_wds=True), captioner=cap)
        df, meta = read_sidecar(out / "sidecars" / "00000.captions.parquet")
        results[workers] = (df.to_json(), meta, (out / "wds" / "00000.tar").read_bytes())
        assert df["row"].tolist() == [0, 1, 2, 4, 5, 6] and meta["skipped"][0]["row"] == 3
    assert results[0] == results[2]


def test_a_changed_input_shard_is_captioned_again(tmp_path, llava_processor_stub):
    """A finished partition is reused only while its input files are unchanged (size, mtime, captions)."""
    import os

    from vladva_openclip.caption import CaptionJobConfig, run_caption, verify_output
    from vladva_openclip.caption.backends.vllm import VLLMCaptioner

    folder = _stub_job_inputs(tmp_path)
    cap = VLLMCaptioner(str(tmp_path / "m"), FakeLLM(), FakeSamplingParams, processor=llava_processor_stub)
    config = CaptionJobConfig(str(folder), str(tmp_path / "out"), workers=0, progress=False, shard_size=2)
    assert run_caption(config, captioner=cap)["this_run"]["images"] == 3
    assert run_caption(config, captioner=cap)["this_run"]["images"] == 0
    (folder / "2.txt").write_text("a new alt-text")  # partition 1 (rows 2..) changes
    assert not verify_output(tmp_path / "out")["ok"]
    assert verify_output(tmp_path / "out")["stale_partitions"] == ["part-00001"]
    assert run_caption(config, captioner=cap)["this_run"]["images"] == 1
    os.utime(folder / "0.png", ns=(1, 1))  # partition 0: same bytes, other mtime: redone (cheap, and safe)
    assert run_caption(config, captioner=cap)["this_run"]["images"] == 2
    assert verify_output(tmp_path / "out")["ok"]
