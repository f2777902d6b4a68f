"""`synthval fetch` against real servers on loopback: the HTTP fixture server and the GCS emulator.

Archives are built here by the tests; hostile ones are made with tarfile/zipfile directly.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
from ports import free_port

from synthval.io import http, storage, usim
from synthval.cli import main
from synthval.errors import FetchError
from synthval.io.sources import MARKER_NAME, NAMED_SOURCES, materialize, resolve_source
from synthval.steps.fetch import run_fetch

FAST = {"retry_delay": 0.001}
SHARED_MANIFEST = Path(__file__).resolve().parents[1].parent / "shared/fixtures/perception-0.0.1/usim_manifest.csv"
DATASET = {
    "Dataset/annotation_definitions.json": b'{"annotation_definitions": []}',
    "Dataset/captures_000.json": b'{"captures": []}',
    "RGB/rgb_1.png": b"\x89PNG fake image one",
    "RGB/rgb_2.png": b"\x89PNG fake image two",
}


# --- archive builders --------------------------------------------------------------------------


def zip_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return buf.getvalue()


def tar_end(data: bytes) -> int:
    """Where the end-of-archive blocks of an uncompressed tar start (after its last member)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        last = tar.getmembers()[-1]
    return last.offset_data + (last.size + 511) // 512 * 512


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz", extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tf.addfile(info)
    return buf.getvalue()


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and p.name != MARKER_NAME}


