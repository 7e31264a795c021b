"""Training reliability (issue 16): what a killed, blown-up or badly fed run keeps, and what it says.

Runs are tiny (vladva-tiny-llava, 32 synthetic scenes, batch 8: 4 optimizer steps per epoch, 2 epochs).
"""
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

STEPS_PER_EPOCH = 4


def _args(logs: Path, name: str, *extra: str) -> list[str]:
    return ["--model", "vladva-tiny-llava", "--dataset-type", "synthetic", "--synthetic-size", "32",
            "--batch-size", "8", "--workers", "0", "--logs", str(logs), "--name", name, "--precision", "fp32",
            "--lr", "1e-2", "--warmup", "0", "--seed", "0", "--max-short-len", "24", "--max-long-len", "64",
            "--log-every-n-steps", "1", "--report-to", "", "--epochs", "2", *extra]


def _final(logs: Path, name: str) -> dict[str, torch.Tensor]:
    return torch.load(logs / name / "checkpoints" / "epoch_2.pt", weights_only=True)["state_dict"]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=1e-5, atol=1e-7, msg=k)


def _ckpts(logs: Path, name: str) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(str(logs / name / "checkpoints" / "*")))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every resumed run must end identical to."""
    from vladva_openclip.train.main import main

    logs = tmp_path_factory.mktemp("straight")
    assert main(_args(logs, "run", "--save-every-n-steps", "2")) in (None, 0)
    return _final(logs, "run")


class _StepSpy:
    """Counts optimizer steps; optionally raises KeyboardInterrupt (a kill) at step ``die_at`` or, after step
    ``poison_at``, multiplies the LoRA weights by 1e37 (finite, but every later loss is NaN)."""

    def __init__(self, monkeypatch, die_at: int | None = None, poison_at: int | None = None):
        from vladva_openclip.train import main as train_main

        self.calls = 0
        real = train_main.GuardedAdamW.step
        spy = self

        def step(opt, closure=None):
            spy.calls += 1
            if spy.calls == die_at:
                raise KeyboardInterrupt("simulated kill")
            out = real(opt, closure)
            if spy.calls == poison_at:
                with torch.no_grad():
                    for group in opt.param_groups:
                        if group.get("name") == "lora":
                            for p in group["params"]:
                                p.mul_(1e37)
            return out

        monkeypatch.setattr(train_main.GuardedAdamW, "step", step)


def test_save_most_recent_resume_latest_uses_step_checkpoints(tmp_path, monkeypatch, straight):
    """Killed in epoch 0 with --save-most-recent: --resume latest continues from the step checkpoint (it used to
    restart from scratch, because open_clip_train only looks at epoch_latest.pt then)."""
    from vladva_openclip.train.main import main

    args = ["--save-every-n-steps", "2", "--save-most-recent"]
    with monkeypatch.context() as m:
        _StepSpy(m, die_at=4)  # dies at step 4 of epoch 0, after the step checkpoint of step 2
        with pytest.raises(KeyboardInterrupt):
            main(_args(tmp_path, "killed", *args))
    assert _ckpts(tmp_path, "killed") == ["epoch_0_step_2.pt"]
    spy = _StepSpy(monkeypatch)
    assert main(_args(tmp_path, "killed", *args, "--resume", "latest")) in (None, 0)
    assert spy.calls == 2 * STEPS_PER_EPOCH - 2  # lost nothing before step 2 (it used to redo all 8)
    _assert_same(_final(tmp_path, "killed"), straight)
    assert "epoch_latest.pt" in _ckpts(tmp_path, "killed")  # --save-most-recent still writes its file


def test_blown_up_weights_no_checkpoint_during_a_nonfinite_streak_and_resume_picks_the_last_good(
        tmp_path, monkeypatch, straight, capsys):
    from vladva_openclip.train.main import main

    args = ["--save-every-n-steps", "1", "--max-nonfinite-steps", "3"]
    with monkeypatch.context() as m:
        _StepSpy(m, poison_at=3)  # step 3 leaves finite but huge weights: steps 4, 5, 6 are NaN -> stop
        rc = main(_args(tmp_path, "blown", *args))
    assert rc == 1
    err = capsys.readouterr().err
    assert "3 non-finite losses in a row" in err and "--resume latest" in err and "Traceback" not in err
    saved = _ckpts(tmp_path, "blown")
    # step checkpoints only while steps were finite; none during the streak (epoch 1's first boundary)
    assert [c for c in saved if c.endswith(".pt")] == ["epoch_0_step_1.pt", "epoch_0_step_2.pt",
                                                       "epoch_0_step_3.pt", "epoch_1.pt"]
    # the blown-up weights (saved after step 3, and again at the end of epoch 0) are marked unusable
    assert "epoch_0_step_3.pt.bad.json" in saved and "epoch_1.pt.bad.json" in saved
    assert "epoch_0_step_2.pt.bad.json" not in saved

    spy = _StepSpy(monkeypatch)
    assert main(_args(tmp_path, "blown", *args, "--resume", "latest")) in (None, 0)
    assert spy.calls == 2 * STEPS_PER_EPOCH - 2  # from epoch_0_step_2.pt, the last good one
    log = (tmp_path / "blown" / "out.log").read_text()
    assert "epoch_0_step_2.pt" in log and "non-finite" in log
    final = _final(tmp_path, "blown")
    assert all(torch.isfinite(v).all() for v in final.values())
    _assert_same(final, straight)
    # the good checkpoints written again by the resumed run are no longer marked
    assert "epoch_1.pt.bad.json" not in _ckpts(tmp_path, "blown")


def test_truncated_latest_falls_back_and_stale_temp_files_are_removed(tmp_path, monkeypatch, straight, caplog):
    import logging

    from vladva_openclip.train.main import main

    args = ["--save-every-n-steps", "2"]
    with monkeypatch.context() as m:
        _StepSpy(m, die_at=STEPS_PER_EPOCH + 4)  # dies in epoch 1 after its step checkpoint at step 2
        with pytest.raises(KeyboardInterrupt):
            main(_args(tmp_path, "trunc", *args))
    ckdir = tmp_path / "trunc" / "checkpoints"
    latest = ckdir / "epoch_1_step_2.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # e.g. a copy cut short by a full disk
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (ckdir / f"epoch_1_step_3.pt.tmp-{dead.pid}").write_bytes(b"")  # left by a kill -9 during a save
        (ckdir / f"epoch_1_step_3.pt.tmp-{alive.pid}").write_bytes(b"")  # another live process's: kept
        spy = _StepSpy(monkeypatch)
        with caplog.at_level(logging.WARNING):
            assert main(_args(tmp_path, "trunc", *args, "--resume", "latest")) in (None, 0)
        assert spy.calls == STEPS_PER_EPOCH  # from epoch_1.pt, the newest readable checkpoint
        warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        assert "epoch_1_step_2.pt" in warning and "previous" in warning
        assert not (ckdir / f"epoch_1_step_3.pt.tmp-{dead.pid}").exists()
        assert (ckdir / f"epoch_1_step_3.pt.tmp-{alive.pid}").exists()
    finally:
        alive.kill()
        alive.wait()
    _assert_same(_final(tmp_path, "trunc"), straight)


def test_stale_temp_file_rule(tmp_path):
    """A temp file is removed when its writer is gone, or when nobody has written to it for an hour."""
    from vladva_openclip.train.checkpoints import clean_stale_temp_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 2 * 3600
    files = {
        "dead": tmp_path / f"epoch_0_step_1.pt.tmp-{dead.pid}",
        "live": tmp_path / f"epoch_0_step_2.pt.tmp-{os.getppid()}",
        # a live pid, but untouched for 2 h: stale (the pid check cannot see other machines' processes)
        "live_but_stale": tmp_path / f"epoch_0_step_3.pt.tmp-{os.getppid()}",
        "own": tmp_path / f"epoch_0_step_4.pt.tmp-{os.getpid()}",
        "not_ours": tmp_path / "notes.tmp-12",
    }
    for p in files.values():
        p.write_bytes(b"")
    os.utime(files["live_but_stale"], (old, old))
    removed = {p.name for p in clean_stale_temp_files(tmp_path)}
    assert removed == {files["dead"].name, files["live_but_stale"].name}
    assert files["live"].exists() and files["own"].exists() and files["not_ours"].exists()


def test_huge_learning_rate_is_a_clear_error_before_training(tmp_path, capsys):
    from vladva_openclip.train.main import main

    argv = _args(tmp_path, "lr")
    argv[argv.index("--lr") + 1] = "1e39"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--lr" in err and "1e+39" in err and "float32" in err and "Traceback" not in err
    assert not (tmp_path / "lr" / "checkpoints").exists() or not os.listdir(tmp_path / "lr" / "checkpoints")


def _latin1_table(tmp_path: Path, rows: int = 8) -> Path:
    from PIL import Image

    lines = ["filepath\ttitle\tlong_caption"]
    for i in range(rows):
        Image.new("RGB", (32, 32), (30 * i, 90, 200 - 20 * i)).save(tmp_path / f"img{i}.png")
        short = "" if i == 2 else ("a café scene" if i == 5 else f"a scene number {i}")
        lines.append(f"img{i}.png\t{short}\ta longer description of scene {i}")
    path = tmp_path / "train.tsv"
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return path


def _csv_args(tmp_path: Path, table: Path, name: str, *extra: str) -> list[str]:
    return ["--model", "vladva-tiny-llava", "--train-data", str(table), "--dataset-type", "csv",
            "--batch-size", "4", "--workers", "0", "--epochs", "1", "--logs", str(tmp_path / "logs"),
            "--name", name, "--precision", "fp32", "--lr", "1e-3", "--report-to", "", "--max-short-len", "24",
            "--max-long-len", "64", *extra]


def test_non_utf8_csv_is_a_clear_error_and_csv_encoding_reads_it(tmp_path, capsys, caplog):
    import logging

    from vladva_openclip.train.main import main

    table = _latin1_table(tmp_path)
    assert main(_csv_args(tmp_path, table, "utf8")) == 2
    err = capsys.readouterr().err
    offset = table.read_bytes().index("é".encode("latin-1"))
    assert str(table) in err and "line 7" in err and f"byte {offset}" in err
    assert "--csv-encoding" in err and "Traceback" not in err

    with caplog.at_level(logging.WARNING):
        assert main(_csv_args(tmp_path, table, "latin1", "--csv-encoding", "latin-1")) in (None, 0)
    assert (tmp_path / "logs" / "latin1" / "checkpoints" / "epoch_1.pt").is_file()
    # the empty short caption of row 2 is warned about (once per occurrence count, not per sample)
    empty = [r.getMessage() for r in caplog.records if "empty short caption" in r.getMessage()]
    assert empty and len(empty) <= 2, empty


def test_csv_encoding_decodes_captions(tmp_path):
    import types

    from vladva_openclip.train.data import get_csv_dataset

    table = _latin1_table(tmp_path)

    class Tok:
        pad_token_id = 0

        def __init__(self):
            self.seen: list[str] = []

        def __call__(self, texts, context_length):
            self.seen.extend(texts)
            return torch.zeros(len(texts), context_length, dtype=torch.long)

    tok = Tok()
    args = types.SimpleNamespace(train_data=str(table), batch_size=4, workers=0, seed=0, csv_encoding="latin-1",
                                 max_short_len=8, max_long_len=8, csv_separator="\t")
    ds = get_csv_dataset(args, lambda im: torch.zeros(3, 4, 4), is_train=True, tokenizer=tok).dataloader.dataset
    ds[5]
    assert "a café scene" in tok.seen
    with pytest.raises(ValueError, match="unknown --csv-encoding 'latin-9x'"):
        get_csv_dataset(types.SimpleNamespace(**{**vars(args), "csv_encoding": "latin-9x"}),
                        lambda im: im, is_train=True, tokenizer=tok)


def test_empty_short_caption_warns_once_and_is_counted(caplog):
    import logging

    from vladva_openclip.train._common import CaptionPacker

    class Tok:
        pad_token_id = 0

        def __call__(self, texts, context_length):
            return torch.ones(len(texts), context_length, dtype=torch.long)

    packer = CaptionPacker(Tok(), 4, 8)
    with caplog.at_level(logging.WARNING):
        for short in (None, "a cat", "", None):
            packer(short, "a long caption")
    warnings = [r for r in caplog.records if "empty short caption" in r.getMessage()]
    assert len(warnings) == 1
    assert packer.empty_short.value == 3


def test_webdataset_caption_that_is_not_utf8_is_skipped_and_counted(caplog):
    import io
    import logging

    from PIL import Image

    from vladva_openclip.train._common import CaptionPacker, SkipCounter
    from vladva_openclip.train._wds import WdsSampleProcessor

    class Tok:
        pad_token_id = 0

        def __call__(self, texts, context_length):
            return torch.ones(len(texts), context_length, dtype=torch.long)

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    skips = SkipCounter()
    process = WdsSampleProcessor(lambda im: torch.zeros(3, 2, 2), CaptionPacker(Tok(), 4, 8), skips)
    good = {"__url__": "shard-0.tar", "__key__": "a", "png": png.getvalue(), "txt": b"a cat"}
    assert process(good) is not None
    with caplog.at_level(logging.WARNING):
        assert process({**good, "__key__": "b", "txt": "caf\xe9".encode("latin-1")}) is None
        assert process({**good, "__key__": "c", "long.txt": b"\xff\xfe"}) is None
    assert skips.value == 2
    assert "shard-0.tar:b" in caplog.text and "not UTF-8" in caplog.text and "shard-0.tar:c" in caplog.text


def test_caption_packer_still_pickles():
    """Workers share the empty-caption count; a plain pickled copy (not a worker) counts on its own."""
    import pickle

    import open_clip

    from vladva_openclip.train._common import CaptionPacker

    packer = CaptionPacker(open_clip.get_tokenizer("vladva-tiny-llava"), 8, 16)
    packer("", "a long caption")
    copy = pickle.loads(pickle.dumps(packer))
    assert copy.empty_short.value == 1
    torch.testing.assert_close(copy("a red circle", None), packer("a red circle", None))
    copy(None, None)
    assert (copy.empty_short.value, packer.empty_short.value) == (2, 1)
