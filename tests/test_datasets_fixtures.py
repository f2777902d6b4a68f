"""The readers on the real sample files in ../shared/fixtures (written by Unity's own tools).

Expected values were read off the JSON files by hand. Some samples are broken (see the fixtures'
README): simrun's 2D boxes fall outside its 320x240 camera images, no_annotations_or_metrics ships no
images at all, and the COCO instances.json names an image that is not there (and one of its boxes ends
below that image's stated height). Those tests check that the
error names the file and that skip_broken reads the rest; copies with the missing piece supplied check
that the JSON itself is read correctly.
"""

import logging
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from synthval.data import detect_format, load_dataset
from synthval.errors import DatasetError

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
SIMRUN = FIXTURES / "perception-0.0.1" / "simrun"
NO_ANNOTATIONS = FIXTURES / "perception-0.0.1" / "no_annotations_or_metrics"
SOLO = FIXTURES / "solo"
COCO = FIXTURES / "coco"
SIMRUN_LABELS = {27: "car", 34: "bicycle", 25: "person"}  # the "2d bounding box" definition, id 4

pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"shared fixtures not found at {FIXTURES}")


def test_formats_are_detected():
    assert detect_format(str(SIMRUN)) == "perception"
    assert detect_format(str(NO_ANNOTATIONS)) == "perception"
    assert detect_format(str(SOLO)) == "solo"
    assert detect_format(str(COCO)) == "coco"
    assert detect_format(str(COCO / "annotations" / "keypoints.json")) == "coco"


def test_simrun_boxes_outside_the_image_are_reported():
    with pytest.raises(DatasetError) as err:
        load_dataset(str(SIMRUN))
    assert str(err.value).startswith(
        f"{SIMRUN}/Dataset/captures_001.json: captures[0].annotations[2].values[1] (image 'captures/camera_001.png'): "
        "box x=120 y=331 width=50 height=20 (x2=170, y2=351) lies outside the 320x240 image by more than 1 px")


def test_simrun_skip_broken_reads_the_rest(caplog):
    with caplog.at_level(logging.WARNING, logger="synthval"):
        index = load_dataset(str(SIMRUN), skip_broken=True)
    # camera_000 (no 2D box annotation) remains; the LIDAR capture is not an image
    assert [os.path.relpath(r.path, SIMRUN) for r in index.images] == ["captures/camera_000.png"]
    assert (index.images[0].width, index.images[0].height) == (320, 240)
    assert index.num_boxes == 0 and index.label_names == SIMRUN_LABELS
    assert "using the only 2D bounding-box definition, id 4" in caplog.text
    assert "skipped 1 broken image(s)" in caplog.text and "camera_001.png" in caplog.text


def test_simrun_json_is_read_exactly(tmp_path):
    # The same dataset with camera_001.png replaced by a 1024x768 image, large enough for its boxes.
    root = tmp_path / "simrun"
    shutil.copytree(SIMRUN, root)
    Image.new("RGB", (1024, 768)).save(root / "captures" / "camera_001.png")
    index = load_dataset(str(root))
    assert [os.path.relpath(r.path, root) for r in index.images] == ["captures/camera_000.png",
                                                                      "captures/camera_001.png"]
    assert [(r.width, r.height) for r in index.images] == [(320, 240), (1024, 768)]
    assert index.images[0].boxes.shape == (0, 4)
    assert index.images[1].boxes.tolist() == [[30, 50, 130, 150], [120, 331, 170, 351], [432, 683, 442, 703]]
    assert index.images[1].labels.tolist() == [27, 34, 25]
    assert index.label_names == SIMRUN_LABELS
    assert load_dataset(str(root), bbox_definition_id="4").num_boxes == 3
    with pytest.raises(DatasetError, match=r"no annotation definition with id 'c31620e3.*1 \(semantic segmentation\), "
                                           r"2 \(3d bounding box\), 3 \(lidar semantic segmention\), "
                                           r"4 \(2d bounding box\)"):
        load_dataset(str(root), bbox_definition_id="c31620e3-55ff-4af6-ae86-884aa0daa9b2")