def leftovers(folder: Path) -> list[str]:
    """Everything under `folder` except the (empty) lock files fetch keeps beside destinations."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.name.endswith(".lock"))


def get_requests(server, path):
    return [r for r in server.requests_for(path) if r.method == "GET"]


# --- http: extraction, plain files ---------------------------------------------------------------


@pytest.mark.parametrize("name,build", [
    ("data.zip", lambda: zip_bytes(DATASET)),
    ("data.tar.gz", lambda: tar_bytes(DATASET, "w:gz")),
    ("data.tgz", lambda: tar_bytes(DATASET, "w:gz")),
    ("data.tar", lambda: tar_bytes(DATASET, "w")),
    ("data.tar.bz2", lambda: tar_bytes(DATASET, "w:bz2")),
    ("data.tar.xz", lambda: tar_bytes(DATASET, "w:xz")),
    # Go's archive/tar and bsdtar end with the two zero blocks only, not padded to a 10 KiB record.
    ("short-end.tar", lambda: tar_bytes(DATASET, "w")[:tar_end(tar_bytes(DATASET, "w")) + 1024]),
])
def test_http_archive_is_extracted(http_server, tmp_path, name, build):
    url = http_server.serve(f"/{name}", build())
    out = tmp_path / "out"
    result = run_fetch(url, str(out), **FAST)
    assert result == {"dataset_uri": str(out), "files": len(DATASET), "cached": False}
    assert tree(out) == DATASET
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["source"] == url and marker["complete"] is True and marker["checksum"] is None
    assert leftovers(tmp_path) == sorted(["out", *(f"out/{p}" for p in ("Dataset", "RGB", MARKER_NAME)),
                                          *(f"out/{p}" for p in DATASET)])


def test_plain_file_is_kept_with_its_name(http_server, tmp_path):
    url = http_server.serve("/models/Real-World/FasterRCNN.estimator", b"PK\x03\x04 a torch zip checkpoint")
    result = run_fetch(url, str(tmp_path / "model"), **FAST)
    assert result["file_uri"] == str(tmp_path / "model" / "FasterRCNN.estimator")
    assert Path(result["file_uri"]).read_bytes().startswith(b"PK")  # not mistaken for a zip archive


def test_no_extract_keeps_the_archive(http_server, tmp_path):
    url = http_server.serve("/d.zip", zip_bytes(DATASET))
    result = run_fetch(url, str(tmp_path / "out"), extract=False, **FAST)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(["d.zip", MARKER_NAME])
    assert result["file_uri"].endswith("d.zip")


# --- http: retries and resume -----------------------------------------------------------------------


def test_resume_after_a_dropped_connection(http_server, tmp_path):
    body = os.urandom(3 * 2**20 + 123)
    url = http_server.serve("/big.bin", body, drop_after=2**20 + 7)
    result = run_fetch(url, str(tmp_path / "out"), **FAST)
    assert Path(result["file_uri"]).read_bytes() == body
    first, second = get_requests(http_server, "/big.bin")
    assert first.header("Range") is None
    assert second.header("Range") == f"bytes={2**20 + 7}-"
    assert second.header("If-Range") == http_server.routes["/big.bin"].etag


def test_a_server_that_ignores_range_restarts_cleanly(http_server, tmp_path):
    body = os.urandom(2**20 + 99)
    url = http_server.serve("/big.bin", body, drop_after=500_000, ignore_range=True)
    result = run_fetch(url, str(tmp_path / "out"), **FAST)
    assert Path(result["file_uri"]).read_bytes() == body  # not the first half twice
    assert get_requests(http_server, "/big.bin")[1].header("Range") == "bytes=500000-"


def test_a_failed_run_is_resumed_by_the_next_run(http_server, tmp_path):
    body = os.urandom(2**20)
    url = http_server.serve("/big.bin", body, drop_after=300_000)
    out = tmp_path / "out"
    with pytest.raises(FetchError, match="gave up after 0 retries"):
        run_fetch(url, str(out), retries=0, **FAST)
    assert not out.exists()  # a half fetch is never taken as done
    result = run_fetch(url, str(out), retries=0, **FAST)
    assert Path(result["file_uri"]).read_bytes() == body
    assert get_requests(http_server, "/big.bin")[1].header("Range") == "bytes=300000-"
    assert leftovers(tmp_path) == ["out", f"out/{MARKER_NAME}", "out/big.bin"]


def test_503_then_success_is_retried(http_server, tmp_path, caplog):
    url = http_server.serve("/d.zip", zip_bytes(DATASET), fail=[503, 502])
    with caplog.at_level(logging.WARNING, logger="synthval.io.http"):
        run_fetch(url, str(tmp_path / "out"), **FAST)
    assert tree(tmp_path / "out") == DATASET
    assert len(get_requests(http_server, "/d.zip")) == 3
    assert "HTTP 503" in caplog.text and "retry 2 of 5" in caplog.text


def test_persistent_5xx_gives_up_naming_uri_and_status(http_server, tmp_path):
    url = http_server.serve("/d.zip", b"x", fail=[503] * 10)
    with pytest.raises(FetchError) as err:
        run_fetch(url, str(tmp_path / "out"), retries=2, **FAST)
    assert url in str(err.value) and "HTTP 503" in str(err.value) and "after 2 retries" in str(err.value)
    assert len(get_requests(http_server, "/d.zip")) == 3
    assert leftovers(tmp_path) == []


def test_404_fails_at_once_naming_uri_and_status(http_server, tmp_path):
    url = http_server.url("/no/such.zip")
    with pytest.raises(FetchError, match=rf"{url}: HTTP 404"):
        run_fetch(url, str(tmp_path / "out"), **FAST)
    assert len(http_server.requests_for("/no/such.zip")) == 1  # retrying cannot make it appear
    assert leftovers(tmp_path) == []


def test_connection_refused_names_the_uri(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/d.zip"
    with pytest.raises(FetchError, match=rf"{url}: cannot connect .*refused.*after 2 retries"):
        run_fetch(url, str(tmp_path / "out"), retries=2, **FAST)


def test_progress_lines_carry_bytes_rate_and_eta(http_server, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(http, "PROGRESS_INTERVAL_S", 0.0)
    monkeypatch.setattr(http, "CHUNK", 64 * 1024)
    url = http_server.serve("/big.bin", os.urandom(2**20))
    with caplog.at_level(logging.INFO, logger="synthval.io.http"):
        run_fetch(url, str(tmp_path / "out"), **FAST)
    assert any("of 1.0 MiB" in m and "/s, ETA" in m for m in caplog.messages)


# --- checksums ---------------------------------------------------------------------------------------


def digests(data: bytes) -> dict[str, str]:
    return {"crc32": f"crc32:{zlib.crc32(data):08x}", "md5": f"md5:{hashlib.md5(data).hexdigest()}",
            "sha256": f"sha256:{hashlib.sha256(data).hexdigest()}"}


@pytest.mark.parametrize("algorithm", ["crc32", "md5", "sha256"])
def test_checksum_match(http_server, tmp_path, algorithm):
    data = zip_bytes(DATASET)
    url = http_server.serve("/d.zip", data)
    hex_upper = digests(data)[algorithm].split(":")[1].upper()  # hex digits in either case
    run_fetch(url, str(tmp_path / "out"), checksum=f"{algorithm}:{hex_upper}", **FAST)
    assert tree(tmp_path / "out") == DATASET
    assert json.loads((tmp_path / "out" / MARKER_NAME).read_text())["checksum"] == digests(data)[algorithm]


@pytest.mark.parametrize("algorithm", ["crc32", "md5", "sha256"])
def test_checksum_mismatch_leaves_nothing(http_server, tmp_path, algorithm):
    data = zip_bytes(DATASET)
    url = http_server.serve("/d.zip", data)
    wrong = digests(b"something else")[algorithm]
    with pytest.raises(FetchError) as err:
        run_fetch(url, str(tmp_path / "out"), checksum=wrong, **FAST)
    message = str(err.value)
    assert url in message and f"expected {wrong}" in message and f"got {digests(data)[algorithm]}" in message
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("bad", ["sha1:abcd", "md5:xyz", "md5:1234", "crc32", "crc32:123456789"])
def test_malformed_checksum_is_refused_before_any_request(http_server, tmp_path, bad):
    url = http_server.serve("/d.zip", b"x")
    with pytest.raises(FetchError, match="checksum"):
        run_fetch(url, str(tmp_path / "out"), checksum=bad, **FAST)
    assert http_server.requests == []


# --- hostile archives --------------------------------------------------------------------------------


HOSTILE = {
    "zip-dotdot": ("evil.zip", lambda: zip_bytes({"ok.txt": b"ok", "../evil.txt": b"pwned"}), "../evil.txt"),
    "zip-nested-dotdot": ("evil.zip", lambda: zip_bytes({"a/../../evil.txt": b"x"}), "a/../../evil.txt"),
    "zip-absolute": ("evil.zip", lambda: zip_bytes({"/tmp/evil.txt": b"x"}), "/tmp/evil.txt"),
    "zip-symlink-escape": ("evil.zip", lambda: zip_bytes({}, symlinks={"link": "../../outside"}), "link"),
    "tar-dotdot": ("evil.tar.gz", lambda: tar_bytes({"../evil.txt": b"x"}), "../evil.txt"),
    "tar-absolute": ("evil.tar", lambda: tar_bytes({"/etc/evil.txt": b"x"}, "w"), "/etc/evil.txt"),
    "tar-symlink-escape": ("evil.tgz", lambda: tar_bytes(
        {}, extra=[tar_entry("escape", tarfile.SYMTYPE, "../../../etc")]), "escape"),
    "tar-symlink-absolute": ("evil.tgz", lambda: tar_bytes(
        {}, extra=[tar_entry("passwd", tarfile.SYMTYPE, "/etc/passwd")]), "passwd"),
    "tar-hardlink-escape": ("evil.tgz", lambda: tar_bytes(
        {}, extra=[tar_entry("hard", tarfile.LNKTYPE, "../../etc/passwd")]), "hard"),
    "tar-device": ("evil.tgz", lambda: tar_bytes({}, extra=[tar_entry("dev", tarfile.CHRTYPE)]), "dev"),
    "tar-fifo": ("evil.tgz", lambda: tar_bytes({}, extra=[tar_entry("fifo", tarfile.FIFOTYPE)]), "fifo"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused_naming_the_member(http_server, tmp_path, case):
    name, build, member = HOSTILE[case]
    url = http_server.serve(f"/{name}", build())
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(FetchError) as err:
        run_fetch(url, str(work / "out"), **FAST)
    assert repr(member) in str(err.value) and "refusing the archive" in str(err.value)
    assert leftovers(work) == []  # nothing half-extracted, nothing written outside
    assert leftovers(tmp_path) == ["work"]


def test_links_inside_the_archive_are_kept(http_server, tmp_path):
    archive = tar_bytes({"data/a.txt": b"A"}, extra=[tar_entry("data/alias.txt", tarfile.SYMTYPE, "a.txt"),
                                                     tar_entry("copy.txt", tarfile.LNKTYPE, "data/a.txt")])
    url = http_server.serve("/links.tgz", archive)
    out = tmp_path / "out"
    run_fetch(url, str(out), **FAST)
    assert os.readlink(out / "data" / "alias.txt") == "a.txt"
    assert (out / "data" / "alias.txt").read_bytes() == b"A" and (out / "copy.txt").read_bytes() == b"A"


def test_tar_members_pass_through_the_standard_librarys_data_filter(http_server, tmp_path, monkeypatch):
    """Extraction is tarfile's own, behind its "data" filter (PEP 706); the filter sees every member and what
    it returns is what is written (here: no setuid bit, no group or world write)."""
    seen = []
    real_filter = tarfile.data_filter

    def spying(member, dest):
        seen.append(member.name)
        return real_filter(member, dest)

    monkeypatch.setattr(tarfile, "data_filter", spying)
    setuid = tar_entry("data/tool", tarfile.REGTYPE)
    setuid.mode, setuid.size = 0o6777, 0
    archive = tar_bytes({"data/a.txt": b"A"}, extra=[setuid, tar_entry("data/alias.txt", tarfile.SYMTYPE, "a.txt")])
    url = http_server.serve("/filtered.tgz", archive)
    run_fetch(url, str(tmp_path / "out"), **FAST)
    assert seen == ["data/a.txt", "data/tool", "data/alias.txt"]
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "data" / "tool").st_mode) == 0o755


def test_a_link_rerouted_by_a_later_link_is_caught(http_server, tmp_path):
    # "up" -> "b/.." looks inside while b does not exist; b -> "." then makes "up" the parent folder.
    archive = tar_bytes({}, extra=[tar_entry("up", tarfile.SYMTYPE, "b/.."), tar_entry("b", tarfile.SYMTYPE, ".")])
    url = http_server.serve("/reroute.tgz", archive)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(FetchError, match="'up'.*outside"):
        run_fetch(url, str(work / "out"), **FAST)
    assert leftovers(work) == []


def test_zip_bomb_refused_by_declared_size_before_writing(http_server, tmp_path):
    url = http_server.serve("/bomb.zip", zip_bytes({"small.txt": b"s", "zeros.bin": b"\0" * 5_000_000}))
    with pytest.raises(FetchError, match=r"'zeros.bin'.*over the limit of 1000000.*archive bomb"):
        run_fetch(url, str(tmp_path / "out"), max_extract_bytes=1_000_000, **FAST)
    assert leftovers(tmp_path) == []


def test_tar_bomb_refused_member_by_member(http_server, tmp_path):
    members = {f"part{i}.bin": b"\0" * 400_000 for i in range(5)}
    url = http_server.serve("/bomb.tar.gz", tar_bytes(members))
    with pytest.raises(FetchError, match=r"'part2.bin'.*over the limit of 1000000"):
        run_fetch(url, str(tmp_path / "out"), max_extract_bytes=1_000_000, **FAST)
    assert leftovers(tmp_path) == []


def test_member_count_limit(http_server, tmp_path):
    url = http_server.serve("/many.zip", zip_bytes({f"f{i}": b"" for i in range(10)}))
    with pytest.raises(FetchError, match=r"'f5'.*limit of 5 members"):
        run_fetch(url, str(tmp_path / "out"), max_extract_members=5, **FAST)


def test_zip_lying_about_its_size_is_refused(http_server, tmp_path):
    data = bytearray(zip_bytes({"payload.bin": b"\0" * 100_000}))
    # Shrink the declared uncompressed size in both the local and the central header to 10 bytes.
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.index(signature) + offset
        data[at:at + 4] = (10).to_bytes(4, "little")
    url = http_server.serve("/liar.zip", bytes(data))
    with pytest.raises(FetchError, match="liar.zip"):
        run_fetch(url, str(tmp_path / "out"), **FAST)
    assert leftovers(tmp_path) == []


def test_corrupt_archive_is_a_fetch_error(http_server, tmp_path):
    url = http_server.serve("/broken.zip", b"PK\x03\x04 definitely not a zip")
    with pytest.raises(FetchError, match="broken.zip: corrupt or truncated archive"):
        run_fetch(url, str(tmp_path / "out"), **FAST)
    assert leftovers(tmp_path) == []


# --- idempotency and the destination ----------------------------------------------------------------


def test_second_fetch_makes_no_request(http_server, tmp_path):
    url = http_server.serve("/d.zip", zip_bytes(DATASET))
    first = run_fetch(url, str(tmp_path / "out"), **FAST)
    count = len(http_server.requests)
    second = run_fetch(url, str(tmp_path / "out"), **FAST)
    assert len(http_server.requests) == count
    assert second == {**first, "cached": True}


def test_changed_checksum_or_source_fetches_again(http_server, tmp_path):
    data = zip_bytes(DATASET)
    url = http_server.serve("/d.zip", data)
    out = tmp_path / "out"
    run_fetch(url, str(out), **FAST)
    run_fetch(url, str(out), checksum=digests(data)["md5"], **FAST)
    assert len(get_requests(http_server, "/d.zip")) == 2
    other = http_server.serve("/other.zip", zip_bytes({"only.txt": b"new"}))
    run_fetch(other, str(out), **FAST)
    assert tree(out) == {"only.txt": b"new"}  # replaced whole, nothing of the old dataset left
    assert leftovers(tmp_path) == ["out", f"out/{MARKER_NAME}", "out/only.txt"]


def test_foreign_non_empty_destination_is_not_overwritten(http_server, tmp_path):
    url = http_server.serve("/d.zip", zip_bytes(DATASET))
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FetchError, match="not empty and was not written by synthval fetch"):
        run_fetch(url, str(out), **FAST)
    assert (out / "precious.txt").read_text() == "keep me"
    assert http_server.requests == []
    (out / "precious.txt").unlink()
    run_fetch(url, str(out), **FAST)  # an empty folder is fine
    assert tree(out) == DATASET


def test_local_sources(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    (tmp_path / "d.zip").write_bytes(zip_bytes(DATASET))
    assert run_fetch(str(src), str(tmp_path / "copy"))["files"] == 1
    run_fetch(f"file://{tmp_path / 'd.zip'}", str(tmp_path / "unzipped"))
    assert tree(tmp_path / "unzipped") == DATASET
    with pytest.raises(FetchError, match="not a named source"):
        run_fetch("groceries-rael", str(tmp_path / "typo"))


# --- named sources -----------------------------------------------------------------------------------


def test_named_sources_resolve_to_the_seed_urls():
    base = "https://storage.googleapis.com/datasetinsights"
    assert resolve_source("groceries-real") == f"{base}/data/groceries/v3.zip"
    assert resolve_source("synthdet-sample") == f"{base}/data/synthetic/SynthDet.zip"
    assert resolve_source("real-world-760") == f"{base}/models/Real-World/FasterRCNN.estimator"
    assert resolve_source("synthetic-400k") == f"{base}/models/Synthetic/FasterRCNN.estimator"
    for n in (76, 380, 760):
        assert resolve_source(f"synthetic-and-real-{n}") == \
            f"{base}/models/Synthetic-And-Real-World-{n}-images/FasterRCNN.estimator"
    assert resolve_source("gs://b/x") == "gs://b/x"
    assert {v["kind"] for v in NAMED_SOURCES.values()} == {"dataset", "model"}
    # The seed's CRC32 values (decimal in datasetinsights), as crc32:HEX.
    assert int(NAMED_SOURCES["groceries-real"]["checksum"].split(":")[1], 16) == 2322380006
    assert int(NAMED_SOURCES["synthdet-sample"]["checksum"].split(":")[1], 16) == 390326588


def test_named_source_fetch_uses_its_checksum(http_server, tmp_path, monkeypatch):
    data = zip_bytes(DATASET)
    url = http_server.serve("/datasetinsights/data/groceries/v3.zip", data)
    entry = {**NAMED_SOURCES["groceries-real"], "url": url, "checksum": digests(data)["crc32"]}
    monkeypatch.setitem(NAMED_SOURCES, "groceries-real", entry)
    result = run_fetch("groceries-real", str(tmp_path / "real"), **FAST)
    assert tree(Path(result["dataset_uri"])) == DATASET
    monkeypatch.setitem(NAMED_SOURCES, "groceries-real", {**entry, "checksum": "crc32:00000000"})
    with pytest.raises(FetchError, match="checksum mismatch: expected crc32:00000000"):
        run_fetch("groceries-real", str(tmp_path / "real2"), **FAST)


# --- gs:// -----------------------------------------------------------------------------------------------


def test_gs_object_archive_is_fetched_and_extracted(gcs_emulator, tmp_path):
    data = zip_bytes(DATASET)
    uri = gcs_emulator.uri("data/groceries/v3.zip")
    storage.write_bytes(uri, data)
    result = run_fetch(uri, str(tmp_path / "out"), checksum=digests(data)["sha256"])
    assert tree(tmp_path / "out") == DATASET and result["files"] == len(DATASET)


def test_gs_prefix_is_fetched_whole(gcs_emulator, tmp_path):
    for rel, data in DATASET.items():
        storage.write_bytes(gcs_emulator.uri(f"synth/run1/{rel}"), data)
    storage.write_bytes(gcs_emulator.uri("synth/run10/not-this.txt"), b"x")
    run_fetch(gcs_emulator.uri("synth/run1"), str(tmp_path / "out"))
    assert tree(tmp_path / "out") == DATASET
    with pytest.raises(FetchError, match="single file"):
        run_fetch(gcs_emulator.uri("synth/run1"), str(tmp_path / "out2"), checksum="md5:" + "0" * 32)


def test_gs_missing_object_names_the_uri(gcs_emulator, tmp_path):
    uri = gcs_emulator.uri("nothing/here.zip")
    with pytest.raises(FetchError, match=f"{uri}: no such object or prefix"):
        run_fetch(uri, str(tmp_path / "out"))


def test_fetch_into_a_gs_destination(http_server, gcs_emulator):
    url = http_server.serve("/d.tar.gz", tar_bytes(DATASET))
    out = gcs_emulator.uri("runs/r1/data/synthetic")
    result = run_fetch(url, out, **FAST)
    assert result["dataset_uri"] == out
    assert sorted(storage.relative_files(out)) == sorted([*DATASET, MARKER_NAME])
    assert storage.read_bytes(f"{out}/RGB/rgb_2.png") == DATASET["RGB/rgb_2.png"]
    assert storage.read_json(f"{out}/{MARKER_NAME}")["complete"] is True
    requests = len(http_server.requests)
    assert run_fetch(url, out, **FAST)["cached"] is True
    assert len(http_server.requests) == requests
    # A different source replaces the prefix whole.
    other = http_server.serve("/o.zip", zip_bytes({"only.txt": b"new"}))
    run_fetch(other, out, **FAST)
    assert sorted(storage.relative_files(out)) == sorted(["only.txt", MARKER_NAME])


def test_gs_destination_with_foreign_objects_is_refused(http_server, gcs_emulator):
    out = gcs_emulator.uri("someone/else")
    storage.write_text(f"{out}/theirs.txt", "keep")
    with pytest.raises(FetchError, match="not written by synthval fetch"):
        run_fetch(http_server.serve("/d.zip", zip_bytes(DATASET)), out, **FAST)
    assert storage.read_text(f"{out}/theirs.txt") == "keep"


# --- usim:// -----------------------------------------------------------------------------------------------

TOKEN = "usim-secret-token-3f9a"


def serve_usim_run(server, project="proj-1", run="runA") -> dict[str, bytes]:
    """Serve the seed's sample manifest (pointing at this server) and its files; return {file_name: body}."""
    if not SHARED_MANIFEST.is_file():
        pytest.skip(f"shared fixture missing: {SHARED_MANIFEST}")
    with open(SHARED_MANIFEST, newline="") as f:
        rows = list(csv.DictReader(f))
    bodies = {}
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), quoting=csv.QUOTE_ALL)
    writer.writeheader()
    for row in rows:
        path = "/files/" + row["file_name"] + "?X-Goog-Signature=abc123"
        row["download_uri"] = server.url(path)
        bodies[row["file_name"]] = f"content of {row['file_name']}".encode()
        server.serve(path.split("?")[0], bodies[row["file_name"]])
        writer.writerow(row)
    # A failed first attempt of instance 1: its file must not be downloaded.
    stale = {**rows[0], "attempt_id": "0", "file_name": "Dataset/stale_attempt.json",
             "download_uri": server.url("/files/stale")}
    writer.writerow(stale)
    server.serve(f"/v1/projects/{project}/runs/{run}/data", out.getvalue(), content_type="text/csv", token=TOKEN)
    return bodies


