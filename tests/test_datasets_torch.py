"""The torch side of an index: decoded images and targets, flips, jitter, collation, grouped batches."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from synthval.data import (
    DatasetIndex,
    DetectionDataset,
    GroupedBatchSampler,
    ImageRecord,
    LabelSpace,
    build_batch_sampler,
    collate_detection,
)
from synthval.data.torch_dataset import aspect_ratio_groups
from synthval.errors import DatasetError


@pytest.fixture
def index(tmp_path):
    """Two images: 40x20 with a red left half, and 20x30 grey; RGBA PNG to check the RGB conversion."""
    left_red = np.zeros((20, 40, 4), dtype=np.uint8)
    left_red[:, :20] = (255, 0, 0, 255)
    left_red[:, 20:] = (0, 0, 255, 255)
    Image.fromarray(left_red, "RGBA").save(tmp_path / "a.png")
    Image.new("RGB", (20, 30), (128, 128, 128)).save(tmp_path / "b.jpg")
    records = [
        ImageRecord(0, str(tmp_path / "a.png"), 40, 20, np.array([[2, 3, 12, 13], [20, 0, 40, 20]], np.float32),
                    np.array([5, 9], np.int64)),
        ImageRecord(1, str(tmp_path / "b.jpg"), 20, 30, np.zeros((0, 4), np.float32), np.zeros(0, np.int64)),
    ]
    return DatasetIndex(str(tmp_path), "coco", {5: "milk", 9: "soda", 11: "tea"}, records)


def test_item_is_float_image_and_target_in_model_ids(index):
    space = LabelSpace(("tea", "milk"))  # soda is not a model class: its box is dropped
    dataset = DetectionDataset(index, space.class_ids(index))
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 20, 40)
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert image[:, 0, 0].tolist() == [1.0, 0.0, 0.0] and image[:, 0, 39].tolist() == [0.0, 0.0, 1.0]
    assert target["boxes"].dtype == torch.float32 and target["boxes"].tolist() == [[2, 3, 12, 13]]
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [2]
    assert target["image_id"] == 0
    image, target = dataset[1]
    assert image.shape == (3, 30, 20) and target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_horizontal_flip_moves_pixels_and_boxes(index):
    flipped = DetectionDataset(index, {5: 1, 9: 2}, train=True, hflip_prob=1.0)
    image, target = flipped[0]
    assert image[:, 0, 0].tolist() == [0.0, 0.0, 1.0]  # blue half now on the left
    assert target["boxes"].tolist() == [[28, 3, 38, 13], [0, 0, 20, 20]]
    # not in training: no flip whatever hflip_prob says
    image, target = DetectionDataset(index, {5: 1, 9: 2}, hflip_prob=1.0)[0]
    assert target["boxes"].tolist() == [[2, 3, 12, 13], [20, 0, 40, 20]]


def test_photometric_jitter_changes_colours_not_geometry(index):
    torch.manual_seed(0)
    plain, _ = DetectionDataset(index, {5: 1})[1]
    jittered = [DetectionDataset(index, {5: 1}, train=True, photometric=True)[1][0] for _ in range(4)]
    assert all(j.shape == plain.shape and j.dtype == torch.float32 for j in jittered)
    assert any(not torch.equal(j, plain) for j in jittered)
    assert all(0.0 <= j.min() and j.max() <= 1.0 for j in jittered)


def test_decoded_size_must_match_the_index(index):
    record = index.images[1]
    index.images[1] = ImageRecord(1, record.path, 30, 20, record.boxes, record.labels)
    with pytest.raises(DatasetError, match="b.jpg: decoded size 20x30 differs from the 30x20"):
        DetectionDataset(index, {})[1]


def test_collate_and_dataloader(index):
    loader = DataLoader(DetectionDataset(index, {5: 1, 9: 2}), batch_size=2, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and [tuple(i.shape) for i in images] == [(3, 20, 40), (3, 30, 20)]
    assert [t["image_id"] for t in targets] == [0, 1]


def test_aspect_ratio_groups():
    ratios = np.array([0.4, 0.75, 1.0, 1.33, 1.78, 3.0])
    assert aspect_ratio_groups(ratios, 0).tolist() == [0] * 6
    groups = aspect_ratio_groups(ratios, 3)
    assert groups[0] == 0 and groups[-1] == 7 and groups[2] != groups[4] and list(groups) == sorted(groups)


def test_grouped_batches_cover_each_image_once_and_repeat_by_seed():
    groups = np.array([0] * 7 + [1] * 5 + [2] * 2)
    sampler = GroupedBatchSampler(groups, batch_size=3, seed=4)
    first = list(sampler)
    assert len(first) == len(sampler) == 2 + 1 + 2  # full batches 2+1+0, remainders 1+2+2 pooled into 2
    assert sorted(i for b in first for i in b) == list(range(14))
    full = [b for b in first if len(b) == 3 and len({groups[i] for i in b}) == 1]
    assert len(full) >= 3
    second = list(sampler)
    assert second != first  # the next pass reshuffles
    sampler.set_epoch(0)
    assert list(sampler) == first
    assert list(GroupedBatchSampler(groups, batch_size=3, seed=4)) == first
    assert list(GroupedBatchSampler(groups, batch_size=3, seed=5)) != first


def test_unshuffled_batches_keep_index_order_within_groups():
    batches = list(GroupedBatchSampler([0, 1, 0, 1, 0], batch_size=2, shuffle=False))
    assert batches == [[0, 2], [1, 3], [4]]


def test_build_batch_sampler_reads_aspect_ratios_from_the_index_only():
    # paths that do not exist: grouping must never open an image
    records = [ImageRecord(i, f"/nonexistent/{i}.png", w, h, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
               for i, (w, h) in enumerate([(640, 480)] * 4 + [(480, 640)] * 4)]
    sampler = build_batch_sampler(DatasetIndex("/x", "coco", {}, records), batch_size=2, group_factor=3, seed=0)
    batches = list(sampler)
    assert len(batches) == 4
    assert all(len({records[i].width for i in b}) == 1 for b in batches)
