"""Bad input through the CLI, as a pod or the local backend sees it: exit code 2, one line naming the
file and field, and nothing written (no checkpoint folder, no TensorBoard logs, no metrics, no XCom)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from synthval.cli import main
from synthval.generate import run_generate


@pytest.fixture(scope="module")
def clean_real(tmp_path_factory) -> Path:
    return Path(run_generate("real-proxy", str(tmp_path_factory.mktemp("clean") / "real"), num_images=10,
                             image_size=64, seed=2)["dataset_uri"])


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_annotations(root: Path, edit) -> None:
    path = root / "annotations.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _first_box(doc):
    return next(a for item in doc for a in item["annotations"])


def _malformed(root: Path) -> None:
    (root / "annotations.json").write_text('[{"file_name": "x.jpg", "annotations": [')


def _missing_image(root: Path) -> None:
    doc = json.loads((root / "annotations.json").read_text())
    (root / "images" / doc[0]["file_name"]).unlink()


def _box_outside(root: Path) -> None:
    _edit_annotations(root, lambda doc: _first_box(doc).update(bbox=[40, 40, 500, 30]))


def _zero_area(root: Path) -> None:
    _edit_annotations(root, lambda doc: _first_box(doc).update(bbox=[10, 10, 0, 12]))


def _unknown_label(root: Path) -> None:
    _edit_annotations(root, lambda doc: _first_box(doc).update(label_id=977))


def _empty(root: Path) -> None:
    (root / "annotations.json").write_text("[]")
    for split in root.glob("groceries_real_*.txt"):
        split.write_text("")


CASES = [
    (_malformed, ["annotations.json", "line"]),
    (_missing_image, ["images/", "missing"]),
    (_box_outside, ["annotations.json", "[0].annotations", "outside the 64x64 image"]),
    (_zero_area, ["annotations.json", "[0].annotations", "zero or negative area"]),
    (_unknown_label, ["annotations.json", "977"]),
    (_empty, ["holds no images"]),
]


@pytest.mark.parametrize("break_it, named", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
@pytest.mark.parametrize("step", ["train", "evaluate"])
def test_broken_dataset_exits_2_names_it_and_writes_nothing(clean_real, tmp_path, capsys, break_it, named, step):
    data = _copy(clean_real, tmp_path / "data")
    break_it(data)
    out = tmp_path / "out"
    xcom = tmp_path / "xcom.json"
    if step == "train":
        # --*split all: the broken image (the first) is in every image's split.
        argv = ["train", "--train-data", str(data), "--train-split", "all", "--checkpoint-dir", str(out / "ckpt"),
                "--tb-log-dir", str(out / "tb"), "--preset", "cpu-demo", "--set", "max_steps=1"]
    else:
        argv = ["evaluate", "--predictions", str(tmp_path / "none.json"), "--data", str(data), "--split", "all",
                "--out", str(out / "eval"), "--tb-log-dir", str(out / "tb")]
        (tmp_path / "none.json").write_text("[]")
    code = main([*argv, "--xcom-file", str(xcom)])
    err = capsys.readouterr().err
    if step == "evaluate" and break_it in (_missing_image, _box_outside, _zero_area):
        # A results file is scored from the annotations alone, boxes as given, as pycocotools scores
        # them: no bad input there (a model that must see the image: tests/test_evaluate.py).
        assert code == 0, err
        return
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(data) in last, last
    for word in named:
        assert word in last, (word, last)
    assert not out.exists() and not xcom.exists()


def test_archive_with_parent_paths_exits_2_and_leaves_nothing(tmp_path, capsys):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("data/ok.txt", "fine")
        z.writestr("../../escaped.txt", "gotcha")
    out = tmp_path / "dest" / "dataset"
    code = main(["fetch", str(evil), "--out", str(out), "--xcom-file", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2 and "../../escaped.txt" in err, err
    assert not out.exists() and not (tmp_path / "escaped.txt").exists() and not (tmp_path / "x.json").exists()