def test_usim_run_is_downloaded_by_its_manifest(http_server, tmp_path, caplog):
    bodies = serve_usim_run(http_server)
    out = tmp_path / "simrun"
    with caplog.at_level(logging.DEBUG):
        result = run_fetch("usim://proj-1/runA", str(out), usim_token=TOKEN, usim_api=http_server.base_url, **FAST)
    assert tree(out) == bodies
    assert result["files"] == len(bodies)
    manifest_request, = get_requests(http_server, "/v1/projects/proj-1/runs/runA/data")
    assert manifest_request.header("Authorization") == f"Bearer {TOKEN}"
    file_requests = [r for r in http_server.requests if r.path.startswith("/files/")]
    assert len(file_requests) == len(bodies)  # the stale attempt was skipped
    assert all(r.header("Authorization") is None for r in file_requests)  # the token stays with the API
    assert TOKEN not in caplog.text and TOKEN not in json.dumps(result)
    assert TOKEN not in (out / MARKER_NAME).read_text()
    assert "X-Goog-Signature" not in caplog.text  # signed URLs are redacted in logs


def test_usim_wrong_token_is_a_clear_error(http_server, tmp_path, caplog):
    serve_usim_run(http_server)
    wrong = "not-the-token-77"
    with caplog.at_level(logging.DEBUG), pytest.raises(FetchError) as err:
        run_fetch("usim://proj-1/runA", str(tmp_path / "out"), usim_token=wrong, usim_api=http_server.base_url,
                  **FAST)
    assert "refused the access token" in str(err.value) and "HTTP 401" in str(err.value)
    assert wrong not in str(err.value) and wrong not in caplog.text
    assert not (tmp_path / "out").exists()


