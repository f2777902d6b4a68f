"""Bad input through the CLI, as a pod or the local backend sees it: exit code 2, one line naming the
file and field (and the value where there is one), no traceback, and nothing written (no checkpoint
folder, no TensorBoard logs, no metrics, no fetched folder, no XCom).

The corpus: broken datasets (GroceriesReal, COCO, Perception), predictions files, config, URIs, hostile or
incomplete archives, and outputs that cannot be written (a file in the way, a read-only or full disk).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import subprocess
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ports import free_port

from synthval.cli import main
from synthval.demo.generator import generate_dataset


@pytest.fixture(scope="module")
def clean_real(tmp_path_factory) -> Path:
    return Path(generate_dataset("real-proxy", str(tmp_path_factory.mktemp("clean") / "real"), num_images=10,
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


# ---------------------------------------------------------------------------------------------
# The corpus: each case builds its input and returns the command line; every output it names is under
# `ctx.out`, which must not exist afterwards.


@dataclass
class Ctx:
    tmp: Path
    real: Path  # a GroceriesReal copy (10 images, 64 px), free to break
    synth: Path  # a Perception copy (6 images)
    coco: Path  # a COCO file (3 images) beside its images/
    out: Path  # every output of the case goes below it
    http: Any  # the loopback HTTP server
    xcom: Path = Path("/nonexistent")  # where the step's result would go

    def evaluate(self, data: Path | str, *extra: str, predictions: Path | None = None) -> list[str]:
        if predictions is None:
            predictions = self.tmp / "none.json"
            predictions.write_text("[]")
        return ["evaluate", "--predictions", str(predictions), "--data", str(data), "--split", "all",
                "--out", str(self.out / "eval"), "--tb-log-dir", str(self.out / "tb"), *extra]

    def train(self, data: Path | str, *extra: str) -> list[str]:
        return ["train", "--train-data", str(data), "--train-split", "all", "--checkpoint-dir",
                str(self.out / "ckpt"), "--tb-log-dir", str(self.out / "tb"), "--preset", "cpu-demo",
                "--set", "max_steps=1", *extra]

    def fetch(self, source: Path | str, *extra: str) -> list[str]:
        return ["fetch", str(source), "--out", str(self.out), *extra]


def write_raw(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def edit_json(path: Path, edit: Callable[[Any], Any]) -> None:
    """Apply `edit` to the document; what it returns replaces the document unless it is None."""
    doc = json.loads(path.read_text())
    edited = edit(doc)
    path.write_text(json.dumps(doc if edited is None else edited))


def first_bbox_raw(ctx: Ctx, value: str) -> None:
    """Replace the first box coordinate of the GroceriesReal annotations by a raw JSON token."""
    path = ctx.real / "annotations.json"
    text = json.dumps(json.loads(path.read_text()))
    at = text.index('"bbox": [') + len('"bbox": [')
    path.write_text(text[:at] + value + text[text.index(",", at):])


DEEP = "[" * 10_000 + "]" * 10_000


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming `width` x `height` (and nothing else)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def first_image(ctx: Ctx) -> Path:
    return ctx.real / "images" / json.loads((ctx.real / "annotations.json").read_text())[0]["file_name"]


def tar_of(files: dict[str, bytes], kind: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{kind}") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


FILES = {f"data/f{i:02d}.txt": b"x" * 1000 for i in range(12)}


def archive(ctx: Ctx, name: str, data: bytes) -> Path:
    return write_raw(ctx.tmp / name, data)


def cut_tar_at_member_boundary(ctx: Ctx) -> list[str]:
    data = tar_of(FILES)
    return ctx.fetch(archive(ctx, "cut.tar", data[:7 * (512 + 1024)]))  # 7 of 12 whole members, no end block


def cut_tar_inside_a_member(ctx: Ctx) -> list[str]:
    return ctx.fetch(archive(ctx, "cut.tar", tar_of(FILES)[:5 * 1536 + 512 + 300]))


def cut_tgz(ctx: Ctx) -> list[str]:
    data = tar_of(FILES, "gz")
    return ctx.fetch(archive(ctx, "cut.tar.gz", data[:len(data) // 2]))


def tgz_of_a_cut_tar(ctx: Ctx) -> list[str]:
    """A whole gzip stream around a tar that stops at a member boundary: only the end block tells."""
    return ctx.fetch(archive(ctx, "inner-cut.tgz", gzip.compress(tar_of(FILES)[:4 * 1536])))


def zip_with_duplicates(ctx: Ctx) -> list[str]:
    path = ctx.tmp / "dup.zip"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate it is asked to write
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("data/labels.json", "[1]")
            z.writestr("data/other.txt", "x")
            z.writestr("data/labels.json", "[2]")
    return ctx.fetch(path)


def tar_with_duplicates(ctx: Ctx) -> list[str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for body in (b"first", b"second"):
            info = tarfile.TarInfo("data/labels.json")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return ctx.fetch(archive(ctx, "dup.tar", buf.getvalue()))


def too_many_members(ctx: Ctx) -> list[str]:
    return ctx.fetch(archive(ctx, "many.tar", tar_of(FILES)), "--max-extract-members", "5")


def too_many_bytes(ctx: Ctx) -> list[str]:
    return ctx.fetch(archive(ctx, "big.tar", tar_of(FILES)), "--max-extract-bytes", "4000")


def absolute_member(ctx: Ctx) -> list[str]:
    return ctx.fetch(archive(ctx, "abs.tar", tar_of({"/etc/synthval-evil": b"x"})))


def escaping_symlink(ctx: Ctx) -> list[str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("data/link")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tar.addfile(info)
    return ctx.fetch(archive(ctx, "link.tar", buf.getvalue()))


def device_member(ctx: Ctx) -> list[str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("data/null")
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(info)
    return ctx.fetch(archive(ctx, "dev.tar", buf.getvalue()))


def not_a_zip(ctx: Ctx) -> list[str]:
    return ctx.fetch(archive(ctx, "fake.zip", b"this is not a zip file at all" * 10))


def coco_edit(edit: Callable[[Any], Any]) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        edit_json(ctx.coco, edit)
        return ctx.evaluate(ctx.coco)
    return build


def coco_raw(old: str, new: str) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        text = json.dumps(json.loads(ctx.coco.read_text()))
        assert old in text
        ctx.coco.write_text(text.replace(old, new, 1))
        return ctx.evaluate(ctx.coco)
    return build


def predictions(body: str | bytes | None) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        path = ctx.tmp / "predictions.json"
        if body is not None:
            write_raw(path, body)
        return ctx.evaluate(ctx.real, predictions=path)
    return build


def captures(ctx: Ctx) -> Path:
    return ctx.synth / "Dataset" / "captures_000.json"


def captures_raw(old: str, new: str) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        text = json.dumps(json.loads(captures(ctx).read_text()))
        assert old in text
        captures(ctx).write_text(text.replace(old, new, 1))
        return ctx.evaluate(ctx.synth)
    return build


def real_edit(path: str, text: str | bytes, step: str = "evaluate", *extra: str) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        write_raw(ctx.real / path, text)
        return getattr(ctx, step)(ctx.real, *extra)
    return build


def mounted(ctx: Ctx, name: str, options: str) -> Path:
    """A small tmpfs at tmp/<name> (mount needs root, or the test is skipped); unmounted at the end."""
    point = ctx.tmp / name
    point.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and mount rights) here")
    MOUNTS.append(point)
    return point


MOUNTS: list[Path] = []


def read_only_output(ctx: Ctx) -> list[str]:
    point = mounted(ctx, "ro", "ro,size=64k")
    ctx.out = point / "out"
    return ctx.evaluate(ctx.real)


def full_disk_output(ctx: Ctx) -> list[str]:
    point = mounted(ctx, "full", "size=48k")
    ctx.out = point / "out"
    return ctx.fetch(ctx.real)  # about 60 kB of images and JSON


def output_is_a_file(ctx: Ctx) -> list[str]:
    argv = ctx.evaluate(ctx.real)
    (ctx.tmp / "taken").write_text("already here")
    argv[argv.index("--out") + 1] = str(ctx.tmp / "taken")
    return argv


def checkpoint_dir_below_a_file(ctx: Ctx) -> list[str]:
    (ctx.tmp / "afile").write_text("x")
    argv = ctx.train(ctx.real)
    argv[argv.index("--checkpoint-dir") + 1] = str(ctx.tmp / "afile" / "ckpt")
    return argv


def tb_log_dir_is_a_file(ctx: Ctx) -> list[str]:
    (ctx.tmp / "tb-file").write_text("x")
    argv = ctx.train(ctx.real)
    argv[argv.index("--tb-log-dir") + 1] = str(ctx.tmp / "tb-file")
    return argv


def xcom_file_is_a_folder(ctx: Ctx) -> list[str]:
    ctx.xcom = ctx.tmp / "xcom-folder"
    ctx.xcom.mkdir()
    return ctx.evaluate(ctx.real)


def xcom_to_a_full_device(ctx: Ctx) -> list[str]:
    ctx.xcom = Path("/dev/full")
    return ["version"]


def report_out_is_a_folder(ctx: Ctx) -> list[str]:
    (ctx.tmp / "page.html").mkdir()
    return ["report", "--metrics", str(ctx.tmp / "metrics.json"), "--out", str(ctx.tmp / "page.html")]


def http_404(ctx: Ctx) -> list[str]:
    return ctx.fetch(ctx.http.url("/missing.tar.gz"), "--retries", "0")


def http_refused(ctx: Ctx) -> list[str]:
    return ctx.fetch(f"http://127.0.0.1:{free_port()}/data.zip", "--retries", "0")


def checksum_mismatch(ctx: Ctx) -> list[str]:
    url = ctx.http.serve("/data.bin", b"the real bytes")
    return ctx.fetch(url, "--checksum", "sha256:" + "0" * 64, "--no-extract")


def config_file(text: str | bytes) -> Callable[[Ctx], list[str]]:
    def build(ctx: Ctx) -> list[str]:
        return ctx.train(ctx.real, "--config", str(write_raw(ctx.tmp / "config.yaml", text)))
    return build


@dataclass
class Case:
    name: str
    build: Callable[[Ctx], list[str]]
    named: tuple[str, ...]  # what the error line must say, besides "error: "


CORPUS = [
    # GroceriesReal datasets
    Case("annotations_nested_10000_deep", real_edit("annotations.json", DEEP), ("annotations.json", "nested deeper")),
    Case("annotations_not_utf8", real_edit("annotations.json", b'[{"file_name": "caf\xe9.JPG"}]'),
         ("annotations.json", "not UTF-8", "byte")),
    Case("box_a_400_digit_integer", lambda ctx: (first_bbox_raw(ctx, "1" + "0" * 400), ctx.evaluate(ctx.real))[1],
         ("annotations.json", "'bbox'", "1000000000", "out of range")),
    Case("box_1e400", lambda ctx: (first_bbox_raw(ctx, "1e400"), ctx.evaluate(ctx.real))[1],
         ("annotations.json", "'bbox'", "1e400", "out of range")),
    Case("box_nan", lambda ctx: (first_bbox_raw(ctx, "NaN"), ctx.evaluate(ctx.real))[1],
         ("annotations.json", "'bbox'", "NaN")),
    Case("box_infinity", lambda ctx: (first_bbox_raw(ctx, "-Infinity"), ctx.evaluate(ctx.real))[1],
         ("annotations.json", "'bbox'", "-Infinity")),
    Case("box_a_string", lambda ctx: (first_bbox_raw(ctx, '"12"'), ctx.evaluate(ctx.real))[1],
         ("annotations.json", "bbox[0]", "'12'", "must be a number")),
    Case("box_of_three_values", lambda ctx: (edit_json(ctx.real / "annotations.json", lambda d: d[0][
        "annotations"][0].update(bbox=[1, 2, 3])), ctx.evaluate(ctx.real))[1], ("annotations.json", "[0]", "bbox")),
    Case("label_null", lambda ctx: (edit_json(ctx.real / "annotations.json", lambda d: d[0]["annotations"][0].update(
        label_id=None)), ctx.evaluate(ctx.real))[1], ("annotations.json", "label_id", "None")),
    Case("box_field_missing", lambda ctx: (edit_json(ctx.real / "annotations.json", lambda d: d[0]["annotations"][
        0].pop("bbox") and None), ctx.evaluate(ctx.real))[1], ("annotations.json", "missing field 'bbox'")),
    # A results file is scored from the annotations alone; a model must see the image.
    Case("image_empty", lambda ctx: (write_raw(first_image(ctx), b""), ctx.train(ctx.real))[1],
         ("images/", "is empty (0 bytes)")),
    Case("image_not_an_image", lambda ctx: (write_raw(first_image(ctx), b"<html>not a JPEG</html>"),
                                           ctx.train(ctx.real))[1], ("images/", "not a readable image")),
    Case("png_header_100000_by_100000_refused_before_training",
         lambda ctx: (write_raw(first_image(ctx), png_header(100_000, 100_000)), ctx.train(ctx.real))[1],
         ("images/", "100000x100000", "decompression-bomb")),
    Case("split_index_out_of_range", real_edit("groceries_real_test.txt", "0\n77\n", "evaluate", "--split", "test"),
         ("groceries_real_test.txt", "line 2", "77", "out of range")),
    Case("split_token_not_an_integer", real_edit("groceries_real_test.txt", "0\nseven\n", "evaluate", "--split",
                                                 "test"), ("groceries_real_test.txt", "line 2", "'seven'")),
    Case("split_index_repeated", real_edit("groceries_real_test.txt", "3\n3\n", "evaluate", "--split", "test"),
         ("groceries_real_test.txt", "index 3 repeats line 1")),
    Case("definitions_malformed", real_edit("annotation_definitions.json", '{"annotation_definitions": ['),
         ("annotation_definitions.json", "malformed JSON")),
    Case("dataset_missing", lambda ctx: ctx.evaluate(ctx.tmp / "no-such-dataset"), ("no-such-dataset", "no such")),
    Case("dataset_is_a_text_file", lambda ctx: ctx.evaluate(write_raw(ctx.tmp / "notes.txt", "hello")),
         ("notes.txt", "not .json")),
    Case("unknown_split", lambda ctx: ctx.evaluate(ctx.real, "--split", "nope"), ("no split 'nope'",)),
    Case("budget_over_the_split", lambda ctx: ctx.train(ctx.real, "--max-images", "999"),
         ("max_images=999", "holds only")),
    # COCO
    Case("coco_width_infinity", coco_raw('"width": 64', '"width": Infinity'), ("ds.json", "'width'", "Infinity")),
    Case("coco_width_fraction", coco_edit(lambda d: d["images"][0].update(width=12.5)),
         ("ds.json", "images[0]", "whole numbers")),
    Case("coco_width_70000", coco_edit(lambda d: d["images"][0].update(width=70000)),
         ("ds.json", "images[0]", "70000x", "out of range")),
    Case("coco_image_id_repeated", coco_edit(lambda d: d["images"][1].update(id=d["images"][0]["id"])),
         ("ds.json", "images[1]", "repeats image id")),
    Case("coco_annotation_of_no_image", coco_edit(lambda d: d["annotations"][0].update(image_id=999)),
         ("ds.json", "annotations[0]", "999", "not in images")),
    Case("coco_category_id_a_string", coco_edit(lambda d: d["annotations"][0].update(category_id="one")),
         ("ds.json", "category_id", "'one'")),
    Case("coco_without_annotations", coco_edit(lambda d: d.pop("annotations") and None), ("ds.json", "'annotations'")),
    Case("coco_a_list", coco_edit(lambda d: [d]), ("ds.json", "expected a COCO object")),
    Case("coco_box_a_400_digit_integer", coco_raw('"bbox": [', '"bbox": [' + "9" * 400 + ", "),
         ("ds.json", "'bbox'", "999999", "out of range")),
    Case("coco_nested_10000_deep", coco_raw('"categories": [', '"extra": ' + DEEP + ', "categories": ['),
         ("ds.json", "nested deeper")),
    # Perception
    Case("captures_nested_10000_deep", lambda ctx: (write_raw(captures(ctx), DEEP), ctx.evaluate(ctx.synth))[1],
         ("captures_000.json", "nested deeper")),
    Case("captures_not_utf8", lambda ctx: (write_raw(captures(ctx), b'{"captures": ["\xff\xfe"]}'),
                                          ctx.evaluate(ctx.synth))[1], ("captures_000.json", "not UTF-8")),
    Case("captures_box_1e400", captures_raw('"x": ', '"x": 1e400, "was_x": '), ("captures_000.json", "'x'", "1e400")),
    Case("captures_box_width_a_string", captures_raw('"width": ', '"width": "wide", "was": '),
         ("captures_000.json", "'width'", "'wide'")),
    Case("unknown_bbox_definition", lambda ctx: ctx.evaluate(ctx.synth, "--bbox-definition", "no-such-definition"),
         ("no-such-definition",)),
    # Predictions (a COCO results file scored against the real set)
    Case("predictions_missing", predictions(None), ("predictions.json", "no such")),
    Case("predictions_malformed", predictions('[{"image_id": 0,'), ("predictions.json", "malformed JSON")),
    Case("predictions_not_a_list", predictions('{"image_id": 0}'), ("predictions.json", "JSON list")),
    Case("predictions_nested_10000_deep", predictions(DEEP), ("predictions.json", "nested deeper")),
    Case("predictions_not_utf8", predictions(b'[{"note": "\xc3\x28"}]'), ("predictions.json", "not UTF-8")),
    Case("predictions_score_infinity",
         predictions('[{"image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4], "score": Infinity}]'),
         ("predictions.json", "'score'", "Infinity")),
    Case("predictions_box_a_400_digit_integer",
         predictions('[{"image_id": 0, "category_id": 1, "bbox": [1, 2, ' + "7" * 400 + ', 4], "score": 0.5}]'),
         ("predictions.json", "'bbox'", "777777", "finite numbers")),
    Case("predictions_unknown_image",
         predictions('[{"image_id": 4242, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]'),
         ("predictions.json", "[0]", "image_id", "4242")),
    Case("predictions_unknown_category",
         predictions('[{"image_id": 0, "category_id": 4242, "bbox": [1, 2, 3, 4], "score": 0.5}]'),
         ("predictions.json", "[0]", "category_id", "4242")),
    Case("predictions_negative_width",
         predictions('[{"image_id": 0, "category_id": 1, "bbox": [1, 2, -3, 4], "score": 0.5}]'),
         ("predictions.json", "[0]", "bbox", "negative")),
    # Config
    Case("config_unknown_key", lambda ctx: ctx.train(ctx.real, "--set", "optimizer.lrr=0.1"), ("optimizer.lrr",)),
    Case("config_wrong_type", lambda ctx: ctx.train(ctx.real, "--set", "optimizer.lr=fast"),
         ("optimizer.lr", "fast")),
    Case("config_nan", lambda ctx: ctx.train(ctx.real, "--set", "optimizer.lr=nan"), ("optimizer.lr", "nan")),
    Case("config_unknown_preset", lambda ctx: [*ctx.train(ctx.real)[:-4], "--preset", "turbo"], ("turbo",)),
    Case("config_file_missing", lambda ctx: ctx.train(ctx.real, "--config", str(ctx.tmp / "nope.yaml")),
         ("nope.yaml", "no such")),
    Case("config_file_malformed", config_file("optimizer: {lr: [\n"), ("config.yaml",)),
    Case("config_file_not_utf8", config_file(b"optimizer:\n  lr: 0.1 # \xff\n"), ("config.yaml", "not UTF-8")),
    Case("usage_unknown_flag", lambda ctx: ctx.train(ctx.real, "--learning-rate", "0.1"),
         ("unrecognized arguments", "--learning-rate")),
    # URIs
    Case("uri_unsupported_scheme", lambda ctx: ctx.fetch("ftp://example.org/data.zip"), ("ftp://example.org", "unsupported")),
    Case("uri_local_path_missing", lambda ctx: ctx.fetch(ctx.tmp / "nowhere"), ("nowhere",)),
    Case("uri_http_404", http_404, ("/missing.tar.gz", "404")),
    Case("uri_http_connection_refused", http_refused, ("http://127.0.0.1:", "data.zip")),
    Case("uri_checksum_malformed", lambda ctx: ctx.fetch(ctx.real, "--checksum", "md5:zz"), ("md5:zz",)),
    Case("uri_checksum_mismatch", checksum_mismatch, ("data.bin", "sha256")),
    Case("uri_usim_without_run", lambda ctx: ctx.fetch("usim://only-a-project"), ("usim://only-a-project",)),
    Case("uri_checkpoint_missing", lambda ctx: ["evaluate", "--checkpoint", str(ctx.tmp / "gone.pt"), "--data",
                                                str(ctx.real), "--out", str(ctx.out / "eval")], ("gone.pt",)),
    # Archives
    Case("tar_cut_at_a_member_boundary", cut_tar_at_member_boundary, ("cut.tar", "end-of-archive", "cut short")),
    Case("tar_cut_inside_a_member", cut_tar_inside_a_member, ("cut.tar", "data/f05.txt")),
    Case("tgz_cut", cut_tgz, ("cut.tar.gz", "truncated")),
    Case("tgz_of_a_tar_cut_at_a_member_boundary", tgz_of_a_cut_tar, ("inner-cut.tgz", "end-of-archive")),
    Case("zip_duplicate_members", zip_with_duplicates, ("dup.zip", "data/labels.json", "duplicate")),
    Case("tar_duplicate_members", tar_with_duplicates, ("dup.tar", "data/labels.json", "duplicate")),
    Case("archive_over_the_member_limit", too_many_members, ("many.tar", "limit of 5 members", "--max-extract-members")),
    Case("archive_over_the_byte_limit", too_many_bytes, ("big.tar", "4000")),
    Case("archive_absolute_member", absolute_member, ("abs.tar", "/etc/synthval-evil", "absolute")),
    Case("archive_symlink_out", escaping_symlink, ("link.tar", "data/link", "outside the destination")),
    Case("archive_device_member", device_member, ("dev.tar", "data/null", "device")),
    Case("archive_not_a_zip", not_a_zip, ("fake.zip", "corrupt")),
    # Outputs
    Case("output_is_an_existing_file", output_is_a_file, ("taken", "--out", "is a file, not a folder")),
    Case("checkpoint_dir_below_a_file", checkpoint_dir_below_a_file, ("afile", "--checkpoint-dir", "is a file")),
    Case("tb_log_dir_is_a_file", tb_log_dir_is_a_file, ("tb-file", "--tb-log-dir", "is a file")),
    Case("xcom_file_is_a_folder", xcom_file_is_a_folder, ("xcom-folder", "--xcom-file", "is a folder")),
    Case("xcom_file_dev_full", xcom_to_a_full_device, ("/dev/full", "No space left on device")),
    Case("report_out_is_a_folder", report_out_is_a_folder, ("page.html", "--out", "is a folder")),
    Case("output_on_a_read_only_disk", read_only_output, ("Read-only file system",)),
    Case("output_on_a_full_disk", full_disk_output, ("No space left on device",)),
]


@pytest.fixture(scope="module")
def clean_sets(tmp_path_factory, clean_real) -> dict[str, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("clean-sets")
    synth = Path(generate_dataset("synthetic", str(root / "synth"), num_images=6, image_size=64, seed=3)["dataset_uri"])
    coco = root / "coco"
    (coco / "images").mkdir(parents=True)
    doc = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "can"}, {"id": 2, "name": "box"}]}
    for k in range(3):
        Image.new("RGB", (64, 48), (40 * k, 90, 120)).save(coco / "images" / f"img{k}.png")
        doc["images"].append({"id": k, "file_name": f"img{k}.png", "width": 64, "height": 48})
        doc["annotations"].append({"id": k, "image_id": k, "category_id": 1 + k % 2, "bbox": [4, 5, 20, 18],
                                   "area": 360, "iscrowd": 0})
    (coco / "ds.json").write_text(json.dumps(doc))
    return {"real": clean_real, "synth": synth, "coco": coco}


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_bad_input_exits_2_with_one_line_naming_it_and_writes_nothing(case, clean_sets, tmp_path, capsys,
                                                                      http_server):
    ctx = Ctx(tmp=tmp_path, real=_copy(clean_sets["real"], tmp_path / "real"),
              synth=_copy(clean_sets["synth"], tmp_path / "synth"),
              coco=_copy(clean_sets["coco"], tmp_path / "coco") / "ds.json", out=tmp_path / "out", http=http_server)
    ctx.xcom = tmp_path / "xcom.json"
    try:
        argv = case.build(ctx)
        capsys.readouterr()
        code = main([*argv, "--xcom-file", str(ctx.xcom)])
        err = capsys.readouterr().err
    finally:
        while MOUNTS:
            mounted_point = MOUNTS.pop()
            # Nothing half-written on the read-only or full disk either (fetch's lock file stays, as locks do).
            leftovers = sorted(str(p.relative_to(mounted_point)) for p in mounted_point.rglob("*")
                               if not p.name.endswith(".synthval-fetch.lock"))
            subprocess.run(["umount", str(mounted_point)], check=True)
            assert not leftovers, leftovers
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for word in case.named:
        assert word in errors[0], (word, errors[0])
    assert not ctx.out.exists(), sorted(str(p) for p in ctx.out.rglob("*"))
    assert ctx.xcom in (Path("/dev/full"),) or not ctx.xcom.is_file()


def test_the_corpus_covers_every_kind_of_bad_input():
    assert len(CORPUS) + len(CASES) >= 60
    kinds = {"dataset": 0, "predictions": 0, "config": 0, "uri": 0, "archive": 0, "output": 0}
    for case in CORPUS:
        name = case.name
        kind = ("predictions" if name.startswith("predictions") else "config" if name.startswith(("config", "usage"))
                else "uri" if name.startswith("uri") else "archive" if name.startswith(("tar", "tgz", "zip", "archive"))
                else "output" if any(w in name for w in ("output", "xcom", "dir", "report_out")) else "dataset")
        kinds[kind] += 1
    assert all(count >= 6 for count in kinds.values()), kinds
