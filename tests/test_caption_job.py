"""vladva caption with the shipped tiny captioner (vladva-tiny-llava + synth_captioner) on CPU: equality with
model.generate, the job's files, skips, resume and refusal, verify, and vladva-train reading the output."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from _helpers_caption import CAPTIONER, scenes, write_shards

from vladva_openclip.caption import CaptionJobConfig, CaptionJobError, GenerationSettings, run_caption, verify_output
from vladva_openclip.caption.backends.vladva import VladVACaptioner
from vladva_openclip.caption.output import read_sidecar

PROMPT = "Describe the image in detail."


@pytest.fixture(scope="module")
def captioner():
    from vladva_openclip.eval.api import ModelSpec, load_model

    model, preprocess, tokenizer = load_model(ModelSpec(*CAPTIONER))
    return VladVACaptioner(model, preprocess, tokenizer, label=ModelSpec(*CAPTIONER).label)


def _config(src, out, **kw) -> CaptionJobConfig:
    kw.setdefault("long_generation", GenerationSettings(max_new_tokens=24))
    kw.setdefault("short_generation", GenerationSettings(max_new_tokens=10))
    return CaptionJobConfig(str(src), str(out), long_prompt="detailed", workers=0, progress=False, **kw)


@pytest.mark.parametrize("extra", [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
def test_batched_captions_equal_model_generate_image_by_image(captioner, extra):
    images = [captioner.prepare(im) for im, _, _ in scenes(5)]
    gens = captioner.generate(images, PROMPT, GenerationSettings(max_new_tokens=40, **extra))
    model, tok = captioner.model, captioner.tokenizer
    for pixels, g in zip(images, gens):
        ref = model.generate(pixels[None], PROMPT, max_new_tokens=40, **extra)[0]
        assert g.text == ref
        ids = tok.encode(ref)
        assert g.finish_reason in ("stop", "length")
        assert (g.finish_reason == "length") == (g.n_tokens == 40)
        assert abs(g.n_tokens - len(ids)) <= 2  # re-encoding decoded text may merge a token or two
    assert len({g.text for g in gens}) > 1  # the images are told apart: a real caption, not a constant


def test_folder_job_only_missing_bad_images_csv_and_verify(tmp_path, captioner):
    folder = tmp_path / "imgs"
    folder.mkdir()
    data = scenes(5)
    for i, (image, short, long) in enumerate(data):
        image.save(folder / f"{i}.png")
        if i in (0, 1):
            (folder / f"{i}.txt").write_text(short)  # short alt-text: only the long caption is generated
        elif i == 2:
            (folder / f"{i}.txt").write_text(long)  # long alt-text: only the short one
    (folder / "5.png").write_bytes(b"not a png")
    shards = []
    manifest = run_caption(_config(folder, tmp_path / "out", kind="both", only_missing=True, write_csv=True,
                                   shard_size=4), captioner=captioner, on_shard=shards.append)
    assert [s["name"] for s in shards] == ["part-00000", "part-00001"]
    assert manifest["counts"] == {"captioned": 5, "skipped": 1, "rows_read": 6, "shards": 2, "shards_expected": 2,
                                  "flagged": manifest["counts"]["flagged"]}
    assert manifest["skipped"][0]["key"] == "5.png" and "UnidentifiedImageError" in manifest["skipped"][0]["reason"]
    df = pd.concat([read_sidecar(tmp_path / "out" / "sidecars" / f"part-0000{k}.captions.parquet")[0]
                    for k in (0, 1)], ignore_index=True)
    assert df["key"].tolist() == ["0.png", "1.png", "2.png", "3.png", "4.png"]
    assert df["short_source"].tolist() == ["existing", "existing", "generated", "generated", "generated"]
    assert df["long_source"].tolist() == ["generated", "generated", "existing", "generated", "generated"]
    assert df["short_caption"][0] == data[0][1] and df["long_caption"][2] == data[2][2]
    assert df["short_caption"][0] != df["long_caption"][0]
    assert pd.isna(df["long_raw"][2]) and df["long_raw"][0]  # raw text only for what was generated
    # the generated text is the captioner's own, image by image (trimmed only when cut at the budget)
    ref = captioner.model.generate(captioner.prepare(data[3][0])[None], PROMPT, max_new_tokens=24)[0]
    assert df["long_raw"][3] == ref
    assert df["long_prompt"][0].startswith("<s>USER: <image>") and PROMPT in df["long_prompt"][0]
    assert df["settings_hash"].nunique() == 1
    table = pd.read_csv(tmp_path / "out" / "captions.tsv", sep="\t", keep_default_na=False)
    assert list(table.columns) == ["filepath", "title", "long_caption", "key"] and len(table) == 5
    assert table["filepath"][0] == str(folder / "0.png")
    report = verify_output(tmp_path / "out")
    assert report["ok"] and report["captioned"] == 5 and report["skipped"] == 1


def test_rerun_skips_refuses_other_settings_and_overwrite(tmp_path, captioner):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (image, _, _) in enumerate(scenes(3)):
        image.save(folder / f"{i}.png")
    first = run_caption(_config(folder, tmp_path / "out", shard_size=2), captioner=captioner)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "sidecars").iterdir()}
    again = run_caption(_config(folder, tmp_path / "out", shard_size=2, batch_size=1), captioner=captioner)
    assert again["this_run"]["captions_generated"] == 0 and first["this_run"]["captions_generated"] == 3
    assert {p.name: p.read_bytes() for p in (tmp_path / "out" / "sidecars").iterdir()} == before
    with pytest.raises(CaptionJobError, match="other settings.*settings.generation"):
        run_caption(_config(folder, tmp_path / "out", shard_size=2,
                            long_generation=GenerationSettings(max_new_tokens=25)), captioner=captioner)
    redo = run_caption(_config(folder, tmp_path / "out", shard_size=2, overwrite=True,
                               long_generation=GenerationSettings(max_new_tokens=25)), captioner=captioner)
    assert redo["this_run"]["captions_generated"] == 3


def test_verify_finds_duplicate_missing_and_unknown_keys(tmp_path, captioner):
    import pyarrow.parquet as pq

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (image, _, _) in enumerate(scenes(4)):
        image.save(folder / f"{i}.png")
    run_caption(_config(folder, tmp_path / "out", shard_size=2,
                        long_generation=GenerationSettings(max_new_tokens=4)), captioner=captioner)
    assert verify_output(tmp_path / "out")["ok"]
    from vladva_openclip.cli import main

    assert main(["caption", "--verify", str(tmp_path / "out")]) == 0
    path = tmp_path / "out" / "sidecars" / "part-00001.captions.parquet"
    table = pq.read_table(path)
    first = pq.read_table(tmp_path / "out" / "sidecars" / "part-00000.captions.parquet")
    # shard 1 loses its row "3.png" and gains a copy of "0.png" (shard 0's) and an unknown key
    tampered = table.slice(0, 1)
    import pyarrow as pa

    extra = first.slice(0, 1)
    bogus = first.slice(1, 1).set_column(0, "key", pa.array(["zzz.png"]))
    pq.write_table(pa.concat_tables([tampered, extra, bogus]).replace_schema_metadata(table.schema.metadata), path)
    report = verify_output(tmp_path / "out")
    assert not report["ok"]
    from vladva_openclip.cli import main

    assert main(["caption", "--verify", str(tmp_path / "out")]) == 1
    assert (report["duplicate_keys"], report["missing_keys"], report["unknown_keys"]) == (1, 1, 2)
    assert report["examples"]["duplicate_keys"] == ["0.png"] and report["examples"]["missing_keys"] == ["3.png"]
    path.unlink()
    assert verify_output(tmp_path / "out")["missing_partitions"] == ["part-00001"]


def _train(tmp_path, name, data, dataset_type, extra=()):
    from vladva_openclip.train.main import main

    result = main(["--model", "vladva-tiny-llava", "--train-data", data, "--dataset-type", dataset_type,
                   "--batch-size", "2", "--workers", "0", "--epochs", "1", "--logs", str(tmp_path / "logs"),
                   "--name", name, "--precision", "fp32", "--lr", "1e-3", "--report-to", "",
                   "--max-long-len", "48", *extra])
    assert result in (None, 0)
    assert (tmp_path / "logs" / name / "checkpoints" / "epoch_1.pt").is_file()


@pytest.mark.slow
def test_webdataset_json_captions_rewrite_and_training_reads_both_outputs(tmp_path, captioner):
    """Shards with only a json caption and a corrupt image: long captions generated, shards rewritten with
    long.txt (the trainer's default key), and vladva-train trains on them and on the CSV of a folder job."""
    from open_clip_train.data import SharedEpoch  # noqa: F401  (the trainer's dependency is importable)

    from vladva_openclip.train.data import get_wds_dataset

    pattern = write_shards(tmp_path / "shards", 2, 3, json_captions=True, corrupt=((1, 2),))
    manifest = run_caption(_config(pattern, tmp_path / "out", write_wds=True), captioner=captioner)
    assert manifest["counts"]["captioned"] == 5 and manifest["counts"]["skipped"] == 1
    sizes = json.loads((tmp_path / "out" / "wds" / "sizes.json").read_text())
    assert sizes == {"00000.tar": 3, "00001.tar": 3}
    assert verify_output(tmp_path / "out")["ok"]
    df = read_sidecar(tmp_path / "out" / "sidecars" / "00000.captions.parquet")[0]
    assert df["short_caption"][0] == scenes(1)[0][1]  # json's caption is the alt-text, kept as the short one

    # the trainer's own webdataset reader sees the generated long captions (packed row 1)
    import open_clip

    import vladva_openclip  # noqa: F401

    tok = open_clip.get_tokenizer("vladva-tiny-llava")
    args = SimpleNamespace(val_data=str(tmp_path / "out" / "wds" / "{00000..00001}.tar"), train_data=None,
                           batch_size=5, workers=0, world_size=1, rank=0, seed=0, train_num_samples=None,
                           wds_caption_key="txt", wds_long_caption_key="long.txt", max_short_len=32,
                           max_long_len=48, dataset_resampled=False)
    info = get_wds_dataset(args, lambda im: torch.zeros(3, 64, 64), is_train=False, tokenizer=tok)
    _, texts = next(iter(info.dataloader))
    longs = {tok.decode([t for t in row.tolist() if t != tok.pad_token_id]) for row in texts[:, 1]}
    all_longs = pd.concat([read_sidecar(tmp_path / "out" / "sidecars" / f"0000{k}.captions.parquet")[0]
                           for k in (0, 1)])["long_caption"]
    assert {" ".join(t.split()) for t in longs} == {" ".join(t.split()) for t in all_longs}
    _train(tmp_path, "wds", str(tmp_path / "out" / "wds" / "{00000..00001}.tar"), "webdataset",
           ["--train-num-samples", "4"])

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (image, short, _) in enumerate(scenes(4)):
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(short)
    run_caption(_config(folder, tmp_path / "out_csv", write_csv=True), captioner=captioner)
    _train(tmp_path, "csv", str(tmp_path / "out_csv" / "captions.tsv"), "csv")