def test_usim_token_only_as_an_argument(tmp_path):
    with pytest.raises(FetchError, match="token is needed"):
        run_fetch("usim://proj-1/runA", str(tmp_path / "out"))
    with pytest.raises(FetchError) as err:
        run_fetch(f"usim://{TOKEN}@proj-1/runA", str(tmp_path / "out"))
    assert "must not carry the access token" in str(err.value) and TOKEN not in str(err.value)
    with pytest.raises(FetchError, match="expected usim://PROJECT_ID/RUN_EXECUTION_ID"):
        run_fetch("usim://just-a-project", str(tmp_path / "out"), usim_token=TOKEN)


def test_usim_hostile_manifest_is_refused(http_server, tmp_path):
    manifest = ('"run_execution_id","app_param_id","instance_id","attempt_id","file_name","download_uri"\n'
                f'"r","a","1","1","../../escape.json","{http_server.url("/f")}"\n')
    http_server.serve("/v1/projects/p/runs/r/data", manifest, token=TOKEN)
    with pytest.raises(FetchError, match="'../../escape.json'"):
        run_fetch("usim://p/r", str(tmp_path / "out"), usim_token=TOKEN, usim_api=http_server.base_url, **FAST)
    local = ('"run_execution_id","app_param_id","instance_id","attempt_id","file_name","download_uri"\n'
             '"r","a","1","1","x.json","file:///etc/passwd"\n')
    http_server.serve("/v1/projects/p/runs/r2/data", local, token=TOKEN)
    with pytest.raises(FetchError, match="not an http"):
        run_fetch("usim://p/r2", str(tmp_path / "out"), usim_token=TOKEN, usim_api=http_server.base_url, **FAST)
    assert leftovers(tmp_path) == []  # nor the manifest with its pre-signed URLs


