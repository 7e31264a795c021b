"""Evaluation reliability (issue 16): corrupt images are skipped and counted (or a one-line error), and
results.json always holds the tasks that finished. Model: vladva-tiny-llava; data: the eval tests' tiny benchmarks."""
import json
import os
from pathlib import Path

import pytest
from _helpers_eval import small_benchmarks

from vladva_openclip.eval.cli import main

MODEL = "vladva-tiny-llava"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("reliability_eval")
    return root, small_benchmarks(root / "data")


def _break(path: Path, how: str) -> None:
    if how == "garbage":  # not an image at all: PIL cannot even read a header
        path.write_bytes(b"this is not an image\n" * 4)
    else:  # a valid header, pixel data cut short
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])


def _retrieval_copy(root: Path, specs: dict, how: str, broken: int = 3) -> dict:
    """A copy of the tiny Flickr-style retrieval set whose image ``broken`` is corrupted as ``how`` says."""
    src = Path(specs["retrieval"]["images"])
    dst = root / f"flickr_{how}"
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        (dst / "images" / p.name).write_bytes(p.read_bytes())
    ann = dst / "dataset_flickr30k.json"
    ann.write_bytes(Path(specs["retrieval"]["data"]).read_bytes())
    _break(dst / "images" / f"{broken}.jpg", how)
    return {"data": str(ann), "images": str(dst / "images")}


def _argv(out: Path, *tasks: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["--model", MODEL, *tasks, "--device", "cpu", "--workers", "0", "--batch-size", "8", "--no-cache",
            "--no-progress", "--quiet", "--output-dir", str(out), *extra]


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_image_one_line_error_or_skipped_and_counted(data, tmp_path, capsys, how):
    _, specs = data
    ret = _retrieval_copy(tmp_path, specs, how)
    wino = specs["winoground"]
    tasks = ("--task", "winoground", "--data", wino["data"],
             "--task", "retrieval", "--data", ret["data"], "--images", ret["images"])
    broken = str(Path(ret["images"]) / "3.jpg")

    assert main(_argv(tmp_path / "strict", *tasks)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vladva-eval: error:")]
    assert len(lines) == 1 and broken in lines[0] and "--skip-missing" in lines[0], err
    assert "Traceback" not in err
    # found when the image is decoded for embedding: the task before it finished, and its results were kept
    doc = json.loads((tmp_path / "strict" / "results.json").read_text())
    assert set(doc["results"][MODEL]) == {"winoground"}
    assert doc["meta"]["status"] == "failed" and broken in doc["meta"]["error"]

    assert main(_argv(tmp_path / "skip", *tasks, extra=("--skip-missing",))) == 0
    doc = json.loads((tmp_path / "skip" / "results.json").read_text())
    assert doc["meta"]["status"] == "complete"
    info = doc["results"][MODEL]["flickr30k"]["info"]
    assert info["n_unreadable_images"] == 1 and info["n_missing_images"] == 0
    assert list(info["unreadable_images"]) == [broken]
    assert info["n_images"] == 11  # 12 images, one skipped
    assert "n_unreadable_images" not in doc["results"][MODEL]["winoground"]["info"]  # only where some were


def test_results_of_finished_tasks_survive_a_crash_in_a_later_task(data, tmp_path, monkeypatch):
    """Whatever stops a run (here an interrupt inside the second task), results.json holds the first task."""
    from vladva_openclip.eval.tasks import RetrievalTask

    _, specs = data

    def interrupted(self, embedder, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(RetrievalTask, "score", interrupted)
    wino, ret = specs["winoground"], specs["retrieval"]
    argv = _argv(tmp_path / "out", "--task", "winoground", "--data", wino["data"],
                 "--task", "retrieval", "--data", ret["data"], "--images", ret["images"])
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(doc["results"][MODEL]) == {"winoground"}
    assert doc["meta"]["status"] == "failed"
    assert "winoground" in (tmp_path / "out" / "results.md").read_text().lower()
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp" in p]  # written atomically, nothing left over


# ---- annotation and task files: errors name the file and the entry (issue 22) --------------------------------
def _one_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("vladva-eval: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("content, needles", [
    ('[{"task": "winoground", "data": "x"', ("not valid JSON (line 1",)),
    ('{"task": "winoground"}', ("expected a JSON list",)),
    ('[{"task": "winoground"}, "imagenet"]', ("entry [1]", "expected an object")),
    ('[{"task": "no-such-task"}]', ("entry [0]", "unknown task type 'no-such-task'")),
])
def test_tasks_file_that_is_not_a_list_of_tasks(tmp_path, capsys, content, needles):
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(content)
    assert main(_argv(tmp_path / "out", extra=("--tasks-file", str(tasks_file)))) == 2
    _one_error(capsys, tasks_file, *needles)


@pytest.mark.parametrize("name, content, needles", [
    ("templates.json", '["a photo of a {}.", ', ("not valid JSON",)),
    ("templates.json", '["a photo of a {}.", 3]', ("entry [1]", "expected a string")),
    ("templates.txt", "a photo of a {}.\na photo without a slot\n", ("entry [1]", "no '{}' or '{c}' placeholder")),
])
def test_template_file_errors_name_the_file_and_entry(data, tmp_path, capsys, name, content, needles):
    _, specs = data
    templates = tmp_path / name
    templates.write_text(content)
    imagenet = specs["imagenet"]
    tasks = ["--task", "imagenet", "--data", imagenet["data"], "--templates", str(templates)]
    tasks += ["--set", "classnames=" + json.dumps(list(imagenet["classnames"]))]
    assert main(_argv(tmp_path / "out", *tasks)) == 2
    _one_error(capsys, templates, *needles)


@pytest.mark.parametrize("how, needles", [
    ("split_list", ("entry images[0]", "field 'split' must be a non-empty string")),
    ("coco_id_list", ("entry annotations[0]", "field 'image_id' must be an integer or a string")),
    ("latin1", ("not UTF-8 text",)),
])
def test_retrieval_annotation_errors_name_the_file_and_entry(data, tmp_path, capsys, how, needles):
    _, specs = data
    ann = tmp_path / "ann.json"
    doc = json.loads(Path(specs["retrieval"]["data"]).read_text())
    if how == "split_list":
        doc["images"][0]["split"] = ["test"]
        ann.write_text(json.dumps(doc))
    elif how == "coco_id_list":
        ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "1.jpg"}],
                                   "annotations": [{"image_id": [1], "caption": "a"}]}))
    else:
        ann.write_bytes(b'{"note": "caf\xe9", ' + json.dumps(doc).encode("utf-8")[1:])  # Latin-1, not UTF-8
    tasks = ("--task", "retrieval", "--data", str(ann), "--images", specs["retrieval"]["images"])
    assert main(_argv(tmp_path / "out", *tasks)) == 2
    _one_error(capsys, ann, *needles)
