"""``subsets`` of the SugarCrepe(++) tasks as a string or a list, in Python and in ``--tasks-file``
(a bare string used to be iterated into single characters: "subset file(s) not found: .../s.json, .../w.json")."""
import json

import pytest
from _helpers_eval import (
    TINY_CLIP,
    fixture_tiny_clip_config_dir,  # noqa: F401  (fixtures)
    id_image,
    save_images,
    write_json,
)

from vladva_openclip.eval import build_task, prepare_tasks
from vladva_openclip.eval.cli import main


def _sugarcrepe(tmp_path):
    d = tmp_path / "sc"
    write_json(d / "replace_obj.json", {"0": {"filename": "1.jpg", "caption": "p0", "negative_caption": "n0"}})
    write_json(d / "swap_att.json", {"5": {"filename": "2.jpg", "caption": "p2", "negative_caption": "n2"},
                                     "6": {"filename": "1.jpg", "caption": "p3", "negative_caption": "n3"}})
    save_images(tmp_path / "val2017", [id_image(1), id_image(2)], ["1.jpg", "2.jpg"])
    return str(d), str(tmp_path / "val2017")


@pytest.mark.parametrize("task", ["sugarcrepe", "sugarcrepe_pp"])
@pytest.mark.parametrize("given, expected", [
    ("swap_att", ("swap_att",)), (["swap_att"], ("swap_att",)), (("swap_att", "add_obj"), ("swap_att", "add_obj")),
    ("swap_att, add_obj", ("swap_att", "add_obj")), (None, None),
])
def test_subsets_string_or_list(task, given, expected):
    assert build_task({"task": task, "data": "x", "subsets": given}).config.subsets == expected


def test_subsets_bad_values_say_what_is_wrong():
    with pytest.raises(TypeError, match="string or a list of strings"):
        build_task({"task": "sugarcrepe", "data": "x", "subsets": [1, 2]})
    with pytest.raises(ValueError, match="names no subset"):
        build_task({"task": "sugarcrepe", "data": "x", "subsets": " , "})


def test_python_api_reads_only_the_named_subset(tmp_path):
    data, images = _sugarcrepe(tmp_path)
    (task,) = prepare_tasks([{"task": "sugarcrepe", "data": data, "images": images, "subsets": "swap_att"}])
    assert list(task.prepare().subsets) == ["swap_att"]
    assert task.prepare().subsets["swap_att"]["ids"] == ["5", "6"]


def test_tasks_file_with_string_subsets(tiny_clip_config_dir, tmp_path):
    data, images = _sugarcrepe(tmp_path)
    tasks_file = tmp_path / "tasks.json"
    tasks_file.write_text(json.dumps([{"task": "sugarcrepe", "data": data, "images": images, "subsets": "swap_att"}]))
    out = tmp_path / "out"
    assert main(["--model", TINY_CLIP, "--tasks-file", str(tasks_file), "--device", "cpu", "--workers", "0",
                 "--no-cache", "--no-progress", "--quiet", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "results.json").read_text())["results"][TINY_CLIP]["sugarcrepe"]["metrics"]
    assert set(metrics) == {"swap_att", "swap"}