# --- materialize --------------------------------------------------------------------------------------------


def test_materialize(http_server, gcs_emulator, tmp_path):
    cache = tmp_path / "cache"
    assert materialize(str(tmp_path / "local"), str(cache)) == str(tmp_path / "local")
    assert materialize(f"file://{tmp_path}/x", str(cache)) == f"{tmp_path}/x"
    model_url = http_server.serve("/m/FasterRCNN.estimator", b"weights")
    path = materialize(model_url, str(cache), retry_delay=0.001)
    assert path.endswith("FasterRCNN.estimator") and Path(path).read_bytes() == b"weights"
    requests = len(http_server.requests)
    assert materialize(model_url, str(cache)) == path and len(http_server.requests) == requests
    folder = materialize(http_server.serve("/d.zip", zip_bytes(DATASET)), str(cache), retry_delay=0.001)
    assert tree(Path(folder)) == DATASET
    for rel, data in DATASET.items():
        storage.write_bytes(gcs_emulator.uri(f"ds/{rel}"), data)
    folder = materialize(gcs_emulator.uri("ds"), str(cache))
    assert tree(Path(folder)) == DATASET and folder.startswith(str(cache))


# --- the CLI ---------------------------------------------------------------------------------------------------


def test_cli_fetch_writes_the_xcom(http_server, tmp_path, capsys):
    url = http_server.serve("/d.zip", zip_bytes(DATASET))
    xcom = tmp_path / "xcom" / "return.json"
    out = tmp_path / "data"
    assert main(["fetch", url, "--out", str(out), "--xcom-file", str(xcom)]) == 0
    assert json.loads(xcom.read_text())["dataset_uri"] == str(out)
    assert tree(out) == DATASET