def test_no_annotations_or_metrics_has_no_images():
    with pytest.raises(DatasetError) as err:
        load_dataset(str(NO_ANNOTATIONS))
    assert str(err.value).startswith(
        f"{NO_ANNOTATIONS}/captures/camera_000.png is missing (named in "
        f"{NO_ANNOTATIONS}/Dataset/captures_000.json: captures[0] (filename 'captures/camera_000.png')) "
        "(1 more broken images among those checked)")
    with pytest.raises(DatasetError, match="the dataset has no usable images \\(2 broken ones skipped\\)"):
        load_dataset(str(NO_ANNOTATIONS), skip_broken=True)


def test_no_annotations_or_metrics_with_its_images(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(NO_ANNOTATIONS, root)
    shutil.copytree(SIMRUN / "captures", root / "captures")
    index = load_dataset(str(root))
    assert [os.path.basename(r.path) for r in index.images] == ["camera_000.png", "camera_001.png"]
    assert [(r.width, r.height) for r in index.images] == [(320, 240), (320, 240)]
    assert index.num_boxes == 0 and index.label_names == SIMRUN_LABELS


def test_solo():
    index = load_dataset(str(SOLO))
    assert index.format == "solo"
    assert [os.path.relpath(r.path, SOLO) for r in index.images] == ["sequence.0/step0.camera.png",
                                                                     "sequence.1/step0.camera.png"]
    assert [(r.width, r.height) for r in index.images] == [(1024, 768), (1024, 768)]
    for record in index.images:
        assert record.boxes.tolist() == [[167, 308, 395, 500], [418, 243, 546, 579], [669, 400, 903, 666]]
        assert record.labels.tolist() == [1, 5, 1]
    assert index.label_names == {1: "Crate", 2: "Cube", 3: "Box", 4: "Terrain", 5: "Character"}


def test_coco_folder_reads_instances_json_whose_image_is_missing():
    with pytest.raises(DatasetError) as err:
        load_dataset(str(COCO))
    missing = COCO / "images" / "camera_91891091516384550185081373185892902457.png"
    assert str(err.value).startswith(f"{missing} is missing (named in {COCO}/annotations/instances.json: images[0]")
    with pytest.raises(DatasetError, match="no usable images \\(1 broken ones skipped\\)"):
        load_dataset(str(COCO), skip_broken=True)


def test_coco_keypoints_json():
    index = load_dataset(str(COCO / "annotations" / "keypoints.json"))
    assert [os.path.basename(r.path) for r in index.images] == [
        "camera_61855733451949387398181790757513827492.png", "camera_125709864006893838062514269195103918838.png"]
    assert [(r.width, r.height) for r in index.images] == [(640, 640), (640, 640)]
    assert [len(r.boxes) for r in index.images] == [8, 7]
    assert index.images[0].boxes[:2].tolist() == [[72, 0, 117, 23], [263, 0, 311, 43]]
    assert index.images[1].boxes[-1].tolist() == [0, 190, 86, 640]
    assert index.label_names == {1: "person"}
    assert [r.image_id for r in index.images] == [0, 1]  # positions, not COCO's 128-bit ids


def test_coco_instances_json_with_its_image(tmp_path):
    # Supplying the missing 320x240 image shows the next problem: the bicycle box ends at y=251.
    root = tmp_path / "coco"
    shutil.copytree(COCO, root)
    name = "camera_91891091516384550185081373185892902457.png"
    shutil.copy(COCO / "images" / "camera_001.png", root / "images" / name)
    with pytest.raises(DatasetError) as err:
        load_dataset(str(root))
    assert str(err.value).startswith(
        f"{root}/annotations/instances.json: annotations[1] (image '{name}'): "
        "box x=120 y=231 width=50 height=20 (x2=170, y2=251) lies outside the 320x240 image by more than 1 px")
    # With the image's true height the JSON reads as written.
    Image.new("RGB", (320, 260)).save(root / "images" / name)
    instances = (root / "annotations" / "instances.json").read_text().replace('"height": 240', '"height": 260')
    (root / "annotations" / "instances.json").write_text(instances)
    index = load_dataset(str(root))
    assert len(index) == 1 and (index.images[0].width, index.images[0].height) == (320, 260)
    assert index.images[0].boxes.tolist() == [[30, 50, 130, 150], [120, 231, 170, 251], [132, 83, 142, 103]]
    assert index.images[0].labels.tolist() == [27, 34, 25]
    assert index.label_names == SIMRUN_LABELS
