"""The dataset readers on small datasets written here: what each format reads into, format detection,
splits and budgets, and the DatasetError each kind of bad input gives (naming file, field and value)."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from synthval.data import detect_format, load_dataset
from synthval.data.loader import image_size
from synthval.data.readers.perception import SYNTHDET_BBOX_DEFINITION_ID
from synthval.errors import ConfigError, DatasetError

SPEC = [{"label_id": 1, "label_name": "cereal"}, {"label_id": 2, "label_name": "milk"},
        {"label_id": 7, "label_name": "soda"}]


def png(path, width=64, height=48, color=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (width, height), color).save(path)


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def perception_capture(filename, boxes, def_id=SYNTHDET_BBOX_DEFINITION_ID, modality="camera"):
    values = [{"label_id": label, "label_name": "?", "instance_id": k, "x": x, "y": y, "width": w, "height": h}
              for k, (label, x, y, w, h) in enumerate(boxes or ())]
    annotations = [{"id": "seg", "annotation_definition": "seg-def", "filename": "seg.png", "values": None}]
    if boxes is not None:
        annotations.append({"id": "a", "annotation_definition": def_id, "values": values})
    return {"id": filename, "sensor": {"sensor_id": "cam", "modality": modality}, "filename": filename,
            "format": "PNG", "annotations": annotations}


def write_perception(root, files, definitions=None, size=(64, 48)):
    """files: {captures file name: [capture, ...]}; every camera capture's image is written as a PNG."""
    definitions = definitions or [{"id": SYNTHDET_BBOX_DEFINITION_ID, "name": "bounding box", "format": "JSON",
                                   "spec": SPEC}]
    write_json(os.path.join(root, "Dataset", "annotation_definitions.json"),
               {"version": "0.0.1", "annotation_definitions": definitions})
    for name, captures in files.items():
        write_json(os.path.join(root, "Dataset", name), {"version": "0.0.1", "captures": captures})
        for capture in captures:
            if capture["sensor"]["modality"] == "camera":
                png(os.path.join(root, capture["filename"]), *size)
    return str(root)