def test_cli_checksum_mismatch_exits_2(http_server, tmp_path, capsys):
    url = http_server.serve("/d.zip", zip_bytes(DATASET))
    xcom = tmp_path / "x.json"
    code = main(["fetch", url, "--out", str(tmp_path / "data"), "--checksum", "md5:" + "0" * 32,
                 "--xcom-file", str(xcom)])
    err = capsys.readouterr().err
    assert code == 2 and url in err and "checksum mismatch" in err
    assert not xcom.exists() and not (tmp_path / "data").exists()


def test_cli_unreachable_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(http, "DEFAULT_RETRY_DELAY_S", 0.001)
    url = f"http://127.0.0.1:{free_port()}/v3.zip"
    code = main(["fetch", url, "--out", str(tmp_path / "data"), "--retries", "1",
                 "--xcom-file", str(tmp_path / "x.json")])
    err = capsys.readouterr().err
    assert code == 2 and url in err and "cannot connect" in err


def test_cli_usim_token_from_env_never_on_the_command_line(http_server, tmp_path, monkeypatch, capsys):
    bodies = serve_usim_run(http_server)
    monkeypatch.setattr(usim, "USIM_API_BASE", http_server.base_url)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.setenv("USIM_ACCESS_TOKEN_FILE", str(token_file))
    xcom = tmp_path / "x.json"
    assert main(["fetch", "usim://proj-1/runA", "--out", str(tmp_path / "run"), "--xcom-file", str(xcom)]) == 0
    assert tree(tmp_path / "run") == bodies
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + xcom.read_text()


def test_generate_source_makes_demo_data_once(tmp_path):
    out = tmp_path / "synthetic"
    source = "generate://synthetic?num_images=4&image_size=64&seed=3"
    first = run_fetch(source, str(out))
    assert first["dataset_uri"] == str(out) and first["files"] == 4
    stamp = (out / "_SUCCESS").stat().st_mtime_ns
    again = run_fetch(source, str(out))  # a retried fetch task finds the finished dataset
    assert again["dataset_uri"] == str(out) and (out / "_SUCCESS").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("source, named", [
    ("generate://synthetic?num_imgs=4", "num_imgs"),
    ("generate://synthetic?num_images=four", "num_images"),
    ("generate://synthetic", "num_images"),
])
def test_generate_source_rejects_bad_parameters(tmp_path, source, named):
    with pytest.raises(FetchError, match=named):
        run_fetch(source, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
