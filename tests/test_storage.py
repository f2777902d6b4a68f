"""URI storage against real backends: the local disk, the GCS emulator, a loopback HTTP server."""

import os
import stat

import pytest

from synthval.io import storage
from synthval.errors import FetchError


def test_local_plain_and_file_uri_round_trip(tmp_path):
    target = tmp_path / "a" / "b.json"
    storage.write_json(f"file://{target}", {"x": 1})
    assert storage.read_json(str(target)) == {"x": 1}
    assert storage.exists(str(target)) and storage.exists(f"file://{target}")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]  # no temporary left behind


def test_local_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), storage.atomic_output(str(target)) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_read_missing_and_malformed_name_the_uri(tmp_path):
    with pytest.raises(FetchError, match="nope.json: no such file"):
        storage.read_bytes(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(FetchError, match=r"bad.json: malformed JSON at line 1"):
        storage.read_json(str(tmp_path / "bad.json"))


def test_list_files_and_copy_tree_locally(tmp_path):
    src = tmp_path / "src"
    (src / "d" / "e").mkdir(parents=True)
    (src / "top.txt").write_text("t")
    (src / "d" / "e" / "deep.txt").write_text("d")
    assert storage.list_files(str(src)) == [str(src / "d" / "e" / "deep.txt"), str(src / "top.txt")]
    assert storage.list_files(str(src), recursive=False) == [str(src / "top.txt")]
    assert storage.relative_files(str(src)) == ["d/e/deep.txt", "top.txt"]
    assert storage.copy_tree(str(src), str(tmp_path / "dst")) == 2
    assert (tmp_path / "dst" / "d" / "e" / "deep.txt").read_text() == "d"
    with pytest.raises(FetchError, match="no such folder"):
        storage.list_files(str(tmp_path / "missing"))


def test_gcs_write_read_round_trip_on_the_emulator(gcs_emulator):
    uri = gcs_emulator.uri("runs/r1/metrics.json")
    assert not storage.exists(uri)
    storage.write_json(uri, {"mAP": 0.5})
    assert storage.exists(uri)
    assert storage.read_json(uri) == {"mAP": 0.5}
    storage.write_bytes(uri, b"\x00" * 10)  # overwrite in place: one object, replaced whole
    assert storage.read_bytes(uri) == b"\x00" * 10
    with pytest.raises(FetchError, match=r"gs://.*/runs/r1/none.json: no such file"):
        storage.read_bytes(gcs_emulator.uri("runs/r1/none.json"))


def test_gcs_atomic_write_puts_nothing_on_error(gcs_emulator):
    uri = gcs_emulator.uri("ckpt/checkpoint-1.pt")
    with pytest.raises(RuntimeError), storage.atomic_output(uri) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
        raise RuntimeError("killed")
    assert not storage.exists(uri)


def test_gcs_listing_copy_and_remove(gcs_emulator, tmp_path):
    local = tmp_path / "tree"
    (local / "images").mkdir(parents=True)
    (local / "images" / "a.png").write_bytes(b"png-a")
    (local / "images" / "b.png").write_bytes(b"png-b")
    (local / "annotations.json").write_text("{}")
    prefix = gcs_emulator.uri("datasets/d1")
    assert storage.copy_tree(str(local), prefix) == 3
    assert storage.list_files(prefix) == [f"{prefix}/annotations.json", f"{prefix}/images/a.png",
                                          f"{prefix}/images/b.png"]
    assert storage.list_files(prefix, recursive=False) == [f"{prefix}/annotations.json"]
    assert storage.isdir(prefix) and not storage.isdir(f"{prefix}/annotations.json")
    # A sibling prefix that merely starts with the same characters is not part of the listing.
    storage.write_text(gcs_emulator.uri("datasets/d10/x.txt"), "other")
    assert len(storage.list_files(prefix)) == 3

    back = tmp_path / "back"
    assert storage.copy_tree(prefix, str(back)) == 3
    assert (back / "images" / "b.png").read_bytes() == b"png-b"

    storage.remove(prefix, recursive=True)
    assert not storage.exists(f"{prefix}/images/a.png")
    assert storage.exists(gcs_emulator.uri("datasets/d10/x.txt"))
    storage.remove(prefix, recursive=True)  # already gone: no error


def test_gcs_uses_anonymous_json_api_against_the_emulator(gcs_emulator):
    from gcsfs.core import GCSFileSystem

    fs, path = storage.filesystem(gcs_emulator.uri("a/b"))
    assert type(fs) is GCSFileSystem and path == f"{gcs_emulator.bucket}/a/b"
    assert fs.credentials.token == "anon"
    assert storage.gcs_options() == {"token": "anon"}


def test_http_read_through_fsspec(http_server):
    url = http_server.serve("/config.yaml", "lr: 0.01\n")
    assert storage.read_text(url) == "lr: 0.01\n"
    with pytest.raises(FetchError, match=r"/missing.yaml: no such file"):
        storage.read_bytes(http_server.url("/missing.yaml"))
    with pytest.raises(FetchError, match="cannot be listed"):
        storage.list_files(url)


def test_join_and_basename():
    assert storage.join_uri("gs://b/root/", "x", "y.json") == "gs://b/root/x/y.json"
    assert storage.basename("https://h/p/v3.zip?sig=1") == "v3.zip"
    assert storage.basename("gs://bucket") == ""
    assert storage.basename("/data/set/") == "set"


def test_atomic_local_write_has_the_mode_of_a_plain_open(tmp_path):
    target = tmp_path / "metrics.json"
    storage.write_json(str(target), {"mAP": 0.5})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert (target.stat().st_mode & 0o777) == (plain.stat().st_mode & 0o777)


def test_atomic_write_to_a_fifo_writes_through_and_keeps_the_fifo(tmp_path):
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    storage.write_text(str(fifo), "hello")
    reader.join(timeout=10)
    assert got == ["hello"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # not renamed over by a regular file