def write_coco(path, images, categories=None, image_dir=None, sizes_in_json=True):
    """images: [(file_name, width, height, [(category, x, y, w, h), ...]), ...]; PNGs go to image_dir."""
    image_dir = image_dir or os.path.join(os.path.dirname(path), "images")
    doc = {"images": [], "annotations": [],
           "categories": categories or [{"id": s["label_id"], "name": s["label_name"]} for s in SPEC]}
    for k, (name, width, height, boxes) in enumerate(images):
        entry = {"id": 100 + k, "file_name": name}
        if sizes_in_json:
            entry.update(width=width, height=height)
        doc["images"].append(entry)
        png(os.path.join(image_dir, name), width, height)
        for label, x, y, w, h in boxes:
            doc["annotations"].append({"id": len(doc["annotations"]), "image_id": 100 + k, "category_id": label,
                                       "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    write_json(path, doc)
    return str(path)


def write_solo(root, frames, size=(64, 48)):
    """frames: {(sequence, step): [(filename, [(label, x, y, w, h), ...]), ...]}."""
    write_json(os.path.join(root, "annotation_definitions.json"), {"annotationDefinitions": [
        {"@type": "type.unity.com/unity.solo.BoundingBox3DAnnotation", "id": "bounding box 3D", "spec": SPEC},
        {"@type": "type.unity.com/unity.solo.BoundingBox2DAnnotation", "id": "bounding box", "spec": SPEC},
    ]})
    for (sequence, step), captures in frames.items():
        folder = os.path.join(root, f"sequence.{sequence}")
        doc = {"frame": step, "sequence": sequence, "step": step, "captures": []}
        for filename, boxes in captures:
            png(os.path.join(folder, filename), *size)
            values = [{"instanceId": k, "labelId": label, "labelName": "?", "origin": [x, y], "dimension": [w, h]}
                      for k, (label, x, y, w, h) in enumerate(boxes)]
            doc["captures"].append({
                "@type": "type.unity.com/unity.solo.RGBCamera", "id": "camera", "filename": filename,
                "imageFormat": "Png", "dimension": [float(size[0]), float(size[1])],
                "annotations": [
                    {"@type": "type.unity.com/unity.solo.BoundingBox3DAnnotation", "id": "bounding box 3D",
                     "values": []},
                    {"@type": "type.unity.com/unity.solo.BoundingBox2DAnnotation", "id": "bounding box",
                     "values": values},
                ]})
        write_json(os.path.join(folder, f"step{step}.frame_data.json"), doc)
    return str(root)


def write_groceries(root, records, splits, size=(80, 60), one_line=False):
    """records: [(file_name, [(label, x, y, w, h), ...])]; splits: {name: [indices]}; JPEG images."""
    write_json(os.path.join(root, "annotation_definitions.json"),
               {"annotation_definitions": [{"id": 1, "name": "2d bounding box", "format": "JSON", "spec": SPEC}]})
    write_json(os.path.join(root, "annotations.json"),
               [{"file_name": name, "annotations": [{"label_id": label, "bbox": [x, y, w, h]}
                                                    for label, x, y, w, h in boxes]} for name, boxes in records])
    for name, _ in records:
        os.makedirs(os.path.join(root, "images"), exist_ok=True)
        Image.new("RGB", size, (10, 120, 30)).save(os.path.join(root, "images", name), quality=80)
    for name, indices in splits.items():
        with open(os.path.join(root, f"groceries_real_{name}.txt"), "w") as f:
            f.write(" ".join(map(str, indices)) + "\n" if one_line else "".join(f"{i}\n" for i in indices))
    return str(root)


def boxes_of(index):
    return [r.boxes.tolist() for r in index.images]


# --- Perception 0.0.1 -------------------------------------------------------------------------------

def test_perception_reads_boxes_labels_and_sizes_from_headers(tmp_path):
    root = write_perception(tmp_path, {
        "captures_000.json": [perception_capture("RGB1/rgb_2.png", [(1, 4, 5, 10, 20), (7, 0, 0, 64, 48)]),
                              perception_capture("lidar/scan_2.pcd", [], modality="lidar")],
        "captures_001.json": [perception_capture("RGB1/rgb_3.png", None)],
    }, size=(64, 48))
    index = load_dataset(root)
    assert index.format == "perception" and index.root == str(tmp_path)
    assert [os.path.relpath(r.path, root) for r in index.images] == ["RGB1/rgb_2.png", "RGB1/rgb_3.png"]
    assert all(os.path.isabs(r.path) for r in index.images)
    assert [(r.width, r.height) for r in index.images] == [(64, 48), (64, 48)]
    assert boxes_of(index) == [[[4, 5, 14, 25], [0, 0, 64, 48]], []]
    assert index.images[0].boxes.dtype == np.float32 and index.images[0].boxes.shape == (2, 4)
    assert index.images[0].labels.tolist() == [1, 7] and index.images[0].labels.dtype == np.int64
    assert index.images[1].boxes.shape == (0, 4)
    assert index.label_names == {1: "cereal", 2: "milk", 7: "soda"}
    assert [r.image_id for r in index.images] == [0, 1]
    np.testing.assert_allclose(index.aspect_ratios(), [64 / 48, 64 / 48])


def test_perception_captures_files_in_natural_order(tmp_path):
    files = {f"captures_{n}.json": [perception_capture(f"RGB/rgb_{n}.png", [(2, 1, 1, 5, 5)])] for n in (10, 2, 1)}
    index = load_dataset(write_perception(tmp_path, files))
    assert [os.path.basename(r.path) for r in index.images] == ["rgb_1.png", "rgb_2.png", "rgb_10.png"]


def test_perception_root_may_be_the_dataset_folder(tmp_path):
    write_perception(tmp_path, {"captures_000.json": [perception_capture("RGB/rgb_2.png", [(1, 1, 1, 5, 5)])]})
    index = load_dataset(str(tmp_path / "Dataset"))
    assert index.images[0].path == str(tmp_path / "RGB" / "rgb_2.png")


def test_perception_bbox_definition_choice(tmp_path, caplog):
    other = "f9f22e05-443f-4602-a422-ebe4ea9b55cb"
    definitions = [{"id": other, "name": "bounding box", "format": "JSON", "spec": SPEC},
                   {"id": "b3", "name": "bounding box 3D", "format": "JSON", "spec": SPEC}]
    root = write_perception(tmp_path, {"captures_000.json": [
        perception_capture("RGB/rgb_2.png", [(1, 1, 1, 5, 5)], def_id=other)]}, definitions=definitions)
    # The SynthDet id is absent but exactly one definition is a 2D box: used, with a warning naming ids.
    with caplog.at_level(logging.WARNING):
        index = load_dataset(root)
    assert index.num_boxes == 1
    assert other in caplog.text and SYNTHDET_BBOX_DEFINITION_ID in caplog.text and "b3" in caplog.text
    assert load_dataset(root, bbox_definition_id=other.upper()).num_boxes == 1
    with pytest.raises(DatasetError, match="annotation_definitions.json.*no annotation definition with id 'nope'"
                                           f".*{other}.*b3"):
        load_dataset(root, bbox_definition_id="nope")


def test_perception_two_2d_box_definitions_need_a_choice(tmp_path):
    definitions = [{"id": "a", "name": "bounding box", "format": "JSON", "spec": SPEC},
                   {"id": "b", "name": "2d bounding box", "format": "JSON", "spec": SPEC}]
    root = write_perception(tmp_path, {"captures_000.json": [
        perception_capture("RGB/rgb_2.png", [(1, 1, 1, 5, 5)], def_id="b")]}, definitions=definitions)
    with pytest.raises(DatasetError, match=r"2 definitions look like 2D bounding boxes.*a \(bounding box\), b"):
        load_dataset(root)
    assert load_dataset(root, bbox_definition_id="b").num_boxes == 1
    assert load_dataset(root, bbox_definition_id="a").num_boxes == 0


# --- SOLO ---------------------------------------------------------------------------------------------

def test_solo_reads_sequences_in_order_and_names_with_spaces(tmp_path):
    root = write_solo(tmp_path, {
        (10, 0): [("step0.camera.png", [(2, 1, 2, 3, 4)])],
        (2, 0): [("step0.camera main.png", [(1, 10, 20, 30, 20), (7, 0, 0, 64, 48)])],
        (2, 1): [("step1.camera main.png", [])],
    })
    index = load_dataset(root)
    assert index.format == "solo"
    assert [os.path.relpath(r.path, root) for r in index.images] == [
        "sequence.2/step0.camera main.png", "sequence.2/step1.camera main.png", "sequence.10/step0.camera.png"]
    assert boxes_of(index) == [[[10, 20, 40, 40], [0, 0, 64, 48]], [], [[1, 2, 4, 6]]]
    assert [r.labels.tolist() for r in index.images] == [[1, 7], [], [2]]
    assert (index.images[0].width, index.images[0].height) == (64, 48)
    assert index.label_names == {1: "cereal", 2: "milk", 7: "soda"}


# --- COCO ---------------------------------------------------------------------------------------------

def test_coco_file_and_folder(tmp_path):
    path = write_coco(tmp_path / "annotations" / "instances.json",
                      [("a.png", 64, 48, [(2, 1, 2, 10, 10)]), ("b.png", 32, 32, [])],
                      image_dir=str(tmp_path / "images"))
    for uri in (path, str(tmp_path), f"file://{tmp_path}"):
        index = load_dataset(uri)
        assert index.format == "coco" and index.root == str(tmp_path)
        assert [os.path.basename(r.path) for r in index.images] == ["a.png", "b.png"]
        assert boxes_of(index) == [[[1, 2, 11, 12]], []]
        assert [(r.width, r.height) for r in index.images] == [(64, 48), (32, 32)]
    assert index.label_names == {1: "cereal", 2: "milk", 7: "soda"}


def test_coco_without_sizes_reads_headers_and_keeps_crowd_area_and_ignore(tmp_path):
    from synthval.data import DetectionDataset, load_ground_truth

    path = write_coco(tmp_path / "data.json", [("a.png", 40, 30, [(1, 0, 0, 5, 5), (7, 1, 1, 5, 5), (2, 0.5, 1, 3, 4)])],
                      sizes_in_json=False)
    doc = json.loads(open(path).read())
    doc["annotations"][0].update(iscrowd=1, area=12.5)
    doc["annotations"][1]["ignore"] = 1
    del doc["annotations"][2]["area"]
    write_json(path, doc)
    index = load_dataset(path)
    record = index.images[0]
    assert (record.width, record.height) == (40, 30)
    # Nothing is dropped: the crowd region stays, flagged, with the file's area and exact box.
    assert record.labels.tolist() == [1, 7, 2]
    assert record.iscrowd.tolist() == [True, False, False] and record.ignore.tolist() == [False, True, False]
    assert record.area.tolist() == [12.5, 25.0, 12.0]  # the given area, else width x height
    assert record.xywh.dtype == np.float64 and record.xywh[2].tolist() == [0.5, 1, 3, 4]
    # A crowd region is not an object to learn.
    assert DetectionDataset(index, {1: 1, 2: 2, 7: 3}).target(0)["labels"].tolist() == [3, 2]
    # The annotations alone give the same ground truth without opening the image.
    os.remove(record.path)
    alone = load_ground_truth(path).images[0]
    assert alone.labels.tolist() == [1, 7, 2] and alone.iscrowd.tolist() == record.iscrowd.tolist()
    assert alone.xywh.tolist() == record.xywh.tolist() and alone.area.tolist() == record.area.tolist()


@pytest.mark.parametrize("field, value, message", [
    ("area", "big", "field 'area' must be a finite number, got 'big'"),
    # Not JSON numbers: the strict JSON reader refuses them first, naming the field.
    ("area", float("nan"), "field 'area': number NaN is not a JSON number"),
    ("area", 10**400, "field 'area': number 10000000000000000000... (401 characters) is out of range"),
    ("iscrowd", "yes", "field 'iscrowd' must be 0 or 1, got 'yes'"),
    ("ignore", [1], "field 'ignore' must be 0 or 1, got [1]"),
])
def test_coco_bad_area_or_flags_name_the_annotation(tmp_path, field, value, message):
    path = write_coco(tmp_path / "data.json", [("a.png", 40, 30, [(1, 0, 0, 5, 5), (7, 1, 1, 5, 5)])])
    doc = json.loads(open(path).read())
    doc["annotations"][1][field] = value
    with open(path, "w") as f:
        f.write(json.dumps(doc))  # NaN and 10**400 as Python's json writes them
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    # Where: the annotation, or (for what the JSON reader refuses) the line and column.
    assert ("annotations[1]" in str(err.value) or "line 1 column" in str(err.value)) and message in str(err.value)


def test_coco_folder_with_several_files(tmp_path):
    images = str(tmp_path / "images")
    write_coco(tmp_path / "annotations" / "instances.json", [("a.png", 20, 20, [])], image_dir=images)
    write_coco(tmp_path / "annotations" / "keypoints.json", [("b.png", 20, 20, [])], image_dir=images)
    # instances*.json is preferred
    assert [os.path.basename(r.path) for r in load_dataset(str(tmp_path)).images] == ["a.png"]
    write_coco(tmp_path / "annotations" / "instances_val.json", [("a.png", 20, 20, [])], image_dir=images)
    with pytest.raises(DatasetError, match="several COCO annotation files.*instances.json, instances_val.json"):
        load_dataset(str(tmp_path))


# --- GroceriesReal ------------------------------------------------------------------------------------

def test_groceries_reads_split_files(tmp_path):
    records = [(f"IMG_{k}.JPG", [(1 + k % 2, 2, 3, 10, 20)]) for k in range(6)]
    root = write_groceries(tmp_path, records, {"train": [0, 2, 4], "val": [1], "test": [3, 5], "train_small": [4]})
    assert detect_format(root) == "groceries"
    train = load_dataset(root, split="train")
    assert [os.path.basename(r.path) for r in train.images] == ["IMG_0.JPG", "IMG_2.JPG", "IMG_4.JPG"]
    assert [r.image_id for r in train.images] == [0, 2, 4]
    assert [(r.width, r.height) for r in train.images] == [(80, 60)] * 3  # from the JPEG headers
    assert boxes_of(train)[0] == [[2, 3, 12, 23]] and train.images[0].labels.tolist() == [1]
    assert len(load_dataset(root, split="test")) == 2
    assert [r.image_id for r in load_dataset(root, split="train_small").images] == [4]
    assert len(load_dataset(root)) == len(load_dataset(root, split="all")) == 6
    with pytest.raises(DatasetError, match="no split 'train_medium'.*test, train, train_small, val"):
        load_dataset(root, split="train_medium")


def test_groceries_split_file_on_one_line_as_datasetinsights_writes_it(tmp_path):
    root = write_groceries(tmp_path, [(f"{k}.jpg", []) for k in range(4)], {"val": [3, 1]}, one_line=True)
    assert [r.image_id for r in load_dataset(root, split="val").images] == [1, 3]


@pytest.mark.parametrize("content, message", [
    ("0\n9\n", r"groceries_real_val.txt: line 2: index 9 is out of range; annotations.json holds 4 images"),
    ("0\nx\n", r"groceries_real_val.txt: line 2: 'x' is not an integer"),
    ("1\n1\n", r"groceries_real_val.txt: line 2: index 1 repeats line 1"),
    ("\n", r"groceries_real_val.txt: the split file lists no images"),
])
def test_groceries_bad_split_file(tmp_path, content, message):
    root = write_groceries(tmp_path, [(f"{k}.jpg", []) for k in range(4)], {"val": [0]})
    (tmp_path / "groceries_real_val.txt").write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(root, split="val")


# --- detection ----------------------------------------------------------------------------------------

def test_detect_format_names_the_folder_and_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError) as err:
        load_dataset(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message
    for layout in ("GroceriesReal", "Perception", "captures_*.json", "SOLO", "sequence.N", "COCO", "images/"):
        assert layout in message
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_dataset(str(tmp_path / "absent"))
    with pytest.raises(DatasetError, match="not a local dataset"):
        load_dataset("gs://bucket/data")
    with pytest.raises(ConfigError, match="format 'kitti' is unknown"):
        load_dataset(str(tmp_path), format="kitti")


def test_explicit_format_that_does_not_fit(tmp_path):
    write_coco(tmp_path / "annotations" / "instances.json", [("a.png", 20, 20, [])])
    with pytest.raises(DatasetError, match="no captures_\\*.json"):
        load_dataset(str(tmp_path), format="perception")
    with pytest.raises(DatasetError, match="no sequence.N folders"):
        load_dataset(str(tmp_path), format="solo")


# --- bad input ----------------------------------------------------------------------------------------

def one_image_coco(tmp_path, boxes, width=64, height=48):
    return write_coco(tmp_path / "ds.json", [("a.png", width, height, boxes)])


def test_malformed_json_names_file_line_and_column(tmp_path):
    root = write_perception(tmp_path, {"captures_000.json": [perception_capture("RGB/rgb_2.png", [])]})
    (tmp_path / "Dataset" / "captures_000.json").write_text('{\n  "captures": [\n    {"id": 1,,}\n  ]\n}\n')
    with pytest.raises(DatasetError, match=r"captures_000\.json: malformed JSON at line 3 column 14"):
        load_dataset(root)


def test_missing_image_names_the_file_and_where_it_is_named(tmp_path):
    path = write_coco(tmp_path / "ds.json", [("a.png", 20, 20, []), ("b.png", 20, 20, [])])
    os.unlink(tmp_path / "images" / "b.png")
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert f"{tmp_path / 'images' / 'b.png'} is missing" in str(err.value)
    assert "ds.json: images[1] (file_name 'b.png')" in str(err.value)
    assert "skip_broken" in str(err.value)


def test_empty_image_file(tmp_path):
    root = write_perception(tmp_path, {"captures_000.json": [perception_capture("RGB/rgb_2.png", [])]})
    (tmp_path / "RGB" / "rgb_2.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"RGB/rgb_2\.png is empty \(0 bytes\).*captures_000\.json: captures\[0\]"):
        load_dataset(root)


def test_unreadable_image_file(tmp_path):
    root = write_perception(tmp_path, {"captures_000.json": [perception_capture("RGB/rgb_2.png", [])]})
    (tmp_path / "RGB" / "rgb_2.png").write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match=r"rgb_2\.png is not a readable image"):
        load_dataset(root)
    (tmp_path / "RGB" / "rgb_2.png").write_bytes(b"\xff\xd8\xff\xe0\x00")  # a JPEG cut off in its first segment
    with pytest.raises(DatasetError, match=r"rgb_2\.png is not a readable image"):
        load_dataset(root)


@pytest.mark.parametrize("box, message", [
    ((1, 60, 10, 10, 10), r"box x=60 y=10 width=10 height=10 \(x2=70, y2=20\) lies outside the 64x48 image by more "
                          r"than 1 px"),
    ((1, -3, 10, 10, 10), r"box x=-3 y=10 width=10 height=10 .* lies outside the 64x48 image"),
    ((1, 5, 5, 0, 10), r"box x=5 y=5 width=0 height=10 has zero or negative area"),
    ((1, 5, 5, 10, -2), r"box x=5 y=5 width=10 height=-2 has zero or negative area"),
    ((1, 64.5, 5, 0.4, 10), r"box x=64.5 y=5 width=0.4 height=10 lies only in the 1 px margin outside the 64x48 image"),
])
def test_bad_boxes(tmp_path, box, message):
    path = one_image_coco(tmp_path, [(2, 1, 1, 5, 5), box])
    with pytest.raises(DatasetError, match=r"ds\.json: annotations\[1\] \(image 'a.png'\): " + message):
        load_dataset(path)


def test_box_within_tolerance_is_clipped(tmp_path):
    index = load_dataset(one_image_coco(tmp_path, [(1, -0.5, 0, 10, 48.8), (2, 60, 40, 4.9, 8.5)]))
    assert boxes_of(index) == [[[0, 0, 9.5, 48], [60, 40, 64, 48]]]


def test_unknown_label_id(tmp_path):
    path = one_image_coco(tmp_path, [(1, 1, 1, 5, 5), (5, 1, 1, 5, 5)])
    with pytest.raises(DatasetError, match=r"ds\.json: annotations\[1\] \(image 'a.png'\): label id 5 is not in the "
                                           r"annotation definitions \(known ids: 1, 2, 7\)"):
        load_dataset(path)
    capture = perception_capture("RGB/rgb_2.png", [(3, 1, 1, 5, 5)])
    root = write_perception(tmp_path / "p", {"captures_000.json": [capture]})
    with pytest.raises(DatasetError, match=r"captures_000\.json: captures\[0\]\.annotations\[1\]\.values\[0\].*"
                                           r"label id 3"):
        load_dataset(root)


def test_unknown_label_fails_even_with_skip_broken(tmp_path):
    with pytest.raises(DatasetError, match="label id 9"):
        load_dataset(one_image_coco(tmp_path, [(9, 1, 1, 5, 5)]), skip_broken=True)


def test_non_numeric_and_missing_fields(tmp_path):
    root = write_perception(tmp_path, {"captures_000.json": [perception_capture("RGB/rgb_2.png", [(1, 1, 1, 5, 5)])]})
    doc = json.loads((tmp_path / "Dataset" / "captures_000.json").read_text())
    doc["captures"][0]["annotations"][1]["values"][0]["width"] = "wide"
    write_json(tmp_path / "Dataset" / "captures_000.json", doc)
    with pytest.raises(DatasetError, match=r"captures_000\.json: captures\[0\]\.annotations\[1\]\.values\[0\] .*"
                                           r"field 'width' must be a number, got 'wide'"):
        load_dataset(root)
    del doc["captures"][0]["annotations"][1]["values"][0]["width"]
    write_json(tmp_path / "Dataset" / "captures_000.json", doc)
    with pytest.raises(DatasetError, match=r"captures_000\.json: captures\[0\]\.annotations\[1\]\.values\[0\]: "
                                           r"missing field 'width'"):
        load_dataset(root)
    path = write_coco(tmp_path / "c" / "ds.json", [("a.png", 20, 20, [(1, 1, 1, 5, 5)])])
    doc = json.loads(open(path).read())
    doc["annotations"][0]["bbox"] = [1, 2, 3]
    write_json(path, doc)
    with pytest.raises(DatasetError, match=r"ds\.json: annotations\[0\]: unexpected value .*'bbox': \[1, 2, 3\]"):
        load_dataset(path)


def test_empty_dataset(tmp_path):
    root = write_perception(tmp_path, {"captures_000.json": []})
    with pytest.raises(DatasetError, match=f"{tmp_path}: the perception dataset holds no images"):
        load_dataset(root)
    path = write_coco(tmp_path / "c.json", [])
    with pytest.raises(DatasetError, match="c.json: the coco dataset holds no images"):
        load_dataset(path)


def test_skip_broken_skips_missing_and_empty_images_with_one_warning(tmp_path, caplog):
    path = write_coco(tmp_path / "ds.json", [(f"{k}.png", 20, 20, [(1, 1, 1, 5, 5)]) for k in range(5)])
    os.unlink(tmp_path / "images" / "1.png")
    (tmp_path / "images" / "3.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="synthval"):
        index = load_dataset(path, skip_broken=True)
    assert [os.path.basename(r.path) for r in index.images] == ["0.png", "2.png", "4.png"]
    assert [r.image_id for r in index.images] == [0, 2, 4]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 2 broken image(s)" in warnings[0].getMessage()
    assert "1.png is missing" in warnings[0].getMessage() and "3.png is empty" in warnings[0].getMessage()


def test_skip_broken_also_skips_images_with_bad_boxes(tmp_path):
    path = write_coco(tmp_path / "ds.json", [("a.png", 20, 20, [(1, 1, 1, 50, 5)]), ("b.png", 20, 20, [])])
    assert [os.path.basename(r.path) for r in load_dataset(path, skip_broken=True).images] == ["b.png"]


def test_skip_broken_with_nothing_left(tmp_path):
    path = write_coco(tmp_path / "ds.json", [("a.png", 20, 20, [])])
    os.unlink(tmp_path / "images" / "a.png")
    with pytest.raises(DatasetError, match="has no usable images \\(1 broken ones skipped\\)"):
        load_dataset(path, skip_broken=True)


def test_image_size_reads_headers_like_pil(tmp_path):
    Image.new("RGB", (123, 45)).save(tmp_path / "a.png")
    Image.new("RGB", (1920, 1080)).save(tmp_path / "b.jpg", quality=90, exif=Image.Exif())
    Image.new("RGB", (640, 480)).save(tmp_path / "c.jpg", progressive=True)
    Image.new("L", (33, 17)).save(tmp_path / "d.bmp")
    for name in ("a.png", "b.jpg", "c.jpg", "d.bmp"):
        assert image_size(str(tmp_path / name)) == Image.open(tmp_path / name).size


# --- splits and budgets -------------------------------------------------------------------------------

@pytest.fixture
def fifty(tmp_path):
    return write_coco(tmp_path / "ds.json", [(f"{k}.png", 16 + k % 3 * 8, 16, [(1, 1, 1, 4, 4)]) for k in range(50)])


def ids(index):
    return [r.image_id for r in index.images]


def test_splits_are_disjoint_cover_and_do_not_move_with_the_seed(fifty):
    splits = {s: ids(load_dataset(fifty, split=s, seed=3)) for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [40, 5, 5]
    assert sorted(sum(splits.values(), [])) == list(range(50))
    assert all(v == sorted(v) for v in splits.values())
    # evaluation loads "test" without the training seed: any seed must give the same test images
    assert all(ids(load_dataset(fifty, split=s, seed=seed)) == splits[s]
               for s in ("train", "val", "test") for seed in (0, 4))
    with pytest.raises(DatasetError, match="unknown split 'dev'.*train, val, test"):
        load_dataset(fifty, split="dev")


def test_budget_is_seeded_nested_and_bounded(fifty):
    small = ids(load_dataset(fifty, split="train", seed=1, max_images=8))
    large = ids(load_dataset(fifty, split="train", seed=1, max_images=20))
    train = ids(load_dataset(fifty, split="train", seed=1))
    assert len(small) == 8 and len(large) == 20
    assert set(small) < set(large) < set(train)
    assert small == ids(load_dataset(fifty, split="train", seed=1, max_images=8))
    assert small != ids(load_dataset(fifty, split="train", seed=2, max_images=8))
    with pytest.raises(DatasetError, match="max_images=41 but split 'train' holds only 40 images"):
        load_dataset(fifty, split="train", seed=1, max_images=41)
    with pytest.raises(ConfigError, match="max_images must be a positive integer"):
        load_dataset(fifty, max_images=0)


def test_budget_with_skip_broken_takes_the_next_usable_images(fifty, tmp_path):
    budget = ids(load_dataset(fifty, seed=0, max_images=10))
    os.unlink(tmp_path / "images" / f"{budget[0]}.png")
    again = ids(load_dataset(fifty, seed=0, max_images=10, skip_broken=True))
    assert len(again) == 10 and budget[0] not in again and len(set(again) & set(budget)) == 9
    with pytest.raises(DatasetError, match="is missing"):
        load_dataset(fifty, seed=0, max_images=10)


def test_tiny_dataset_has_no_test_split(tmp_path):
    path = write_coco(tmp_path / "ds.json", [("a.png", 20, 20, []), ("b.png", 20, 20, [])])
    assert len(load_dataset(path, split="train")) == 2
    with pytest.raises(DatasetError, match="split 'test' is empty: 10% of 2 images rounds to none"):
        load_dataset(path, split="test")


def test_default_split_is_the_datasets_own_test_split_else_everything(tmp_path):
    from synthval.data import default_split
    from synthval.demo.generator import generate_dataset

    real = generate_dataset("real-proxy", str(tmp_path / "real"), num_images=10, image_size=64)["dataset_uri"]
    synthetic = generate_dataset("synthetic", str(tmp_path / "syn"), num_images=4, image_size=64)["dataset_uri"]
    assert default_split(real, "auto", None) == "test"
    assert default_split(synthetic, "auto", None) == "all"
    assert default_split(synthetic, "auto", "val") == "val"
